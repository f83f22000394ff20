"""Scoring predicted lung masks against ground truth at the source resolution.

The predicted masks come from the real pipeline (decode, segment, refine); see jobs/evaluate.py.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.png import decode_png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", "")
OVERLAY_COLOR_TRUTH = (0, 255, 0)  # BGR: ground-truth outline
OVERLAY_COLOR_PRED = (0, 0, 255)  # BGR: predicted outline
SHEET_TILE_PX = 256  # side of one tile in the contact sheet


@dataclass(frozen=True)
class LabelledSet:
    name: str  # short name used in the report, e.g. "jsrt"
    root: str  # folder holding images/ and masks/
    split: str | None = None  # keep only this split of root/manifest.csv (e.g. "Val"); None = all images


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (any nonzero = lung) of the same shape; 1.0 when both are empty."""
    if pred.shape != truth.shape:
        raise ValueError(f"expected masks of the same shape, got {pred.shape} and {truth.shape}")
    p, t = pred > 0, truth > 0
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two masks of the same shape; 1.0 when both are empty."""
    if pred.shape != truth.shape:
        raise ValueError(f"expected masks of the same shape, got {pred.shape} and {truth.shape}")
    p, t = pred > 0, truth > 0
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def image_mask_pairs(s: LabelledSet) -> list[tuple[str, str]]:
    """(image path, mask path) pairs of a set: manifest.csv when present, else matching stems."""
    root = Path(s.root)
    manifest = root / "manifest.csv"
    if manifest.exists():
        with manifest.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if s.split is None or r.get("split") == s.split]
        return [(str(root / r["image"]), str(root / r["mask"])) for r in rows]
    if s.split is not None:
        raise ValueError(f"split {s.split!r} asked for, but {manifest} does not exist")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file()}
    pairs = []
    for img in sorted((root / "images").iterdir()):
        if img.is_file() and img.stem in masks:
            pairs.append((str(img), str(masks[img.stem])))
    if not pairs:
        raise ValueError(f"no image/mask pairs with matching names under {root}/images and {root}/masks")
    return pairs


def read_mask(path: str) -> np.ndarray:
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read mask {path}")
    return mask


def score(pred_png: bytes, truth_path: str) -> tuple[float, float]:
    """(Dice, IoU) of a predicted mask PNG against the ground-truth mask file."""
    pred, truth = decode_png(pred_png), read_mask(truth_path)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and mask {truth.shape} differ in shape for {truth_path}")
    return dice(pred, truth), iou(pred, truth)


def spearman(a, b) -> float | None:
    """Spearman rank correlation of two equally long sequences (average ranks for ties); None under 3 values
    or when one side is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inverse = np.unique(x, return_inverse=True)
        return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse]

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two 1-D sequences of one length, got {a.shape} and {b.shape}")
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def summarize(dices: list[float]) -> dict:
    a = np.asarray(dices, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "mean_dice": float(a.mean()),
        "median_dice": float(np.median(a)),
        "worst_dice": float(a.min()),
        "p10_dice": float(np.percentile(a, 10)),
    }


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, *, label: str) -> np.ndarray:
    """A BGR tile: the image with the ground truth (green) and prediction (red) outlines, labelled."""
    gray = image if image.dtype == np.uint8 else (image >> 8).astype(np.uint8)
    tile = cv2.cvtColor(cv2.resize(gray, (SHEET_TILE_PX, SHEET_TILE_PX), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    for mask, color in ((truth, OVERLAY_COLOR_TRUTH), (pred, OVERLAY_COLOR_PRED)):
        small = cv2.resize((mask > 0).astype(np.uint8) * 255, (SHEET_TILE_PX, SHEET_TILE_PX), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, color, 1)
    cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    return tile


def contact_sheet(tiles: list[np.ndarray], *, columns: int = 4) -> np.ndarray:
    """Tiles (same shape) laid out row by row on a black canvas."""
    if not tiles:
        raise ValueError("expected at least one tile, got none")
    rows = -(-len(tiles) // columns)
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return sheet


def relative_name(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")
