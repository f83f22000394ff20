"""Mask refinement: UNET lung probability at the model's resolution -> clean binary mask at the source's.

The seed notebook repaired its 256x256 masks with vertical and horizontal closing and dropped
components under 800 px. Here every length and area is a fraction of the image size, so one
``RefineConfig`` gives the same result at 256 px and at 3000 px:

    probability (S, S) --bilinear--> (H, W) --threshold--> close vertical --> close horizontal
    --> fill holes --> drop small components --> keep the n largest

The probability arrives as the segmenter sends it, uint8 round(p * 255) (`pipeline.model_input`);
it is upsampled as uint8 and compared with ceil(threshold * 255), which is the float test p >= threshold
up to the quantization (masks agree with the float path to Dice >= 0.999; docs/BENCHMARKS.md).
Component selection labels once (16-bit labels) and its areas give the mask's statistics, so the
QC numbers cost nothing more.

Topology: foreground components are 8-connected, background (and so holes) 4-connected, the
usual dual pair, so a pixel enclosed only diagonally counts as enclosed.

Timing, one core, 2090x1989 from 256x256: upsample + threshold 2 ms, two closings 9 ms, hole filling
4 ms, labelling and selection 6 ms (connectedComponentsWithStats alone took 29 ms: its statistics
pass is slow, so areas come from a histogram of the labels instead).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.model_input import DEFAULT_THRESHOLD, PROB_SCALE, probability_to_u8

logger = logging.getLogger(__name__)

LUNG = 255  # mask value of a lung pixel
BACKGROUND = 0  # mask value of everything else
FOREGROUND_CONNECTIVITY = 8  # components of the mask are 8-connected
BACKGROUND_CONNECTIVITY = 4  # holes are 4-connected (the dual of 8)

EXACT_FLOAT32_COUNT = 1 << 24  # calcHist counts in float32: exact below this many pixels

QC_NO_LUNGS = "no_lungs"
QC_ONE_LUNG = "one_lung"
QC_SMALL_LUNG_AREA = "small_lung_area"
QC_LARGE_LUNG_AREA = "large_lung_area"
QC_FLAGS = (QC_NO_LUNGS, QC_ONE_LUNG, QC_SMALL_LUNG_AREA, QC_LARGE_LUNG_AREA)


@dataclass(frozen=True)
class RefineConfig:
    """How a lung probability becomes a mask, and which masks QC calls suspicious."""

    threshold: float | None = None  # probability in (0, 1] at/above which a pixel is lung; None = the model's
    close_frac: float = 0.025  # closing line length, fraction of image height (vertical) / width (horizontal); 7 px at 256
    min_area_frac: float = 0.012  # components under this fraction of the image area are dropped (seed: 800 px at 256x256)
    max_components: int = 2  # keep at most the n largest components (the two lungs)
    small_area_frac: float = 0.10  # QC: total lung area under this fraction of the image is suspicious (adult PA: ~0.15-0.45)
    large_area_frac: float = 0.55  # QC: total lung area over this fraction of the image is suspicious

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.close_frac < 1.0:
            raise ValueError(f"close_frac must be in [0, 1), got {self.close_frac}")
        if not 0.0 <= self.min_area_frac < 1.0:
            raise ValueError(f"min_area_frac must be in [0, 1), got {self.min_area_frac}")
        if self.max_components < 1:
            raise ValueError(f"max_components must be >= 1, got {self.max_components}")
        if not 0.0 <= self.small_area_frac < self.large_area_frac <= 1.0:
            raise ValueError(
                "expected 0 <= small_area_frac < large_area_frac <= 1, "
                f"got {self.small_area_frac} and {self.large_area_frac}"
            )


@dataclass(frozen=True)
class MaskStats:
    """Summary of a refined mask, for QC and for cropping."""

    lung_fraction: float  # lung pixels / all pixels, in [0, 1]
    n_components: int  # 8-connected lung components
    bbox: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), end exclusive, source pixels; None when empty
    right_lung_fraction: float = 0.0  # pixels of the patient's right lung / all pixels (`lung_sides`)
    left_lung_fraction: float = 0.0  # pixels of the patient's left lung / all pixels


# Which lung a component is: on a frontal film viewed as radiographs are read (PA or AP, the patient
# facing the viewer), the patient's right lung is on the image's left.
RIGHT_LUNG = 1  # `lung_sides` value of the patient's right lung
LEFT_LUNG = 2  # ... and of the left lung
SIDE_GRID_PX = 256  # centroids for the sides are taken on a grid of about this many px a side


# --- checks ---------------------------------------------------------------------------------


def _check_mask(mask: np.ndarray) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"expected a uint8 (H, W) mask with values {{0, 255}}, got {got}")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"expected a shape (H, W) of two positive ints, got {shape!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"expected a shape (H, W) of two positive ints, got {shape!r}")
    return h, w


def line_length_px(frac: float, side: int) -> int:
    """Smallest odd length >= ``frac * side``, at least 1: a line kernel centred on its pixel.

    >>> line_length_px(0.025, 256), line_length_px(0.025, 3000), line_length_px(0.0, 256)
    (7, 75, 1)
    """
    return max(1, 2 * math.ceil((frac * side - 1) / 2) + 1)


# --- steps ----------------------------------------------------------------------------------


def upsample_probability(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a probability map (pixel-centre aligned), so edges stay smooth.

    prob: float (S, S') in [0, 1], or uint8 round(p * 255); shape: (H, W). Returns float32 (H, W) in
    [0, 1] for float input, uint8 for uint8 input (bilinear interpolation never leaves the input's range).
    """
    if not isinstance(prob, np.ndarray) or prob.ndim != 2:
        got = prob.shape if isinstance(prob, np.ndarray) else type(prob).__name__
        raise ValueError(f"expected a 2-D probability map, got {got}")
    h, w = _check_shape(shape)
    if prob.dtype != np.uint8:
        prob = prob.astype(np.float32, copy=False)
    if prob.shape == (h, w):
        return prob.copy()
    return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)


