"""Deliberate damage to an X-ray and its lung mask, to fit and to measure `pipeline.quality` on bad input.

    degrade(img, mask, kind, strength) -> (img, mask)

img: uint8 or uint16 (H, W); mask: uint8 (H, W) {0, 255}, the ground truth. Geometry (crop, shift)
moves both; intensity damage (noise, blur, inversion, contrast) leaves the mask as it is. `strength`
in [0, 1] scales each kind from mild to severe. Every kind is deterministic given its arguments
(noise takes a seeded generator).
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("noise", "blur", "crop", "shift", "invert", "contrast")
NOISE_SIGMA = (0.03, 0.35)  # Gaussian noise, fraction of the full range, at strength 0 and 1
BLUR_SIGMA = (0.005, 0.04)  # Gaussian blur sigma, fraction of the longer side
CROP_KEEP = (0.85, 0.45)  # side of the kept window, fraction of the image side
SHIFT = (0.08, 0.4)  # translation, fraction of the side, filled with black
CONTRAST_KEEP = (0.3, 0.03)  # share of the full range kept, with a gamma from GAMMA
GAMMA = (1.5, 3.0)


def _lerp(pair: tuple[float, float], t: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * t


def degrade(img: np.ndarray, mask: np.ndarray, kind: str, strength: float, *,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(img, mask) -> damaged (img, mask), see the module docstring. `rng` draws noise and crop/shift
    directions (default: seeded with 0)."""
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16) or mask.shape != img.shape:
        raise ValueError(f"expected a uint8/uint16 (H, W) image and a mask of its shape, got {img.dtype} {img.shape}, {mask.shape}")
    if kind not in KINDS:
        raise ValueError(f"expected a kind in {KINDS}, got {kind!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"expected strength in [0, 1], got {strength}")
    rng = rng or np.random.default_rng(0)
    top = float(np.iinfo(img.dtype).max)
    h, w = img.shape
    if kind == "noise":
        x = img.astype(np.float32) + rng.normal(0.0, _lerp(NOISE_SIGMA, strength) * top, img.shape).astype(np.float32)
        return np.clip(np.rint(x), 0, top).astype(img.dtype), mask
    if kind == "blur":
        sigma = _lerp(BLUR_SIGMA, strength) * max(h, w)
        return cv2.GaussianBlur(img, (0, 0), sigma), mask
    if kind == "invert":  # polarity inverted; strength plays no part
        return (top - img).astype(img.dtype), mask
    if kind == "contrast":
        x = (img.astype(np.float32) / top) ** _lerp(GAMMA, strength)
        keep = _lerp(CONTRAST_KEEP, strength)
        x = x * keep + rng.uniform(0.0, 1.0 - keep)
        return np.rint(x * top).astype(img.dtype), mask
    if kind == "crop":
        keep = _lerp(CROP_KEEP, strength)
        ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return img[y0:y0 + ch, x0:x0 + cw].copy(), mask[y0:y0 + ch, x0:x0 + cw].copy()
    # shift: the field of view moved, what leaves the frame is lost and black comes in
    angle = rng.uniform(0.0, 2.0 * np.pi)
    dx, dy = _lerp(SHIFT, strength) * w * np.cos(angle), _lerp(SHIFT, strength) * h * np.sin(angle)
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    moved_mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    return moved, moved_mask
