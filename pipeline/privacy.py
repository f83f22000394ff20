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

_STR_KEYWORDS = ("Modality", "ViewPosition", "PhotometricInterpretation")
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


def allowlisted_attributes(ds: Any) -> dict[str, Any]:
    """The allowlisted attributes of a header (a pydicom Dataset or ``Decoded.header``), keyed by output column.

    Every column of ``DICOM_ALLOWLIST`` is present; a missing or empty attribute is None.
    Values are plain Python types: str, int, or list[float] (dicom_pixel_spacing, mm).
    ImagerPixelSpacing is deliberately not used as a fallback for PixelSpacing (it is
    measured at the detector, not the patient).
    """
    out: dict[str, Any] = {column: None for column in DICOM_ALLOWLIST.values()}
    for keyword, column in DICOM_ALLOWLIST.items():
        value = ds.get(keyword) if hasattr(ds, "get") else None
        if value is None or value == "":
            continue
        if keyword in _STR_KEYWORDS:
            out[column] = _plain_str(value)
        elif keyword in _INT_KEYWORDS:
            out[column] = _plain_int(value)
        else:
            out[column] = _pixel_spacing(value)
    return out


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


def header_columns(header: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """Every DICOM-derived output column of one image: the allowlisted attributes and the pseudonyms.

    ``header``: ``Decoded.header`` ({} for PNG/JPEG/TIFF: every column None). With ``key`` None the
    pseudonyms are None.
    """
    return {**allowlisted_attributes(header), **pseudonymous_ids(raw_identifiers(header), key)}
