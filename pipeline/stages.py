"""Per-image stage functions and their thin adapters over Ray's pyarrow batches.

Each `*_row` function takes and returns one plain row dict, so it is testable without Ray.
Anything that goes wrong with one image (a refusal from the decoder, or a bug in our own code)
is caught here and turns that row into an error row; it never escapes into Ray, where it would
fail the whole job, and the row is never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.decode import DecodeConfig, decode_image
from pipeline.model import ModelMeta, prepare_input
from pipeline.privacy import pseudonymous_ids
from pipeline.refine import QC_FLAGS as MASK_QC_FLAGS
from pipeline.refine import RefineConfig, mask_stats, qc_flags, refine_mask
from pipeline.schema import DECODED_SCHEMA, ERROR_FIELDS, error_fields, images_schema
from pipeline.variants import VariantConfig, encode_png, make_variants

log = logging.getLogger(__name__)

# Decoder notes that a downstream user should see among the QC flags, not only in decode_notes.
_DECODE_NOTES_IN_QC = frozenset({"polarity_corrected"})
# Mask QC flags make a row fail QC (the row still has images; downstream may drop it).
_FAILING_QC = frozenset(MASK_QC_FLAGS)


@dataclass(frozen=True)
class PostprocessConfig:
    variants: tuple[str, ...]  # names of the image variants to write, e.g. ("masked", "masked_eq")
    refine: RefineConfig = field(default_factory=RefineConfig)  # mask refinement
    variant: VariantConfig = field(default_factory=VariantConfig)  # output size, bit depth, crop margin
    model_name: str = ""  # written to every row
    model_sha256: str = ""  # sha256 of the weights file, written to every row


def result_schema(variants: tuple[str, ...]) -> pa.Schema:
    """What the post-processing stage emits: an image row or an error row (error_* set)."""
    schema = images_schema(list(variants))
    for f in ERROR_FIELDS:
        schema = schema.append(f)
    return schema


def _failed(row: dict, stage: str, e: BaseException) -> dict:
    log.debug("%s failed at %s: %s", row.get("source_path"), stage, e)
    return {**row, **error_fields(stage, type(e).__name__, str(e) or repr(e))}


def decode_row(row: dict, *, cfg: DecodeConfig, meta: ModelMeta, pseudonym_key: bytes | None) -> dict:
    """READ row -> DECODED row: pixels as uint16 bytes, the model's input, allowlisted metadata."""
    out = {name: None for name in DECODED_SCHEMA.names}
    out.update({k: row[k] for k in ("source_path", "source_sha256", "error_stage", "error_type", "error_message")})
    if row["error_stage"] is not None:
        return out
    try:
        decoded = decode_image(row["data"], source=row["source_path"], cfg=cfg)
        model_input = prepare_input(decoded.pixels, meta)
    except Exception as e:  # noqa: BLE001 - any per-image failure becomes an error row
        return _failed(out, "decode", e)
    h, w = decoded.pixels.shape
    out.update(
        format=decoded.format,
        source_height=h,
        source_width=w,
        source_bits_stored=decoded.bits_stored,
        decode_notes=list(decoded.notes),
        pixels=np.ascontiguousarray(decoded.pixels, dtype="<u2").tobytes(),
        model_input=np.ascontiguousarray(model_input, dtype=np.uint8).tobytes(),
        **{k: v for k, v in decoded.attributes.items() if k in DECODED_SCHEMA.names},
        **pseudonymous_ids(decoded.identifiers, pseudonym_key),
    )
    return out


def _empty_result(row: dict, schema: pa.Schema) -> dict:
    out = {name: None for name in schema.names}
    for k in out:
        if k in row and k not in ("pixels", "model_input", "lung_prob"):
            out[k] = row[k]
    return out


def postprocess_row(row: dict, *, cfg: PostprocessConfig, schema: pa.Schema, input_size: int) -> dict:
    """SEGMENTED row -> result row: source-resolution mask, QC, PNG variants."""
    out = _empty_result(row, schema)
    if row["error_stage"] is not None:
        return out
    try:
        h, w = row["source_height"], row["source_width"]
        pixels = np.frombuffer(row["pixels"], dtype="<u2").reshape(h, w)
        prob = np.frombuffer(row["lung_prob"], dtype=np.float16).reshape(input_size, input_size).astype(np.float32)
        mask = refine_mask(prob, (h, w), cfg.refine)
        stats = mask_stats(mask)
        flags = list(qc_flags(stats, cfg.refine))
        flags += [n for n in row["decode_notes"] or [] if n in _DECODE_NOTES_IN_QC]
        images = make_variants(pixels, mask, list(cfg.variants), cfg.variant)
        for name, img in images.items():
            out[f"{name}_png"] = encode_png(img)
            out[f"{name}_height"], out[f"{name}_width"] = img.shape[:2]
        x0, y0, x1, y1 = stats.bbox if stats.bbox is not None else (None,) * 4
        out.update(
            mask_png=encode_png(mask),
            lung_bbox_x0=x0, lung_bbox_y0=y0, lung_bbox_x1=x1, lung_bbox_y1=y1,
            lung_fraction=float(stats.lung_fraction),
            n_components=int(stats.n_components),
            qc_flags=flags,
            qc_pass=not (set(flags) & _FAILING_QC),
            model_name=cfg.model_name,
            model_sha256=cfg.model_sha256,
        )
    except Exception as e:  # noqa: BLE001 - any per-image failure becomes an error row
        return _failed(_empty_result(row, schema), "postprocess", e)
    return out


def map_rows(table: pa.Table, fn: Callable[[dict], dict], schema: pa.Schema) -> pa.Table:
    """Apply a row function to every row of a pyarrow batch, giving a batch of `schema`."""
    return pa.Table.from_pylist([fn(row) for row in table.to_pylist()], schema=schema)


def decode_batch(table: pa.Table, *, cfg: DecodeConfig, meta: ModelMeta, pseudonym_key: bytes | None) -> pa.Table:
    return map_rows(table, lambda r: decode_row(r, cfg=cfg, meta=meta, pseudonym_key=pseudonym_key), DECODED_SCHEMA)


def postprocess_batch(table: pa.Table, *, cfg: PostprocessConfig, input_size: int) -> pa.Table:
    schema = result_schema(cfg.variants)
    return map_rows(table, lambda r: postprocess_row(r, cfg=cfg, schema=schema, input_size=input_size), schema)
