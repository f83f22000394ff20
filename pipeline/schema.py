"""Arrow schemas: the rows that flow between stages, and the Parquet files that come out.

Images and masks are stored as PNG bytes with their height and width in plain columns, not as
Ray tensor extension types, so pandas, pyarrow, Hugging Face datasets and Spark read them as is.
Between stages, pixel arrays travel as raw bytes (`pixels`: uint16 little-endian (H, W);
`model_input`: uint8 (S, S); `lung_prob`: float16 (S, S)) with their shapes beside them.

No column holds a patient-identifying DICOM attribute: DICOM metadata reaches the output only
through the allowlist in `pipeline.privacy`, and identifiers only as keyed hashes.
"""

from __future__ import annotations

import pyarrow as pa

# The allowlisted DICOM attributes as output columns (see pipeline.privacy.DICOM_ALLOWLIST).
DICOM_FIELDS = [
    pa.field("dicom_modality", pa.string()),
    pa.field("dicom_view_position", pa.string()),
    pa.field("dicom_photometric_interpretation", pa.string()),
    pa.field("dicom_bits_stored", pa.int32()),
    pa.field("dicom_pixel_spacing", pa.list_(pa.float64())),
    pa.field("dicom_rows", pa.int32()),
    pa.field("dicom_columns", pa.int32()),
]
PSEUDONYM_FIELDS = [
    pa.field("pseudo_patient_id", pa.string()),
    pa.field("pseudo_study_id", pa.string()),
    pa.field("pseudo_image_id", pa.string()),
]
ERROR_FIELDS = [
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]
IDENTITY_FIELDS = [
    pa.field("source_path", pa.string()),
    pa.field("source_sha256", pa.string()),
]

SOURCE_FIELDS = [  # what decoding found out about the source image
    pa.field("format", pa.string()),
    pa.field("source_height", pa.int32()),
    pa.field("source_width", pa.int32()),
    pa.field("source_bits_stored", pa.int32()),
]

READ_SCHEMA = pa.schema([*IDENTITY_FIELDS, pa.field("data", pa.binary()), *ERROR_FIELDS])

DECODED_SCHEMA = pa.schema([
    *IDENTITY_FIELDS,
    *SOURCE_FIELDS,
    pa.field("decode_notes", pa.list_(pa.string())),
    *DICOM_FIELDS,
    *PSEUDONYM_FIELDS,
    pa.field("pixels", pa.binary()),
    pa.field("model_input", pa.binary()),
    *ERROR_FIELDS,
])

SEGMENTED_SCHEMA = DECODED_SCHEMA.append(pa.field("lung_prob", pa.binary()))

ERRORS_SCHEMA = pa.schema([
    *IDENTITY_FIELDS,
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
])


def error_fields(stage: str | None = None, error_type: str | None = None, message: str | None = None) -> dict:
    """The error_* columns of a work row; all None for a row without error."""
    if message is not None and len(message) > 500:
        message = message[:497] + "..."
    return {"error_stage": stage, "error_type": error_type, "error_message": message}


def variant_fields(name: str) -> list[pa.Field]:
    return [
        pa.field(f"{name}_png", pa.binary()),
        pa.field(f"{name}_height", pa.int32()),
        pa.field(f"{name}_width", pa.int32()),
    ]


def images_schema(variants: list[str]) -> pa.Schema:
    """The schema of OUTPUT/images/*.parquet for the chosen variants (one PNG column each)."""
    fields = [
        *IDENTITY_FIELDS,
        *SOURCE_FIELDS,
        pa.field("mask_png", pa.binary()),
        pa.field("lung_bbox_x0", pa.int32()),
        pa.field("lung_bbox_y0", pa.int32()),
        pa.field("lung_bbox_x1", pa.int32()),
        pa.field("lung_bbox_y1", pa.int32()),
        pa.field("lung_fraction", pa.float32()),
        pa.field("n_components", pa.int32()),
        pa.field("qc_flags", pa.list_(pa.string())),
        pa.field("qc_pass", pa.bool_()),
        pa.field("decode_notes", pa.list_(pa.string())),
    ]
    for name in variants:
        fields.extend(variant_fields(name))
    fields += [
        pa.field("model_name", pa.string()),
        pa.field("model_sha256", pa.string()),
        *DICOM_FIELDS,
        *PSEUDONYM_FIELDS,
    ]
    return pa.schema(fields)
