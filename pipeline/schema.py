"""The row layout, in one place: what a worker receives, what it emits, and the Parquet files that come out.

    SOURCE_SCHEMA   one input file: source_path (as written), location (what the reader opens), size
    result rows     images_schema(variants) + the error_* columns: an image row (error_* null) or an
                    error row (only identity and error_* set); the writer splits them into
    images/         images_schema(variants)
    errors/         ERRORS_SCHEMA

Rows are built by `image_row` and `error_row`, which refuse a row whose keys do not match the
schema exactly: a new column (a DICOM attribute added to the allowlist, a QC number) that is not
declared here fails loudly instead of being dropped.

Images and masks are stored as PNG bytes with their height and width in plain columns, not as
Ray tensor extension types, so pandas, pyarrow, Hugging Face datasets and Spark read them as is.
No column holds a patient-identifying DICOM attribute: DICOM metadata reaches the output only
through the allowlist in `pipeline.privacy`, and identifiers only as keyed hashes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

MAX_MESSAGE_CHARS = 500  # an error message is cut to this length

# The output contract's version, in manifest.json and in every Parquet file's key-value metadata.
# docs/OUTPUT.md says what bumps it: a column added, removed, renamed or retyped, or a change in what a
# column's values mean (source_path's spelling, a QC flag's rule, the mask's encoding). 2: source_path
# spelled losslessly (pipeline.discover.spell), burned_in_annotation, coded DICOM attributes only as
# defined terms. 3: quality_score, right/left_lung_fraction, QC flags low_quality, rotated_*, mirrored,
# not_frontal, and the decode note orientation_fixed.
SCHEMA_VERSION = 3
METADATA_SCHEMA_VERSION = b"xray_lung_prep.schema_version"  # Parquet key-value metadata keys
METADATA_PACKAGE_VERSION = b"xray_lung_prep.version"

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

SOURCE_SCHEMA = pa.schema([
    pa.field("source_path", pa.string()),  # as written to the output (relative, absolute or hashed)
    pa.field("location", pa.binary()),  # what the reader opens: os.fsencode(local path) or a UTF-8 URI
    pa.field("size", pa.int64()),  # bytes, from the listing (null when unknown); balances the work
])

ERRORS_SCHEMA = pa.schema([
    *IDENTITY_FIELDS,
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
])


def variant_fields(name: str) -> list[pa.Field]:
    return [
        pa.field(f"{name}_png", pa.binary()),
        pa.field(f"{name}_height", pa.int32()),
        pa.field(f"{name}_width", pa.int32()),
    ]


def images_schema(variants: list[str] | tuple[str, ...]) -> pa.Schema:
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
        pa.field("right_lung_fraction", pa.float32()),  # the patient's right lung: the image's left (pipeline.refine.lung_sides)
        pa.field("left_lung_fraction", pa.float32()),
        pa.field("n_components", pa.int32()),
        pa.field("quality_score", pa.float32()),  # the mask's predicted Dice, 0..1 (pipeline.quality)
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


def result_schema(variants: list[str] | tuple[str, ...]) -> pa.Schema:
    """What a worker emits: images_schema plus the error_* columns (null on image rows)."""
    schema = images_schema(variants)
    for f in ERROR_FIELDS:
        schema = schema.append(f)
    return schema


def image_row(values: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """A result row from every column of `schema` except error_*; ValueError naming any missing or unknown key."""
    expected = set(schema.names) - {f.name for f in ERROR_FIELDS}
    missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
    if missing or unknown:
        raise ValueError(f"image row does not match the output schema: missing {missing}, unknown {unknown}")
    return {**values, **{f.name: None for f in ERROR_FIELDS}}


def error_row(source_path: str, source_sha256: str | None, *, stage: str, error_type: str, message: str,
              schema: pa.Schema) -> dict[str, Any]:
    """A result row for an input that failed at `stage`: identity and error_* set, every other column null."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    row: dict[str, Any] = dict.fromkeys(schema.names)
    row.update(source_path=source_path, source_sha256=source_sha256,
               error_stage=stage, error_type=error_type, error_message=message)
    return row