def threshold_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Probability (H, W) -> uint8 (H, W) mask, 255 where ``prob >= threshold`` else 0.

    float prob is compared with ``threshold``; uint8 prob (p * 255, rounded) with ceil(threshold * 255).
    """
    if not isinstance(prob, np.ndarray) or prob.ndim != 2:
        got = prob.shape if isinstance(prob, np.ndarray) else type(prob).__name__
        raise ValueError(f"expected a 2-D probability map, got {got}")
    if prob.dtype == np.uint8:
        level = math.ceil(threshold * PROB_SCALE - 1e-9)  # the first uint8 level at or above the threshold
        return cv2.compare(prob, level, cv2.CMP_GE)
    mask = np.greater_equal(prob, threshold).view(np.uint8)
    return mask * np.uint8(LUNG)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not reach the border (flood fill from outside).

    uint8 (H, W) {0, 255} -> same. A gap that opens to the border is not a hole::

        before        after         before        after
        # # # # #     # # # # #     # # # # #     # # # # #
        # . . . #     # # # # #     # . . . .     # . . . .
        # . . . #  -> # # # # #     # . . . #  -> # . . . #
        # # # # #     # # # # #     # # # # #     # # # # #
    """
    _check_mask(mask)
    outside = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=BACKGROUND)
    # Everything reachable from the frame (4-connected) becomes LUNG; what stays 0 is a hole.
    cv2.floodFill(outside, None, (0, 0), LUNG, flags=BACKGROUND_CONNECTIVITY)
    holes = cv2.bitwise_not(outside[1:-1, 1:-1])
    return cv2.bitwise_or(mask, holes)


