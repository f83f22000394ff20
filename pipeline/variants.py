"""Lung-focused image variants from one image and one lung mask.

A variant's name is ``region[_contrast]``:

    region    full         the whole image
              masked       the whole image, non-lung pixels black (0)
              crop         original pixels inside the lung bounding box + margin
              masked_crop  masked, then cropped
    contrast  (none)       as decoded
              eq           global histogram equalization; over lung pixels only for masked regions
              clahe        OpenCV CLAHE; non-lung pixels set back to 0 for masked regions

The seed notebook wrote ``DEFAULT_VARIANTS``. Order of operations: bit depth (8-bit = img16 >> 8;
an 8-bit source as it is), region, contrast, optional square padding of crops, resize.

Shared work: the lung mask and the bounding box are applied once per image; the equalization
mapping of the masked regions is computed once (the crop holds every lung pixel, so ``masked_eq``
and ``masked_crop_eq`` share it); histograms come from ``cv2.calcHist`` over the mask, not a copy of
the lung pixels.

The variants are encoded as PNG by `pipeline.png`.

Empty mask (no lungs found): every region falls back to the whole, unmasked image ("masked" is
"full", "crop" and "masked_crop" are the whole frame), so the row still has pixels; the caller
flags it in QC (``refine.qc_flags`` -> "no_lungs").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import cv2
import numpy as np

logger = logging.getLogger(__name__)

VARIANT_REGIONS = ("full", "masked", "crop", "masked_crop")
VARIANT_CONTRASTS = ("", "eq", "clahe")
DEFAULT_VARIANTS = ("masked", "masked_eq", "masked_crop", "masked_crop_eq")
RESIZE_MODES = ("square", "letterbox")
BIT_DEPTHS = (8, 16)
EIGHT_BIT_SHIFT = 8  # uint16 -> uint8 keeps the high byte
U8_TO_U16 = 257  # uint8 -> uint16 spreads 0..255 exactly onto 0..65535


@dataclass(frozen=True)
class VariantSpec:
    """One output variant: where (region) and how (contrast)."""

    region: str  # one of VARIANT_REGIONS
    contrast: str = ""  # one of VARIANT_CONTRASTS; "" = unchanged

    def __post_init__(self) -> None:
        if self.region not in VARIANT_REGIONS:
            raise ValueError(f"unknown region {self.region!r}; expected one of {VARIANT_REGIONS}")
        if self.contrast not in VARIANT_CONTRASTS:
            raise ValueError(f"unknown contrast {self.contrast!r}; expected one of {VARIANT_CONTRASTS}")

    @property
    def name(self) -> str:
        return f"{self.region}_{self.contrast}" if self.contrast else self.region

    @property
    def masked(self) -> bool:
        return self.region in ("masked", "masked_crop")

    @property
    def cropped(self) -> bool:
        return self.region in ("crop", "masked_crop")


_SPECS_BY_NAME = {
    spec.name: spec for spec in (VariantSpec(r, c) for r, c in product(VARIANT_REGIONS, VARIANT_CONTRASTS))
}
VARIANT_NAMES = tuple(_SPECS_BY_NAME)  # every valid name, regions x contrasts


def parse_variant(name: str) -> VariantSpec:
    """'masked_crop_eq' -> VariantSpec('masked_crop', 'eq'); ValueError listing the valid names."""
    try:
        return _SPECS_BY_NAME[name]
    except (KeyError, TypeError) as e:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANT_NAMES)}") from e


@dataclass(frozen=True)
class VariantConfig:
    """Geometry and encoding shared by all variants of a run."""

    size: int | None = None  # output side in px; None keeps the (cropped) size
    resize_mode: str = "letterbox"  # "square" (stretch to size x size) or "letterbox" (keep aspect, pad black)
    bit_depth: int = 8  # bits per output pixel: 8 (img16 >> 8) or 16
    crop_margin_frac: float = 0.05  # margin around the lung bounding box, fraction of the box width / height
    pad_square: bool = False  # pad crops to a square (black, centred) before resizing
    clahe_clip: float = 2.0  # CLAHE clip limit, multiples of the mean bin count
    clahe_tiles: int = 8  # CLAHE tiles per side

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be None or >= 1 px, got {self.size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, got {self.bit_depth}")
        if self.crop_margin_frac < 0:
            raise ValueError(f"crop_margin_frac must be >= 0, got {self.crop_margin_frac}")
        if self.clahe_clip <= 0:
            raise ValueError(f"clahe_clip must be > 0, got {self.clahe_clip}")
        if self.clahe_tiles < 1:
            raise ValueError(f"clahe_tiles must be >= 1, got {self.clahe_tiles}")


# --- checks ---------------------------------------------------------------------------------


def _check_image(img: np.ndarray, *, what: str = "image") -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a uint8 or uint16 (H, W) {what}, got {got}")


def _check_roi(img: np.ndarray, roi: np.ndarray | None) -> None:
    if roi is None:
        return
    if not isinstance(roi, np.ndarray) or roi.dtype != np.uint8 or roi.shape != img.shape:
        got = f"{roi.dtype} {roi.shape}" if isinstance(roi, np.ndarray) else type(roi).__name__
        raise ValueError(f"expected a uint8 roi mask of shape {img.shape}, got {got}")


def _max_value(img: np.ndarray) -> int:
    return int(np.iinfo(img.dtype).max)


# --- pixel steps ----------------------------------------------------------------------------


def to_bit_depth(img: np.ndarray, bit_depth: int) -> np.ndarray:
    """uint8 or uint16 (H, W) -> the output depth: 8 keeps a uint16 image's high byte, 16 spreads uint8 x257.

    An image already at the depth is returned as it is (no copy).
    """
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, got {bit_depth}")
    if img.dtype == (np.uint8 if bit_depth == 8 else np.uint16):
        return img
    if bit_depth == 8:
        return (img >> EIGHT_BIT_SHIFT).astype(np.uint8)
    return img.astype(np.uint16) * np.uint16(U8_TO_U16)


def apply_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Set non-lung pixels to 0. img uint8/uint16 (H, W); mask uint8 (H, W), lung = non-zero."""
    _check_image(img)
    _check_roi(img, mask)
    return cv2.bitwise_and(img, img, mask=mask)


