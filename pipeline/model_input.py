"""What the lung model expects: its metadata, and the one function that turns pixels into its input.

This module does not import torch, so the CPU workers that decode images and prepare the model's
input never load it. Training (`pipeline/training/`) and inference call the same `prepare_input`, so
both sides see identical pixels. The model's output travels back as `lung_prob`: uint8 (S, S), the
probability times `PROB_SCALE`, rounded (64 KB at 256 px; see `pipeline.refine` for the threshold).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

NORMALIZATION_EQUALIZE_U8 = "equalize-u8"  # resize INTER_AREA -> min-max to 8 bit -> cv2.equalizeHist
NORMALIZATIONS = (NORMALIZATION_EQUALIZE_U8,)
DEFAULT_INPUT_SIZE = 256  # px, side of the square model input
DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is lung
PROB_SCALE = 255  # lung probability p in [0, 1] travels as round(p * PROB_SCALE), uint8
U8_TO_U16 = 257  # 255 * 257 == 65535: maps uint8 onto the full uint16 range exactly
FLAT_RANGE = 0.5  # uint16 levels; an image whose resized range is below this is treated as constant


@dataclass(frozen=True)
class ModelMeta:
    name: str  # model name, e.g. "lung-unet"
    input_size: int  # px, side S of the square input (S, S)
    normalization: str  # how prepare_input maps pixels to the input, one of NORMALIZATIONS
    threshold: float  # probability in [0, 1] above which a pixel counts as lung
    arch: dict = field(default_factory=dict)  # UNetConfig fields
    training: dict = field(default_factory=dict)  # data, split, epochs, command, git commit, date
    metrics: dict = field(default_factory=dict)  # e.g. {"val_dice": 0.97}
    quality: dict = field(default_factory=dict)  # pipeline.quality.QualityModel constants; {} = no quality score

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        return cls(**known_fields(cls, d, required=("name", "input_size", "normalization", "threshold"), what="model meta"))


def known_fields(cls: type, d: dict, *, required: tuple[str, ...], what: str) -> dict:
    """The items of `d` that are fields of dataclass `cls` (newer files may carry more); ValueError naming
    `what` when one of `required` is missing."""
    missing = set(required) - set(d)
    if missing:
        raise ValueError(f"{what} lacks fields {sorted(missing)}; got keys {sorted(d)}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def prepare_input(pixels: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """uint16 (H, W) 0..65535 or uint8 (H, W) 0..255 -> uint8 (S, S), S = meta.input_size; the model input x255.

    "equalize-u8": uint8 is first spread onto uint16 (x257) so both dtypes take the same path and identical
    content gives identical output; resize to S x S with INTER_AREA in float32; min-max stretch to 0..255
    and round; cv2.equalizeHist. Global equalization is invariant to monotonic intensity changes, so
    digital radiographs and low-contrast digitised film land on the same input distribution.
    A constant image gives all zeros.
    """
    if meta.normalization != NORMALIZATION_EQUALIZE_U8:
        raise ValueError(f"expected normalization {NORMALIZATION_EQUALIZE_U8!r}, got {meta.normalization!r}")
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16) or min(pixels.shape) < 1:
        raise ValueError(f"expected a 2-D uint8 or uint16 grayscale image, got {pixels.dtype} shape {pixels.shape}")
    x = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        x *= U8_TO_U16
    size = int(meta.input_size)
    if x.shape != (size, size):
        x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < FLAT_RANGE:  # constant image, up to float resize noise
        return np.zeros((size, size), np.uint8)
    u8 = np.rint((x - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    return cv2.equalizeHist(u8)


def probability_to_u8(prob: np.ndarray) -> np.ndarray:
    """float (..., S, S) in [0, 1] -> uint8, round(p * PROB_SCALE): how `lung_prob` travels."""
    return np.rint(np.clip(prob, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)