def _close_line(mask: np.ndarray, *, length_px: int, vertical: bool) -> np.ndarray:
    _check_mask(mask)
    if length_px < 1 or length_px % 2 == 0:
        raise ValueError(f"expected an odd length_px >= 1 (a centred line), got {length_px}")
    if length_px == 1:
        return mask.copy()
    r = length_px // 2
    # Pad with background so the outside is plain background: with OpenCV's default border
    # the erosion sees lung outside the frame, and anything within r px of the edge would be
    # glued to it; a zero border instead would erode lung that touches the edge.
    pad = (r, r, 0, 0) if vertical else (0, 0, r, r)
    padded = cv2.copyMakeBorder(mask, *pad, cv2.BORDER_CONSTANT, value=BACKGROUND)
    ksize = (1, length_px) if vertical else (length_px, 1)  # (width, height)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, ksize)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
    h, w = mask.shape
    return closed[pad[0] : pad[0] + h, pad[2] : pad[2] + w].copy()


def close_vertical(mask: np.ndarray, *, length_px: int) -> np.ndarray:
    """Closing with a vertical line of ``length_px`` (odd): bridges vertical gaps up to length_px - 1.

    uint8 (H, W) {0, 255} -> same; never removes a lung pixel. With length_px=3::

        before    after       before    after
        . # .     . # .       . # .     . # .
        . . .  -> . # .       . . .  -> . . .
        . . .     . # .       . . .     . . .
        . # .     . # .       . . .     . . .
        . . .     . . .       . # .     . # .
                  (gap 2: bridged)      (gap 3: stays; nothing grows to the edge)
    """
    return _close_line(mask, length_px=length_px, vertical=True)


def close_horizontal(mask: np.ndarray, *, length_px: int) -> np.ndarray:
    """Closing with a horizontal line of ``length_px`` (odd): bridges horizontal gaps up to length_px - 1.

    uint8 (H, W) {0, 255} -> same; never removes a lung pixel. With length_px=3::

        before            after
        # . . # . . . #   # # # # . . . #
                          (gap 2 bridged, gap 3 stays)
    """
    return _close_line(mask, length_px=length_px, vertical=False)