def crop_box(
    bbox: tuple[int, int, int, int], shape: tuple[int, int], *, margin_frac: float = 0.0
) -> tuple[int, int, int, int]:
    """Grow a (x0, y0, x1, y1) box (end exclusive) by a margin and clip it to an (H, W) image.

    The margin is ``margin_frac`` of the box width on the left and right, of its height on the
    top and bottom, rounded half up to whole px: a 20x40 box with 0.05 grows by 1 px in x and
    2 px in y.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    h, w = shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"expected a non-empty box inside an image of shape {shape}, got {bbox}")
    if margin_frac < 0:
        raise ValueError(f"expected margin_frac >= 0, got {margin_frac}")
    mx = int(margin_frac * (x1 - x0) + 0.5)
    my = int(margin_frac * (y1 - y0) + 0.5)
    return (max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my))


def histogram(img: np.ndarray, *, roi: np.ndarray | None = None) -> np.ndarray:
    """Counts of every value of a uint8 / uint16 (H, W) image (256 / 65536 bins), over ``roi`` pixels only if given."""
    bins = _max_value(img) + 1
    return cv2.calcHist([img], [0], roi, [bins], [0, bins]).ravel()


def equalize_lut(hist: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """The global histogram-equalization mapping (the CDF) for a histogram, as a LUT of ``dtype``.

    The lowest occurring value maps to 0 and the highest to the dtype's maximum. None when there is
    nothing to spread (no values, or one value only).
    """
    cdf = np.cumsum(hist.astype(np.int64))
    occurring = np.flatnonzero(hist)
    if occurring.size < 2:
        return None
    top = len(hist) - 1
    cdf_min = cdf[occurring[0]]
    return np.clip(np.rint((cdf - cdf_min) / (cdf[-1] - cdf_min) * top), 0, top).astype(dtype)


def apply_lut(img: np.ndarray, lut: np.ndarray | None, *, roi: np.ndarray | None = None) -> np.ndarray:
    """``lut`` applied to every pixel (None = unchanged), then pixels outside ``roi`` set to 0."""
    if lut is None:
        out = img.copy()
    else:
        out = cv2.LUT(img, lut) if img.dtype == np.uint8 else lut[img]
    return out if roi is None else apply_mask(out, roi)


def equalize(img: np.ndarray, *, roi: np.ndarray | None = None) -> np.ndarray:
    """Global histogram equalization for uint8 and uint16 (H, W), same dtype out.

    The lowest occurring value maps to 0 and the highest to the dtype's maximum; the mapping is
    monotonic (the CDF). With ``roi`` (uint8 lung mask) the histogram counts roi pixels only and
    pixels outside the roi come out 0, so non-lung pixels (soft tissue, labels, the black of a
    masked image) do not shape the mapping. A constant region (one value) is left unchanged::

        [[10, 10], [20, 30]] (uint8) -> [[0, 0], [128, 255]]
    """
    _check_image(img)
    _check_roi(img, roi)
    return apply_lut(img, equalize_lut(histogram(img, roi=roi), img.dtype), roi=roi)


def clahe(
    img: np.ndarray, *, clip: float = 2.0, tiles: int = 8, roi: np.ndarray | None = None
) -> np.ndarray:
    """OpenCV CLAHE on uint8 or uint16 (H, W), same dtype out; outside ``roi`` set back to 0.

    Note: OpenCV clips at ``clip * tile_area / bins`` with 65536 bins for uint16, so the same
    ``clip`` limits contrast more strongly at 16 bits than at 8.
    """
    _check_image(img)
    _check_roi(img, roi)
    if clip <= 0 or tiles < 1:
        raise ValueError(f"expected clip > 0 and tiles >= 1, got clip={clip}, tiles={tiles}")
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img)
    return out if roi is None else apply_mask(out, roi)


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Pad with black to max(H, W) on both sides, centred (odd remainder at the bottom / right)."""
    h, w = img.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if (height, width) == img.shape:
        return img
    shrinking = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_output(img: np.ndarray, cfg: VariantConfig) -> np.ndarray:
    """Bring an (H, W) image to ``cfg.size`` x ``cfg.size``; unchanged when size is None.

    "square" stretches; "letterbox" scales the longer side to size (shorter side rounded, at
    least 1 px) and pads with black, centred, odd remainder at the bottom / right. Area
    interpolation when shrinking, bilinear when enlarging.
    """
    _check_image(img)
    if cfg.size is None:
        return img
    s = cfg.size
    if cfg.resize_mode == "square":
        return _resize(img, s, s)
    h, w = img.shape
    scale = s / max(h, w)
    nw, nh = max(1, min(s, round(w * scale))), max(1, min(s, round(h * scale)))
    scaled = _resize(img, nw, nh)
    top, left = (s - nh) // 2, (s - nw) // 2
    return cv2.copyMakeBorder(scaled, top, s - nh - top, left, s - nw - left, cv2.BORDER_CONSTANT, value=0)


