"""One image's whole way, in order: read -> decode -> privacy -> model input -> segment -> refine -> variants -> row.

    process(sources, segment, cfg) -> result rows, one chunk of `cfg.segment_batch` images at a time

Each stage module is entered once per image, in that order; only `segment` sees a whole chunk at
once (one model call). This module knows nothing of Ray or Arrow: the wiring (`pipeline.dataset`)
hands it plain source rows and a segmenter, which is either the model itself (a CPU worker) or a
handle to a GPU actor pool. Either way the full-resolution pixels stay in this worker's memory, from
decoding to PNG encoding: only the model input (uint8 S x S) and the lung probability (uint8 S x S)
travel to and from a GPU.

Anything that goes wrong with one image (a refusal from the reader or decoder, or a bug in a
per-image step) turns that image into an error row naming the stage; it never escapes, where it
would fail the whole job, and the image is never dropped. A failing model call does escape: it is
not about one image, and Ray retries it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode import NOTE_BURNED_IN, DecodeConfig, Decoded, decode_image
from pipeline.model_input import ModelMeta, prepare_input
from pipeline.png import encode_png
from pipeline.privacy import header_columns
from pipeline.read import ReadConfig, read_source
from pipeline.refine import QC_FLAGS as MASK_QC_FLAGS
from pipeline.refine import RefineConfig, qc_flags, refine
from pipeline.schema import error_row, image_row, result_schema
from pipeline.variants import VariantConfig, make_variants

log = logging.getLogger(__name__)

# Decoder notes that a downstream user should see among the QC flags, not only in decode_notes.
DECODE_NOTES_IN_QC = frozenset({"polarity_corrected", NOTE_BURNED_IN})
# These QC flags make a row fail QC (the row still has images; downstream may drop it): the mask's, and
# text burned into the pixels (it may name the patient; the job cannot find or remove it).
FAILING_QC = frozenset({*MASK_QC_FLAGS, NOTE_BURNED_IN})

Segment = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # {"model_input"} -> {"lung_prob"}


@dataclass(frozen=True)
class ProcessConfig:
    """Everything a worker needs to turn source rows into result rows."""

    variants: tuple[str, ...]  # image variants to write, e.g. ("masked", "masked_eq")
    model: ModelMeta  # the model's metadata: input size, normalization
    model_sha256: str  # the weights' identity, written to every row
    refine: RefineConfig  # mask refinement; its threshold is the model's unless the user set one
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    pseudonym_key: bytes | None = field(default=None, repr=False)  # HMAC key; never written
    segment_batch: int = 16  # images decoded, then segmented in one model call, at a time


@dataclass(frozen=True)
class Prepared:
    """An image that made it through decoding, waiting for its lung probability."""

    source_path: str
    source_sha256: str
    decoded: Decoded  # the full-resolution pixels and what decoding noted
    columns: dict[str, Any]  # the DICOM-derived output columns (allowlist + pseudonyms)
    notes: tuple[str, ...]  # decoding's notes and privacy's (attributes left out)
    model_input: np.ndarray  # uint8 (S, S)


def _failed(source_path: str, sha256: str | None, stage: str, e: BaseException, schema: pa.Schema) -> dict:
    log.debug("%s failed at %s: %s", source_path, stage, e)
    message = (getattr(e, "strerror", None) if isinstance(e, OSError) else None) or str(e) or repr(e)
    return error_row(source_path, sha256, stage=stage, error_type=type(e).__name__, message=message, schema=schema)


def prepare(source: dict, cfg: ProcessConfig, schema: pa.Schema) -> Prepared | dict:
    """SOURCE row -> Prepared (read, decoded, header columns, model input), or an error row."""
    path = source["source_path"]
    try:
        data, sha256 = read_source(source["location"], cfg.read)
    except OSError as e:
        return _failed(path, None, "read", e, schema)
    try:
        decoded = decode_image(data, source=path, cfg=cfg.decode)
        columns, privacy_notes = header_columns(decoded.header, cfg.pseudonym_key)
        model_input = prepare_input(decoded.pixels, cfg.model)
    except Exception as e:  # noqa: BLE001 - any per-image failure becomes an error row
        return _failed(path, sha256, "decode", e, schema)
    return Prepared(path, sha256, decoded, columns, (*decoded.notes, *privacy_notes), model_input)


def finish(image: Prepared, lung_prob: np.ndarray, cfg: ProcessConfig, schema: pa.Schema) -> dict:
    """Prepared + uint8 (S, S) lung probability -> image row: mask at the source resolution, QC, PNG variants."""
    pixels = image.decoded.pixels
    try:
        mask, stats = refine(lung_prob, pixels.shape, cfg.refine)
        flags = [*qc_flags(stats, cfg.refine), *(n for n in image.notes if n in DECODE_NOTES_IN_QC)]
        variants = make_variants(pixels, mask, cfg.variants, cfg.variant)
        x0, y0, x1, y1 = stats.bbox if stats.bbox is not None else (None,) * 4
        values = {
            "source_path": image.source_path,
            "source_sha256": image.source_sha256,
            "format": image.decoded.format,
            "source_height": pixels.shape[0],
            "source_width": pixels.shape[1],
            "source_bits_stored": image.decoded.bits_stored,
            "mask_png": encode_png(mask, mask=True),
            "lung_bbox_x0": x0, "lung_bbox_y0": y0, "lung_bbox_x1": x1, "lung_bbox_y1": y1,
            "lung_fraction": stats.lung_fraction,
            "n_components": stats.n_components,
            "qc_flags": flags,
            "qc_pass": not (set(flags) & FAILING_QC),
            "decode_notes": list(image.notes),
            "model_name": cfg.model.name,
            "model_sha256": cfg.model_sha256,
            **image.columns,
        }
        for name, img in variants.items():
            values[f"{name}_png"] = encode_png(img)
            values[f"{name}_height"], values[f"{name}_width"] = img.shape
    except Exception as e:  # noqa: BLE001 - any per-image failure becomes an error row
        return _failed(image.source_path, image.source_sha256, "postprocess", e, schema)
    return image_row(values, schema)  # outside the try: a layout mismatch is a bug, not a bad image


def process_chunk(sources: list[dict], segment: Segment, cfg: ProcessConfig, schema: pa.Schema) -> list[dict]:
    """Result rows for a few SOURCE rows, in their order, with one model call for those that decoded."""
    prepared = [prepare(s, cfg, schema) for s in sources]
    todo = [p for p in prepared if isinstance(p, Prepared)]
    probs: list[np.ndarray] = []
    if todo:
        probs = list(segment({"model_input": np.stack([p.model_input for p in todo])})["lung_prob"])
    done = iter(probs)
    return [finish(p, next(done), cfg, schema) if isinstance(p, Prepared) else p for p in prepared]


def process(sources: list[dict], segment: Segment, cfg: ProcessConfig) -> Iterator[list[dict]]:
    """SOURCE rows -> result rows (`pipeline.schema.result_schema`), `cfg.segment_batch` images at a time.

    At most one chunk's pixels are in memory at once.
    """
    schema = result_schema(cfg.variants)
    for start in range(0, len(sources), cfg.segment_batch):
        yield process_chunk(sources[start:start + cfg.segment_batch], segment, cfg, schema)
