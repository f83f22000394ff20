"""Image orientation: the 8 ways (dihedral group D4) an upright chest film can arrive turned or mirrored.

This module does not import torch: the transforms, the QC flag names and the decision rule run in
the CPU workers; the classifier that produces the probabilities is `pipeline.orient_net`.

Orientation k in 0..7 names how the image seen was made from the upright PA/AP film:

    seen = np.rot90(np.fliplr(upright) if k >= 4 else upright, k % 4)

i.e. mirror left-right first (k >= 4), then turn k % 4 quarter turns COUNTER-clockwise (np.rot90).
k = 0 is upright. Example, k = 1 (one counter-clockwise quarter turn, flagged "rotated_270"):

    upright      seen (k=1)
    a b c        c f
    d e f        b e
                 a d

QC flags (`flags`): "rotated_90" means the image seen is the upright film turned 90 degrees CLOCKWISE
(k % 4 == 3); "rotated_180" is k % 4 == 2; "rotated_270" is turned 270 degrees clockwise, which is
one counter-clockwise turn (k % 4 == 1); "mirrored" means flipped left-right before any turn (k >= 4):
on the upright-turned view the heart lies on the image's left instead of its right. Flags list the
rotation first and "mirrored" last.
"""

from __future__ import annotations

import numpy as np

N_ORIENTATIONS = 8  # elements of D4: 4 quarter turns x (plain, mirrored)
UPRIGHT = 0  # the orientation that raises no flag
MIRROR_FROM = 4  # k >= MIRROR_FROM: mirrored left-right before the turn

QC_ROTATED_90 = "rotated_90"  # the upright film turned 90 degrees clockwise (k % 4 == 3)
QC_ROTATED_180 = "rotated_180"  # turned 180 degrees (k % 4 == 2)
QC_ROTATED_270 = "rotated_270"  # turned 270 degrees clockwise = 90 counter-clockwise (k % 4 == 1)
QC_MIRRORED = "mirrored"  # flipped left-right (heart on the image's left), k >= 4
ORIENTATION_FLAGS = (QC_ROTATED_90, QC_ROTATED_180, QC_ROTATED_270, QC_MIRRORED)

_ROTATION_FLAG = {0: None, 1: QC_ROTATED_270, 2: QC_ROTATED_180, 3: QC_ROTATED_90}  # k % 4 -> flag


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < N_ORIENTATIONS:
        raise ValueError(f"expected an orientation k in 0..{N_ORIENTATIONS - 1}, got {k!r}")
    return int(k)


def transform(img: np.ndarray, k: int) -> np.ndarray:
    """(H, W) any dtype -> the upright `img` seen in orientation k: (H, W) for k % 4 in {0, 2}, else (W, H).

    `np.rot90(np.fliplr(img) if k >= 4 else img, k % 4)`, returned C-contiguous; values are only moved.
    """
    k = _check_k(k)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    x = np.fliplr(img) if k >= MIRROR_FROM else img
    return np.ascontiguousarray(np.rot90(x, k % 4))


def undo(img: np.ndarray, k: int) -> np.ndarray:
    """The inverse of `transform`: undo(transform(x, k), k) == x exactly, for any 2-D array; C-contiguous."""
    k = _check_k(k)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    x = np.rot90(img, -(k % 4))
    return np.ascontiguousarray(np.fliplr(x) if k >= MIRROR_FROM else x)


def flags(k: int) -> tuple[str, ...]:
    """The QC flags of orientation k: () for 0, e.g. ("rotated_270",) for 1, ("mirrored",) for 4,
    ("rotated_270", "mirrored") for 5; the rotation first, "mirrored" last."""
    k = _check_k(k)
    rotation = _ROTATION_FLAG[k % 4]
    return ((rotation,) if rotation else ()) + ((QC_MIRRORED,) if k >= MIRROR_FROM else ())


def decide(probs: np.ndarray, *, threshold: float) -> np.ndarray:
    """float (N, 8) class probabilities -> int64 (N,) orientation to report per image, in 0..7.

    0 (upright) unless P(upright) = probs[:, 0] < `threshold`; then the most probable of the 7 others.
    A low threshold trades missed turns for fewer false alarms on upright images; the shipped value
    is in the orientation model's metadata (`pipeline.orient_net`).
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != N_ORIENTATIONS:
        raise ValueError(f"expected probabilities of shape (N, {N_ORIENTATIONS}), got {probs.shape}")
    out = np.zeros(len(probs), np.int64)
    turned = probs[:, UPRIGHT] < threshold
    out[turned] = 1 + np.argmax(probs[turned, 1:], axis=1)
    return out
