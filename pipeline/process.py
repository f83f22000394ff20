"""One image's whole way, in order: read -> decode -> privacy -> model input -> segment -> [orientation] ->
refine -> quality -> qc -> variants -> row.

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

from pipeline.decode import DecodeConfig, Decoded, decode_image
from pipeline.model_input import ModelMeta, prepare_input
from pipeline.orientation import flags as orientation_flags
from pipeline.orientation import undo
from pipeline.png import encode_png
from pipeline.privacy import header_columns
from pipeline.qc import NOTE_ORIENTATION_FIXED, row_qc
from pipeline.quality import QualityModel, quality_features, quality_score
from pipeline.read import ReadConfig, read_source
from pipeline.refine import RefineConfig, refine
from pipeline.schema import error_row, image_row, result_schema
from pipeline.variants import VariantConfig, make_variants

log = logging.getLogger(__name__)

# {"model_input"} -> {"orientation", "turned", "lung_prob"[, "lung_prob_flip"]}: pipeline.segment.Segmenter's contract
Segment = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
SEGMENT_OUTPUTS = ("orientation", "turned", "lung_prob")  # always; "lung_prob_flip" too with the mirror view


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
    quality: QualityModel | None = None  # the model's quality_score constants; None: no score (null column)


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


@dataclass(frozen=True)
class Segmented:
    """What the segmenter said of one image (see SEGMENT_OUTPUTS)."""

    orientation: int  # how the image arrived, pipeline.orientation's k; 0 = upright
    turned: bool  # the model saw the image turned upright: the pixels must be turned the same way
    lung_prob: np.ndarray  # uint8 (S, S), round(p * 255)
    lung_prob_flip: np.ndarray | None  # uint8 (S, S), the mirrored view's, mirrored back; None without that view


def finish(image: Prepared, seg: Segmented, cfg: ProcessConfig, schema: pa.Schema) -> dict:
    """Prepared + what the segmenter said -> image row: mask at the source resolution, quality, QC, PNG variants."""
    try:
        pixels = undo(image.decoded.pixels, seg.orientation) if seg.turned else image.decoded.pixels
        mask, stats = refine(seg.lung_prob, pixels.shape, cfg.refine)
        score = None
        if cfg.quality is not None:
            features = quality_features(seg.lung_prob, seg.lung_prob_flip, stats, cfg.refine.threshold)
            score = quality_score(features, cfg.quality)
        flags, qc_pass = row_qc(stats, cfg.refine, notes=image.notes,
                                view_position=image.columns.get("dicom_view_position"),
                                quality_score=score, quality_threshold=cfg.quality and cfg.quality.threshold,
                                orientation_flags=orientation_flags(seg.orientation), orientation_fixed=seg.turned)
        variants = make_variants(pixels, mask, cfg.variants, cfg.variant)
        x0, y0, x1, y1 = stats.bbox if stats.bbox is not None else (None,) * 4
        values = {
            "source_path": image.source_path,
            "source_sha256": image.source_sha256,
            "format": image.decoded.format,
            "source_height": image.decoded.pixels.shape[0],
            "source_width": image.decoded.pixels.shape[1],
            "source_bits_stored": image.decoded.bits_stored,
            "mask_png": encode_png(mask, mask=True),
            "lung_bbox_x0": x0, "lung_bbox_y0": y0, "lung_bbox_x1": x1, "lung_bbox_y1": y1,
            "lung_fraction": stats.lung_fraction,
            "right_lung_fraction": stats.right_lung_fraction,
            "left_lung_fraction": stats.left_lung_fraction,
            "n_components": stats.n_components,
            "quality_score": score,
            "qc_flags": flags,
            "qc_pass": qc_pass,
            "decode_notes": [*image.notes, *([NOTE_ORIENTATION_FIXED] if seg.turned else [])],
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
    said: list[Segmented] = []
    if todo:
        out = segment({"model_input": np.stack([p.model_input for p in todo])})
        missing = [k for k in SEGMENT_OUTPUTS if k not in out]
        if missing:
            raise ValueError(f"the segmenter's answer lacks {missing}: expected {SEGMENT_OUTPUTS}, got {sorted(out)}")
        flips = out.get("lung_prob_flip", [None] * len(todo))
        said = [Segmented(int(k), bool(t), p, f) for k, t, p, f in zip(*(out[k] for k in SEGMENT_OUTPUTS), flips)]
    done = iter(said)
    return [finish(p, next(done), cfg, schema) if isinstance(p, Prepared) else p for p in prepared]


def process(sources: list[dict], segment: Segment, cfg: ProcessConfig) -> Iterator[list[dict]]:
    """SOURCE rows -> result rows (`pipeline.schema.result_schema`), `cfg.segment_batch` images at a time.

    At most one chunk's pixels are in memory at once.
    """
    schema = result_schema(cfg.variants)
    for start in range(0, len(sources), cfg.segment_batch):
        yield process_chunk(sources[start:start + cfg.segment_batch], segment, cfg, schema)
