"""Fit `quality_score` (pipeline.quality) and measure it on sets it never saw.

    PYTHONPATH=. .venv/bin/python scripts/fit_quality.py --data /work/shared/data --cache /tmp/quality \
        [--write pipeline/weights/lung_unet.pt]

Per image, the job's own steps: decode -> prepare_input -> Segmenter (the image and its mirrored view)
-> refine at the source size -> quality_features; Dice against the ground-truth mask at the source size.

Sets (each image once clean; the degraded copies use `pipeline.degrade`, kind and strength drawn per image
from a seeded generator):
    fit        COVID-QU-Ex Train, clean + one degraded copy each (kinds FIT_KINDS)     -> the constants
    tune       COVID-QU-Ex Val, clean + one degraded copy each (FIT_KINDS)             -> the low_quality threshold
    measured   COVID-QU-Ex Val clean; JSRT; Shenzhen; JSRT + Shenzhen degraded, every kind at 3 strengths,
               "contrast" among them though it is never used for fitting or tuning (HELD_OUT_KIND)

Fits one set of constants per view (`pipeline.quality.VIEWS`: with the mirror image's agreement, and
without it for --no-mirror-view). Prints a JSON report per view (Spearman of score vs Dice; of the
images with Dice < 0.90 the share flagged; of those with Dice >= 0.95 the share flagged) and, with
--write, stores the constants in the weights file's metadata (`ModelMeta.quality`), which changes its
sha256 (not its tensors: the cached features are keyed by those).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.decode import decode_image
from pipeline.degrade import KINDS, degrade
from pipeline.evaluate import LabelledSet, dice, image_mask_pairs, read_mask, spearman
from pipeline.model import DEFAULT_WEIGHTS, read_weights, update_meta
from pipeline.model_input import prepare_input
from pipeline.quality import (
    FEATURES,
    VIEWS,
    QualityModel,
    quality_features,
    quality_score,
    transform_features,
)
from pipeline.refine import RefineConfig, refine
from pipeline.segment import Segmenter

log = logging.getLogger("fit_quality")

HELD_OUT_KIND = "contrast"  # never used to fit or tune: measured as an unseen kind of damage
FIT_KINDS = tuple(k for k in KINDS if k != HELD_OUT_KIND)
MEASURE_STRENGTHS = (0.0, 0.5, 1.0)
BAD_DICE, GOOD_DICE = 0.90, 0.95  # the lines: masks to catch, masks to leave alone
MAX_FALSE_FLAGS = 0.04  # tuning: share of Dice >= GOOD_DICE masks flagged on the tune set, at most
RIDGE = 1.0  # L2 penalty of the least-squares fit on standardized features
DICE_CLIP = (0.02, 0.995)  # Dice is clipped to this before its logit is taken
BATCH = 32
SEED = 20261127


def _cases(pairs: list[tuple[str, str]], mode: str, rng: np.random.Generator) -> list[tuple[str, str, str | None, float]]:
    """(image, mask, kind or None, strength) per case: clean, clean + one random degraded copy, or every kind x strength."""
    cases = []
    for img, mask in pairs:
        cases.append((img, mask, None, 0.0))
        if mode == "one":
            cases.append((img, mask, str(rng.choice(FIT_KINDS)), float(rng.uniform(0.0, 1.0))))
        elif mode == "all":
            cases += [(img, mask, kind, s) for kind in KINDS for s in MEASURE_STRENGTHS if not (kind == "invert" and s > 0)]
    return cases


def measure(seg: Segmenter, cases: list, refine_cfg: RefineConfig, seed: int) -> dict[str, np.ndarray]:
    """Features, Dice and kind of every case, through the job's own steps."""
    feats, dices, kinds = [], [], []
    t0 = time.monotonic()
    for start in range(0, len(cases), BATCH):
        chunk = cases[start:start + BATCH]
        images, truths = [], []
        for i, (img_path, mask_path, kind, strength) in enumerate(chunk):
            pixels = decode_image(Path(img_path).read_bytes(), source=img_path).pixels
            truth = read_mask(mask_path)
            if truth.shape != pixels.shape:
                raise ValueError(f"{mask_path}: mask {truth.shape} and image {pixels.shape} differ")
            if kind is not None:
                pixels, truth = degrade(pixels, truth, kind, strength, rng=np.random.default_rng((seed, start + i)))
            images.append(pixels)
            truths.append(truth)
        out = seg({"model_input": np.stack([prepare_input(p, seg.meta) for p in images])})
        for pixels, truth, prob, prob_flip, (_, _, kind, _) in zip(images, truths, out["lung_prob"], out["lung_prob_flip"], chunk):
            mask, stats = refine(prob, pixels.shape, refine_cfg)
            feats.append(quality_features(prob, prob_flip, stats, refine_cfg.threshold))
            dices.append(dice(mask, truth))
            kinds.append(kind or "clean")
        log.info("%d/%d cases, %.0f ms each", start + len(chunk), len(cases), 1000 * (time.monotonic() - t0) / (start + len(chunk)))
    return {"features": np.array(feats, np.float32), "dice": np.array(dices), "kind": np.array(kinds)}


