"""How far to trust a mask: `quality_score`, an estimate of its Dice against a radiologist's outline.

    quality_features(lung_prob, lung_prob_flip, stats, threshold) -> float32 (N_FEATURES,)
    quality_score(features, model) -> float in [0, 1]

The signals are what the job has anyway, at the model's resolution (S x S), plus a second view on the
same inference (the segmenter also runs the image mirrored left-right and mirrors the answer back;
`--no-mirror-view` skips it, which saves half of the model's cost on a CPU, and the score then comes
from the other six signals with constants fitted without it: `VIEWS`):

    flip_dice        Dice of the mask with the mirrored view's: a model that is sure of the lungs
                     finds them the same way in both; on noise, blur or an odd field of view they differ
    border_share     uncertain pixels (probability between UNSURE_LOW and UNSURE_HIGH) per lung pixel:
                     a sharp outline has a thin uncertain rim, a doubtful one a wide band
    confidence       mean probability inside the mask
    lung_fraction    the refined mask's share of the image
    balance          smaller lung / larger lung (0 when one side is empty)
    solidity         mask area / area of the components' convex hulls (lungs are nearly convex)
    two_lungs        1 when the refined mask has exactly two components

`quality_score` is a logistic function of the signals its constants name (each through a fixed transform, then standardized):
the Dice predicted = sigmoid(b + w . z). The constants are fitted on COVID-QU-Ex Train (the clean images
and deliberately degraded copies; `pipeline.degrade`) and the threshold of `QC_LOW_QUALITY` is tuned
on Val, by scripts/fit_quality.py, and shipped in the lung model's metadata (`ModelMeta.quality`), so a
score always belongs to the model whose masks it scores. The model card reports how well it ranks and
flags masks on sets it never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.evaluate import dice
from pipeline.model_input import PROB_SCALE
from pipeline.refine import MaskStats

QC_LOW_QUALITY = "low_quality"  # quality_score below the model's threshold: the mask is probably poor
UNSURE_LOW, UNSURE_HIGH = 0.1, 0.9  # a probability strictly between these is "uncertain"
FEATURES = ("flip_dice", "border_share", "confidence", "lung_fraction", "balance", "solidity", "two_lungs")
N_FEATURES = len(FEATURES)
MIRROR_VIEW, ONE_VIEW = "mirror", "one_view"  # keys of ModelMeta.quality: constants with and without flip_dice
VIEWS = {MIRROR_VIEW: FEATURES, ONE_VIEW: FEATURES[1:]}
EPS = 1e-3  # keeps the log transforms finite


@dataclass(frozen=True)
class QualityModel:
    """The fitted constants: sigmoid(bias + weights . (transform(features) - mean) / scale), over `features`."""

    mean: tuple[float, ...]  # per feature used
    scale: tuple[float, ...]  # per feature used, > 0
    weights: tuple[float, ...]  # per feature used
    bias: float
    threshold: float  # quality_score below this -> QC_LOW_QUALITY
    fitted: dict  # how they were fitted: data, command, sizes, validation figures
    features: tuple[str, ...] = FEATURES  # which of FEATURES, in that order

    def __post_init__(self) -> None:
        if not set(self.features) <= set(FEATURES) or list(self.features) != [f for f in FEATURES if f in self.features]:
            raise ValueError(f"expected features from {FEATURES} in that order, got {self.features}")
        if not (len(self.mean) == len(self.scale) == len(self.weights) == len(self.features)):
            raise ValueError(f"expected {len(self.features)} constants per feature {self.features}, got "
                             f"{len(self.mean)}, {len(self.scale)}, {len(self.weights)}")
        if min(self.scale) <= 0 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"expected scales > 0 and a threshold in [0, 1], got {self.scale} and {self.threshold}")

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "threshold": self.threshold, "fitted": self.fitted}

    @classmethod
    def from_dict(cls, d: dict) -> QualityModel:
        if not set(d.get("features", [])) <= set(FEATURES):
            raise ValueError(f"quality constants are for features {d.get('features')}, this version computes {list(FEATURES)}")
        return cls(mean=tuple(d["mean"]), scale=tuple(d["scale"]), weights=tuple(d["weights"]), bias=float(d["bias"]),
                   threshold=float(d["threshold"]), fitted=dict(d.get("fitted", {})), features=tuple(d["features"]))


def quality_model(meta_quality: dict, *, mirror_view: bool) -> QualityModel | None:
    """The constants for the job's views from a model's `ModelMeta.quality` ({MIRROR_VIEW: ..., ONE_VIEW: ...});
    None when the model has none."""
    view = MIRROR_VIEW if mirror_view else ONE_VIEW
    return QualityModel.from_dict(meta_quality[view]) if view in meta_quality else None


def _solidity(mask: np.ndarray) -> float:
    """Mask area / summed convex hull area of its outer contours; 0 for an empty mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = sum(cv2.contourArea(cv2.convexHull(c)) for c in contours)
    return 0.0 if hull <= 0 else min(1.0, float(np.count_nonzero(mask)) / hull)