def _labels(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(number of labels incl. background, labels, area of each label) of the 8-connected components.

    16-bit labels and a histogram of them: 8x faster than connectedComponentsWithStats at 2k x 2k.
    A mask with 65535 or more components (noise, not lungs) takes 32-bit labels.
    """
    try:
        n_labels, labels = cv2.connectedComponents(mask, connectivity=FOREGROUND_CONNECTIVITY, ltype=cv2.CV_16U)
    except cv2.error:  # "Total number of labels overflowed label type"
        n_labels, labels = cv2.connectedComponents(mask, connectivity=FOREGROUND_CONNECTIVITY, ltype=cv2.CV_32S)
    if labels.dtype == np.uint16 and mask.size < EXACT_FLOAT32_COUNT:
        areas = cv2.calcHist([labels], [0], None, [n_labels], [0, n_labels]).ravel().astype(np.int64)
    else:
        areas = np.bincount(labels.ravel(), minlength=n_labels)
    return n_labels, labels, areas


def _top_left(labels: np.ndarray, label: int) -> tuple[int, int]:
    x, y, _, _ = cv2.boundingRect(cv2.compare(labels, label, cv2.CMP_EQ))
    return y, x


def _select_components(
    mask: np.ndarray, *, min_area_px: float = 0.0, n: int | None = None
) -> tuple[np.ndarray, MaskStats]:
    """Keep 8-connected components with area >= min_area_px, then at most the n largest.

    Ties in area go to the component whose bounding box starts higher, then further left
    (OpenCV's label order is not raster order). One labelling pass; returns the mask and its stats.
    """
    _check_mask(mask)
    n_labels, labels, areas = _labels(mask)
    ranked = sorted(range(1, n_labels), key=lambda k: -areas[k])
    if n is not None and len(ranked) > n and areas[ranked[n - 1]] == areas[ranked[n]]:  # a tie at the cut
        ranked = sorted(ranked, key=lambda k: (-areas[k], *_top_left(labels, k)))
    kept = [k for k in ranked[:n] if areas[k] >= min_area_px]
    if len(kept) == n_labels - 1:
        out = (mask > 0).view(np.uint8) * np.uint8(LUNG)
    else:
        out = np.zeros_like(mask)
        for k in kept:
            cv2.bitwise_or(out, cv2.compare(labels, k, cv2.CMP_EQ), dst=out)
    sides = _sides(labels, n_labels)
    side_px = {side: sum(int(areas[k]) for k in kept if sides[k] == side) for side in (RIGHT_LUNG, LEFT_LUNG)}
    stats = MaskStats(
        lung_fraction=float(sum(areas[k] for k in kept)) / mask.size,
        n_components=len(kept),
        bbox=mask_bbox(out),
        right_lung_fraction=side_px[RIGHT_LUNG] / mask.size,
        left_lung_fraction=side_px[LEFT_LUNG] / mask.size,
    )
    return out, stats


def _sides(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """int (n_labels,): RIGHT_LUNG or LEFT_LUNG per label (index 0, the background: 0), by its centroid's column.

    A frontal film is viewed with the patient facing the viewer, so the patient's right lung is on the
    image's left: a component whose centroid lies left of the image's centre line is the right lung
    (a mirrored image breaks this; the orientation check flags it). Centroids come from every
    SIDE_STEP-th pixel of images over SIDE_GRID_PX px (0.1 ms at 2k x 2k instead of 8 ms exact;
    components too small to be sampled are measured exactly).
    """
    h, w = labels.shape
    step = max(1, min(h, w) // SIDE_GRID_PX)
    grid = labels[::step, ::step]
    columns = np.broadcast_to(np.arange(0, w, step, dtype=np.float64), grid.shape)
    count = np.bincount(grid.ravel(), minlength=n_labels)
    x_sum = np.bincount(grid.ravel(), weights=columns.ravel(), minlength=n_labels)
    sides = np.zeros(n_labels, np.int64)
    for k in range(1, n_labels):
        if count[k]:
            cx = x_sum[k] / count[k]
        else:
            m = cv2.moments(cv2.compare(labels, k, cv2.CMP_EQ), binaryImage=True)
            cx = m["m10"] / m["m00"]
        sides[k] = RIGHT_LUNG if cx < (w - 1) / 2 else LEFT_LUNG
    return sides


def lung_sides(mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W) {0, 255} lung mask -> uint8 (H, W) labels: 0 background, RIGHT_LUNG / LEFT_LUNG per component.

    The rule the job uses for right_lung_fraction / left_lung_fraction (`_sides`), for a mask read
    back from the output::

        mask              sides
        # # . . # #       1 1 . . 2 2
        # # . . # #  ->   1 1 . . 2 2
    """
    _check_mask(mask)
    n_labels, labels, _ = _labels(mask)
    return _sides(labels, n_labels).astype(np.uint8)[labels]


def drop_small_components(mask: np.ndarray, *, min_area_px: float) -> np.ndarray:
    """Remove 8-connected components with fewer than ``min_area_px`` pixels.

    uint8 (H, W) {0, 255} -> same. With min_area_px=3::

        before        after
        # # . . #     # # . . .
        # . . . .  -> # . . . .
        . . . # .     . . . . .
        . . # . .     . . . . .     (the diagonal pair has 2 px: dropped)
    """
    if min_area_px < 0:
        raise ValueError(f"expected min_area_px >= 0, got {min_area_px}")
    return _select_components(mask, min_area_px=min_area_px)[0]


def keep_largest_components(mask: np.ndarray, *, n: int) -> np.ndarray:
    """Keep the ``n`` largest 8-connected components (ties: higher bounding-box top, then left).

    uint8 (H, W) {0, 255} -> same. With n=2::

        before        after
        # # . # .     # # . . .
        # # . . .  -> # # . . .
        . . . # #     . . . # #
    """
    if n < 1:
        raise ValueError(f"expected n >= 1, got {n}")
    return _select_components(mask, n=n)[0]


# --- the stage ------------------------------------------------------------------------------


def refine(
    prob: np.ndarray, shape: tuple[int, int], cfg: RefineConfig = RefineConfig()
) -> tuple[np.ndarray, MaskStats]:
    """Lung probability at the model's resolution -> clean lung mask at the source resolution, and its stats.

    prob: uint8 (S, S), round(p * 255), as the segmenter sends it (float (S, S) in [0, 1] is quantized
    the same way first); shape: (H, W) of the source image. Returns uint8 (H, W), values {0, 255}, which
    may be all 0 when no lungs were found (QC flags it), and its MaskStats.

    Steps: bilinear upsample, threshold (``cfg.threshold``; None = DEFAULT_THRESHOLD, the job passes
    the model's), close vertically then horizontally (lines of ``close_frac`` of the height / width),
    fill holes (those of the model and those the closing enclosed), drop components under
    ``min_area_frac`` of the image, keep the ``max_components`` largest.
    """
    h, w = _check_shape(shape)
    if prob.dtype != np.uint8:
        prob = probability_to_u8(prob)
    threshold = DEFAULT_THRESHOLD if cfg.threshold is None else cfg.threshold
    mask = threshold_mask(upsample_probability(prob, (h, w)), threshold)
    # No hole filling before the closing: a hole's 4-neighbours are all lung, so no gap that a
    # line closing bridges can end in one; filling once afterwards gives the identical mask
    # (tested) and saves a full-frame flood fill.
    mask = close_vertical(mask, length_px=line_length_px(cfg.close_frac, h))
    mask = close_horizontal(mask, length_px=line_length_px(cfg.close_frac, w))
    mask = fill_holes(mask)
    return _select_components(mask, min_area_px=cfg.min_area_frac * h * w, n=cfg.max_components)


def refine_mask(
    prob: np.ndarray, shape: tuple[int, int], cfg: RefineConfig = RefineConfig()
) -> np.ndarray:
    """The mask of ``refine`` alone: uint8 (H, W), values {0, 255}."""
    return refine(prob, shape, cfg)[0]


# --- QC -------------------------------------------------------------------------------------


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the lung pixels as (x0, y0, x1, y1), end exclusive; None for an empty mask."""
    _check_mask(mask)
    x, y, bw, bh = cv2.boundingRect(mask)
    if bw == 0 or bh == 0:
        return None
    return (x, y, x + bw, y + bh)


def mask_stats(mask: np.ndarray) -> MaskStats:
    """Lung fraction, 8-connected component count and bounding box of any uint8 (H, W) {0, 255} mask."""
    return _select_components(mask)[1]


def qc_flags(stats: MaskStats, cfg: RefineConfig = RefineConfig()) -> tuple[str, ...]:
    """QC flags for a refined mask, in the order of ``QC_FLAGS``; empty when nothing is suspicious.

    "no_lungs" alone for an empty mask (the other flags would only restate it); "one_lung" for a
    single component; "small_lung_area" / "large_lung_area" when the total lung fraction is
    below ``small_area_frac`` / above ``large_area_frac``.
    """
    if stats.n_components == 0:
        return (QC_NO_LUNGS,)
    flags: list[str] = []
    if stats.n_components == 1:
        flags.append(QC_ONE_LUNG)
    if stats.lung_fraction < cfg.small_area_frac:
        flags.append(QC_SMALL_LUNG_AREA)
    if stats.lung_fraction > cfg.large_area_frac:
        flags.append(QC_LARGE_LUNG_AREA)
    return tuple(flags)
