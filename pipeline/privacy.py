"""What may leave the job from a DICOM header, and how identifiers are pseudonymised.

Privacy rule: the output carries only the attributes in ``DICOM_ALLOWLIST`` (none of them
identifies a person) and keyed hashes (HMAC-SHA256) of the study / image / patient
identifiers. The decoder copies the raw values of ``HEADER_KEYWORDS`` (and nothing else) into
``Decoded.header``, in memory; ``header_columns`` turns them into the output columns, and the raw
identifiers are never written. Without a key there are no pseudonymous ids at all: an unkeyed hash
of a PatientID or a UID can be reversed by hashing candidate values.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

logger = logging.getLogger(__name__)

# DICOM keyword -> output column name. Nothing here identifies a person (PS3.15 Annex E).
DICOM_ALLOWLIST: dict[str, str] = {
    "Modality": "dicom_modality",
    "ViewPosition": "dicom_view_position",
    "PhotometricInterpretation": "dicom_photometric_interpretation",
    "BitsStored": "dicom_bits_stored",
    "PixelSpacing": "dicom_pixel_spacing",
    "Rows": "dicom_rows",
    "Columns": "dicom_columns",
}

# Identifier keyword -> pseudonymous output column.
IDENTIFIER_COLUMNS: dict[str, str] = {
    "PatientID": "pseudo_patient_id",
    "StudyInstanceUID": "pseudo_study_id",
    "SOPInstanceUID": "pseudo_image_id",
}

# Every header value the decoder hands over: the allowlist and the identifiers to hash.
HEADER_KEYWORDS: tuple[str, ...] = (*DICOM_ALLOWLIST, *IDENTIFIER_COLUMNS)

# Coded string attributes are written only when they hold a defined term of the standard: any other
# text (a technician's free text, a name typed into the wrong field) becomes None and a decode note.
_MODALITY_TERMS = """AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO
IOL IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF
RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA
XAPROTOCOL XC CD DD DF DM DS EC FA FS LP MA MS OPR ST VF"""  # PS3.3 C.7.3.1.1.1, current and retired
DEFINED_TERMS: dict[str, frozenset[str]] = {
    "Modality": frozenset(_MODALITY_TERMS.split()),
    "ViewPosition": frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"}),  # PS3.3 C.8.11.5.1.1, C.8.11.7
    "PhotometricInterpretation": frozenset({  # PS3.3 C.7.6.3.1.2
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
        "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK"}),
}
_INT_KEYWORDS = ("BitsStored", "Rows", "Columns")
_PIXEL_SPACING_VM = 2  # row spacing, column spacing (mm)


def _plain_str(value: Any) -> str | None:
    text = str(value).strip()
    return text or None


def _plain_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pixel_spacing(value: Any) -> list[float] | None:
    """PixelSpacing as [row_mm, col_mm], or None when absent or malformed."""
    try:
        spacing = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return spacing if len(spacing) == _PIXEL_SPACING_VM else None


def undefined_term_note(column: str) -> str:
    return f"{column}_not_a_defined_term"


def allowlisted_attributes(ds: Any) -> dict[str, Any]:
    """The allowlisted attributes of a header (a pydicom Dataset or ``Decoded.header``), keyed by output column.

    Every column of ``DICOM_ALLOWLIST`` is present; a missing or empty attribute is None, and so is a
    coded attribute whose value is not one of its ``DEFINED_TERMS`` (``undefined_terms`` names them).
    Values are plain Python types: str, int, or list[float] (dicom_pixel_spacing, mm).
    ImagerPixelSpacing is deliberately not used as a fallback for PixelSpacing (it is
    measured at the detector, not the patient).
    """
    out: dict[str, Any] = {column: None for column in DICOM_ALLOWLIST.values()}
    for keyword, column in DICOM_ALLOWLIST.items():
        value = ds.get(keyword) if hasattr(ds, "get") else None
        if value is None or value == "":
            continue
        if keyword in DEFINED_TERMS:
            text = _plain_str(value)
            out[column] = text if text in DEFINED_TERMS[keyword] else None
        elif keyword in _INT_KEYWORDS:
            out[column] = _plain_int(value)
        else:
            out[column] = _pixel_spacing(value)
    return out


def undefined_terms(ds: Any) -> list[str]:
    """Decode notes for coded attributes present with a value that is not a defined term (the value is not kept)."""
    notes = []
    for keyword, terms in DEFINED_TERMS.items():
        value = ds.get(keyword) if hasattr(ds, "get") else None
        if value not in (None, "") and _plain_str(value) not in terms:
            notes.append(undefined_term_note(DICOM_ALLOWLIST[keyword]))
    return notes


def raw_identifiers(ds: Any) -> dict[str, str]:
    """The raw identifiers present in a header (Dataset or dict): {keyword: str}, for keyed hashing only."""
    ids: dict[str, str] = {}
    for keyword in IDENTIFIER_COLUMNS:
        value = ds.get(keyword) if hasattr(ds, "get") else None
        text = _plain_str(value) if value is not None else None
        if text:
            ids[keyword] = text
    return ids


def pseudonym(value: str, key: bytes) -> str:
    """HMAC-SHA256 of ``value`` (UTF-8) under ``key``, as 64 lowercase hex characters."""
    if not key:
        raise ValueError("expected a non-empty pseudonymisation key, got an empty one")
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonymous_ids(identifiers: dict, key: bytes | None) -> dict[str, str | None]:
    """{"pseudo_patient_id", "pseudo_study_id", "pseudo_image_id"}: keyed hashes or None.

    A value is None when ``key`` is None or the identifier is absent from ``identifiers``
    (keys are DICOM keywords: PatientID, StudyInstanceUID, SOPInstanceUID).
    """
    out: dict[str, str | None] = {column: None for column in IDENTIFIER_COLUMNS.values()}
    if key is None:
        return out
    for keyword, column in IDENTIFIER_COLUMNS.items():
        value = identifiers.get(keyword)
        if value:
            out[column] = pseudonym(value, key)
    return out


def hashed_path(path: str, key: bytes) -> str:
    """Keyed hash of a source path (HMAC-SHA256 hex), for the hashed source_path option."""
    return pseudonym(path, key)


def header_columns(header: dict[str, Any], key: bytes | None) -> tuple[dict[str, Any], list[str]]:
    """Every DICOM-derived output column of one image (the allowlisted attributes and the pseudonyms),
    and the notes on what was left out (`undefined_terms`).

    ``header``: ``Decoded.header`` ({} for PNG/JPEG/TIFF: every column None). With ``key`` None the
    pseudonyms are None.
    """
    columns = {**allowlisted_attributes(header), **pseudonymous_ids(raw_identifiers(header), key)}
    return columns, undefined_terms(header)