def fit(features: np.ndarray, dices: np.ndarray, used: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge least squares of logit(Dice) on the standardized transformed `used` features -> (mean, scale, weights, bias)."""
    t = transform_features(features)[:, [FEATURES.index(f) for f in used]]
    mean, scale = t.mean(0), t.std(0)
    scale[scale < 1e-9] = 1.0
    z = (t - mean) / scale
    d = np.clip(dices, *DICE_CLIP)
    y = np.log(d / (1.0 - d))
    a = np.hstack([z, np.ones((len(z), 1))])
    penalty = RIDGE * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    coef = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    return mean, scale, coef[:-1], float(coef[-1])


def tensors_sha(weights) -> str:
    """sha256 of the model's tensors (what the features depend on; the file's sha also covers the metadata)."""
    state = torch.load(io.BytesIO(weights.data), map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


def flag_rates(scores: np.ndarray, dices: np.ndarray, threshold: float) -> dict:
    flagged = scores < threshold
    bad, good = dices < BAD_DICE, dices >= GOOD_DICE
    return {"n": len(dices), "n_dice_below_0.90": int(bad.sum()), "n_dice_at_least_0.95": int(good.sum()),
            "flagged_of_dice_below_0.90": float(flagged[bad].mean()) if bad.any() else None,
            "flagged_of_dice_at_least_0.95": float(flagged[good].mean()) if good.any() else None,
            "spearman": spearman(scores, dices),
            "mean_abs_error": float(np.abs(scores - dices).mean())}


def tune_threshold(scores: np.ndarray, dices: np.ndarray) -> float:
    """The highest threshold whose share of flagged Dice >= GOOD_DICE masks stays <= MAX_FALSE_FLAGS."""
    good = np.sort(scores[dices >= GOOD_DICE])
    k = int(np.floor(MAX_FALSE_FLAGS * len(good)))
    return float(good[k]) if k < len(good) else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/shared/data", help="folder with covid-qu-ex/ and external/")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="lung model file")
    ap.add_argument("--cache", default="/tmp/quality", help="folder for the measured features (reused when present)")
    ap.add_argument("--write", default=None, help="store the fitted constants in this weights file's metadata")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    weights = read_weights(args.weights)
    seg = Segmenter(weights, device="cpu", cpu_threads=args.threads)
    refine_cfg = RefineConfig(threshold=weights.meta.threshold)
    data = Path(args.data)
    rng = np.random.default_rng(SEED)
    sets = {
        "fit": (image_mask_pairs(LabelledSet("train", str(data / "covid-qu-ex"), split="Train")), "one"),
        "tune": (image_mask_pairs(LabelledSet("val", str(data / "covid-qu-ex"), split="Val")), "one"),
        "jsrt": (image_mask_pairs(LabelledSet("jsrt", str(data / "external/jsrt"))), "all"),
        "shenzhen": (image_mask_pairs(LabelledSet("shenzhen", str(data / "external/shenzhen"))), "all"),
    }
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    measured, key = {}, tensors_sha(weights)[:12]
    for name, (pairs, mode) in sets.items():
        path = cache / f"{name}_{key}.npz"
        if not path.exists():
            m = measure(seg, _cases(pairs, mode, rng), refine_cfg, seed=SEED + len(name))
            np.savez(path, **m)
        measured[name] = dict(np.load(path))

    fit_set, tune = measured["fit"], measured["tune"]
    external_degraded = {k: np.concatenate([measured["jsrt"][k], measured["shenzhen"][k]]) for k in ("features", "dice", "kind")}
    models, report_all = {}, {}
    for view, used in VIEWS.items():
        mean, scale, w, b = fit(fit_set["features"], fit_set["dice"], used)
        provisional = QualityModel(tuple(mean), tuple(scale), tuple(w), b, threshold=0.0, fitted={}, features=used)
        threshold = tune_threshold(quality_score(tune["features"], provisional), tune["dice"])

        selections = {
            "covid_qu_ex_val_clean": (tune, tune["kind"] == "clean"),
            "covid_qu_ex_val_clean_and_degraded": (tune, np.ones(len(tune["dice"]), bool)),
            "jsrt_clean": (measured["jsrt"], measured["jsrt"]["kind"] == "clean"),
            "shenzhen_clean": (measured["shenzhen"], measured["shenzhen"]["kind"] == "clean"),
            "external_degraded": (external_degraded, external_degraded["kind"] != "clean"),
            f"external_degraded_{HELD_OUT_KIND}_only": (external_degraded, external_degraded["kind"] == HELD_OUT_KIND),
        }
        results = {name: flag_rates(quality_score(m["features"][sel], provisional), m["dice"][sel], threshold)
                   for name, (m, sel) in selections.items()}
        fitted = {"data": "COVID-QU-Ex Train (clean + one degraded copy each), threshold tuned on Val (clean + one degraded copy)",
                  "kinds": list(FIT_KINDS), "held_out_kind": HELD_OUT_KIND, "n_fit": len(fit_set["dice"]),
                  "n_tune": len(tune["dice"]), "seed": SEED, "ridge": RIDGE, "max_false_flags_tune": MAX_FALSE_FLAGS,
                  "command": "PYTHONPATH=. .venv/bin/python scripts/fit_quality.py --write pipeline/weights/lung_unet.pt",
                  "measured": results}
        models[view] = QualityModel(tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(float, w)), b,
                                    threshold, fitted, features=used)
        report_all[view] = {"features": list(used), "weights": [round(float(x), 4) for x in w], "bias": round(b, 4),
                            "threshold": round(threshold, 4), "results": results}
    print(json.dumps(report_all, indent=1))
    if args.write:
        update_meta(args.write, quality={view: m.to_dict() for view, m in models.items()})
        log.info("wrote the quality constants into %s (sha256 now %s)", args.write, read_weights(args.write).sha256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