def quality_features(lung_prob: np.ndarray, lung_prob_flip: np.ndarray | None, stats: MaskStats, threshold: float
                     ) -> np.ndarray:
    """uint8 (S, S) probability of the image and of its mirrored view (mirrored back; None without that view:
    flip_dice is NaN), the refined mask's stats, the model's threshold -> float32 (N_FEATURES,) in FEATURES order."""
    if lung_prob.ndim != 2 or (lung_prob_flip is not None and lung_prob.shape != lung_prob_flip.shape):
        got = None if lung_prob_flip is None else lung_prob_flip.shape
        raise ValueError(f"expected two probability maps of one (S, S) shape, got {lung_prob.shape} and {got}")
    level = math.ceil(threshold * PROB_SCALE - 1e-9)
    mask = lung_prob >= level
    n_lung = int(np.count_nonzero(mask))
    unsure = np.count_nonzero((lung_prob > UNSURE_LOW * PROB_SCALE) & (lung_prob < UNSURE_HIGH * PROB_SCALE))
    sides = sorted((stats.right_lung_fraction, stats.left_lung_fraction))
    return np.array([
        np.nan if lung_prob_flip is None else dice(mask, lung_prob_flip >= level),
        unsure / max(n_lung, 1),
        float(lung_prob[mask].mean()) / PROB_SCALE if n_lung else 0.0,
        stats.lung_fraction,
        sides[0] / sides[1] if sides[1] > 0 else 0.0,
        _solidity(mask.view(np.uint8)),
        float(stats.n_components == 2),
    ], np.float32)


def transform_features(features: np.ndarray) -> np.ndarray:
    """float (..., N_FEATURES) -> float64 (..., N_FEATURES): the scale on which the score is linear.

    Agreement and confidence as log(1 - x) (the difference between 0.98 and 0.99 matters, between 0.5 and
    0.51 not), the uncertain rim as log, the rest as they are.
    """
    f = np.asarray(features, np.float64)
    out = f.copy()
    out[..., 0] = np.log(1.0 - np.clip(f[..., 0], 0.0, 1.0) + EPS)  # flip_dice
    out[..., 1] = np.log(f[..., 1] + EPS)  # border_share
    out[..., 2] = np.log(1.0 - np.clip(f[..., 2], 0.0, 1.0) + EPS)  # confidence
    out[..., 5] = np.log(1.0 - np.clip(f[..., 5], 0.0, 1.0) + EPS)  # solidity
    return out


def quality_score(features: np.ndarray, model: QualityModel) -> float | np.ndarray:
    """float (N_FEATURES,) or (N, N_FEATURES) -> the predicted Dice in [0, 1] (a float, or float64 (N,)), from
    the features the model names."""
    used = [FEATURES.index(f) for f in model.features]
    z = (transform_features(features)[..., used] - np.asarray(model.mean)) / np.asarray(model.scale)
    logit = model.bias + z @ np.asarray(model.weights)
    score = 1.0 / (1.0 + np.exp(-np.clip(logit, -50.0, 50.0)))
    return float(score) if np.ndim(score) == 0 else score
