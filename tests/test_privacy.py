"""Nothing identifying leaves decoding and privacy: the decoder hands over only the header values privacy
names, and privacy turns them into allowlisted attributes and keyed, stable pseudonyms."""

from __future__ import annotations

import pytest
from corpus import PHI_VALUES, phantom_xray, write_dicom, write_phi_dicom

from pipeline.decode import decode_image
from pipeline.privacy import (
    DICOM_ALLOWLIST,
    HEADER_KEYWORDS,
    allowlisted_attributes,
    hashed_path,
    header_columns,
    pseudonym,
    pseudonymous_ids,
)

KEY = b"test-key-0123456789"


@pytest.fixture
def phi_decoded(tmp_path):
    path = tmp_path / "phi.dcm"
    values = write_phi_dicom(path)
    return decode_image(path.read_bytes(), source=str(path)), values


def test_phi_file_really_carries_phi(tmp_path):
    import pydicom

    path = tmp_path / "phi.dcm"
    values = write_phi_dicom(path)
    dumped = repr(pydicom.dcmread(path))
    missing = [v for v in values if v not in dumped]
    assert not missing and len(values) >= 25


def test_the_decoder_hands_over_only_the_named_header_values(phi_decoded):
    decoded, values = phi_decoded
    assert set(decoded.header) == set(HEADER_KEYWORDS)
    text = repr(decoded) + repr(decoded.notes) + decoded.format  # the header is not even in the repr
    assert not [v for v in values if v in text]
    raw = repr({k: v for k, v in decoded.header.items() if k not in ("PatientID", "StudyInstanceUID", "SOPInstanceUID")})
    assert not [v for v in values if v in raw]  # the allowlisted keywords carry nothing identifying


def test_no_phi_in_the_output_columns(phi_decoded):
    decoded, values = phi_decoded
    columns, _ = header_columns(decoded.header, KEY)
    assert not [v for v in values if v in repr(columns)]
    assert set(columns) == set(DICOM_ALLOWLIST.values()) | {"pseudo_patient_id", "pseudo_study_id", "pseudo_image_id"}


def test_attributes_are_plain_python(phi_decoded):
    decoded, _ = phi_decoded
    attributes = allowlisted_attributes(decoded.header)
    assert attributes == {
        "dicom_modality": "DX",
        "dicom_view_position": "PA",
        "dicom_photometric_interpretation": "MONOCHROME2",
        "dicom_bits_stored": 12,
        "dicom_pixel_spacing": [0.2, 0.2],
        "dicom_rows": 64,
        "dicom_columns": 64,
    }
    assert type(attributes["dicom_pixel_spacing"]) is list
    assert all(type(v) is float for v in attributes["dicom_pixel_spacing"])


def test_missing_attributes_are_none(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "bare.dcm", pixels=phantom_xray(64, 64) >> 4)
    ds = pydicom.dcmread(path)
    del ds.ViewPosition, ds.PixelSpacing
    attrs = allowlisted_attributes(ds)
    assert attrs["dicom_view_position"] is None and attrs["dicom_pixel_spacing"] is None
    assert attrs["dicom_rows"] == 64


def test_identifiers_are_raw_and_only_for_hashing(phi_decoded):
    decoded, _ = phi_decoded
    columns, _ = header_columns(decoded.header, KEY)
    assert columns["pseudo_patient_id"] == pseudonym(PHI_VALUES["PatientID"], KEY)
    assert columns["pseudo_study_id"] == pseudonym(PHI_VALUES["StudyInstanceUID"], KEY)
    assert columns["pseudo_image_id"] == pseudonym(PHI_VALUES["SOPInstanceUID"], KEY)
    unkeyed, _ = header_columns(decoded.header, None)
    assert unkeyed["pseudo_patient_id"] is None and unkeyed["dicom_modality"] == "DX"


def test_pseudonym_is_hmac_sha256_stable_and_key_dependent():
    # RFC 4231 test case 2.
    assert pseudonym("what do ya want for nothing?", b"Jefe") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    assert pseudonym("x", KEY) == pseudonym("x", KEY)
    assert pseudonym("x", KEY) != pseudonym("x", KEY + b"!")
    assert pseudonym("x", KEY) != pseudonym("y", KEY)
    with pytest.raises(ValueError, match="non-empty"):
        pseudonym("x", b"")


def test_pseudonymous_ids_without_key_or_identifier_are_none():
    ids = {"PatientID": "p", "StudyInstanceUID": "1.2.3"}
    assert pseudonymous_ids(ids, None) == {"pseudo_patient_id": None, "pseudo_study_id": None, "pseudo_image_id": None}
    got = pseudonymous_ids(ids, KEY)
    assert got["pseudo_patient_id"] == pseudonym("p", KEY)
    assert got["pseudo_study_id"] == pseudonym("1.2.3", KEY)
    assert got["pseudo_image_id"] is None


def test_hashed_path_is_keyed():
    p = "/data/Patient Smith (1).dcm"
    assert hashed_path(p, KEY) == hashed_path(p, KEY)
    assert hashed_path(p, KEY) != hashed_path(p, b"other")
    assert "Smith" not in hashed_path(p, KEY) and len(hashed_path(p, KEY)) == 64


def test_non_dicom_has_no_attributes_or_identifiers(tmp_path):
    from corpus import encode

    decoded = decode_image(encode(".png", (phantom_xray(64, 64) >> 8).astype("uint8")), source="a.png")
    assert decoded.header == {}
    columns, notes = header_columns(decoded.header, KEY)
    assert set(columns.values()) == {None} and notes == []


# --- issue #14.6: nothing from a header in messages, logs or coded columns ----------------------------

SECRET = "Jane^Doe-1961"  # what a careless or crafted header puts where it does not belong


def test_coded_attributes_are_kept_only_as_defined_terms(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", pixels=phantom_xray(64, 64) >> 4,
                       extra={"ViewPosition": SECRET[:16], "Modality": "OT"})
    decoded = decode_image(path.read_bytes(), source="a.dcm")
    columns, notes = header_columns(decoded.header, KEY)
    assert columns["dicom_view_position"] is None and columns["dicom_modality"] == "OT"
    assert notes == ["dicom_view_position_not_a_defined_term"]
    assert SECRET[:16] not in repr(columns) + repr(notes)


@pytest.mark.parametrize("field", ["NumberOfFrames", "PhotometricInterpretation", "TransferSyntaxUID", "Rows"])
def test_error_messages_and_logs_never_quote_a_header_value(tmp_path, caplog, field):
    """pydicom's exception texts and warnings quote values; the messages are built from the tag name only."""
    import logging
    import warnings

    import pydicom

    from pipeline.decode import DecodeError

    path = write_dicom(tmp_path / "a.dcm", pixels=phantom_xray(64, 64) >> 4)
    ds = pydicom.dcmread(path)
    if field == "TransferSyntaxUID":
        secret = "1.2.3.4.19610417"  # an unknown syntax carrying a birth date
        ds.file_meta.TransferSyntaxUID = secret
    else:
        secret = SECRET  # planted as text where a number or a defined term belongs
        tag = pydicom.datadict.tag_for_keyword(field)
        ds[tag] = pydicom.DataElement(tag, "LO", secret)
    ds.save_as(path, enforce_file_format=False)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DecodeError) as e:
            decode_image(path.read_bytes(), source="a.dcm")
    assert secret not in str(e.value), str(e.value)
    assert not [r for r in caplog.records if secret in r.getMessage()]
    assert not [w for w in caught if secret in str(w.message)]