# --- the stage ------------------------------------------------------------------------------


def make_variants(
    img: np.ndarray, mask: np.ndarray, names: Sequence[str], cfg: VariantConfig = VariantConfig()
) -> dict[str, np.ndarray]:
    """All requested variants of one image, sharing the masking, cropping and equalization between them.

    img: uint8 (H, W) 0..255 or uint16 (H, W) 0..65535; mask: uint8 (H, W), {0, 255} (all 0 = no lungs,
    see the module docstring). Returns {name: uint8 or uint16 (h, w) per ``cfg.bit_depth``}, (size, size)
    when ``cfg.size`` is set. Unknown names raise ValueError before any work is done.
    """
    specs = [parse_variant(n) for n in names]
    _check_image(img)
    _check_roi(img, mask)

    img = to_bit_depth(img, cfg.bit_depth)
    x, y, w, h = cv2.boundingRect(mask)
    box = crop_box((x, y, x + w, y + h), img.shape, margin_frac=cfg.crop_margin_frac) if w and h else None
    if box is None:
        logger.debug("empty lung mask: variants fall back to the whole image")
    masked = apply_mask(img, mask) if box is not None and any(spec.masked for spec in specs) else None

    def region(spec: VariantSpec) -> tuple[np.ndarray, np.ndarray | None, str]:
        """(pixels, roi, histogram key): roi is the lung mask for masked regions, else None.

        Every masked region holds all lung pixels, so they share one histogram ("lung").
        """
        if box is None:
            return img, None, "full"
        pixels, roi = (masked, mask) if spec.masked else (img, None)
        if spec.cropped:
            x0, y0, x1, y1 = box
            pixels = pixels[y0:y1, x0:x1]
            roi = None if roi is None else roi[y0:y1, x0:x1]
        return pixels, roi, "lung" if spec.masked else spec.region

    luts: dict[str, np.ndarray | None] = {}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        pixels, roi, key = region(spec)
        if spec.contrast == "eq":
            if key not in luts:
                luts[key] = equalize_lut(histogram(pixels, roi=roi), pixels.dtype)
            pixels = apply_lut(pixels, luts[key], roi=roi)
        elif spec.contrast == "clahe":
            pixels = clahe(pixels, clip=cfg.clahe_clip, tiles=cfg.clahe_tiles, roi=roi)
        if cfg.pad_square and spec.cropped:
            pixels = pad_to_square(pixels)
        out[spec.name] = np.ascontiguousarray(resize_output(pixels, cfg))
    return out


def make_variant(
    img: np.ndarray, mask: np.ndarray, spec: VariantSpec, cfg: VariantConfig = VariantConfig()
) -> np.ndarray:
    """One variant; see ``make_variants`` for shapes, dtypes and the empty-mask fallback."""
    return make_variants(img, mask, (spec.name,), cfg)[spec.name]
