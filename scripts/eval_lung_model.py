"""Dice of a lung model on image/mask pairs, the way the pipeline uses it.

    PYTHONPATH=. .venv/bin/python scripts/eval_lung_model.py --model pipeline/weights/lung_unet.pt \
        --val /work/shared/data/covid-qu-ex/manifest.csv \
        --external /work/shared/data/external/jsrt /work/shared/data/external/shenzhen

Per image: prepare_input -> model -> sigmoid -> refine_mask (bilinear upsample to the source size,
threshold, close, fill holes, keep the 2 largest components) -> Dice against the mask at the source
resolution. --val uses only the Val split of its source; --external folders are all used (they are
for measuring generalization only, never for training or model selection).

Upper bounds (not what the pipeline ships): several --model files and/or several --scales average the
lung probabilities of every model at every input side (the prepared 256 px input resized bilinearly,
the logits resized back) before the same refinement, e.g. two models x three sides = 6 forward passes:

    ... scripts/eval_lung_model.py --cpu-bf16 --model a.pt b.pt --scales 224 256 288 --val ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.evaluate import dice
from pipeline.model import DEFAULT_WEIGHTS, load_model, save_model
from pipeline.model_input import prepare_input
from pipeline.refine import RefineConfig, refine_mask
from pipeline.training import VAL, PairSet, load_pairs

log = logging.getLogger("eval_lung_model")


def predict(models, x: torch.Tensor, *, scales: list[int], bf16: bool) -> np.ndarray:
    """float (N, 1, S, S) prepared inputs -> float32 (N, S, S) probability, averaged over models x scales.

    Runs on the models' device; `bf16`: bf16 autocast and channels_last there."""
    device = next(models[0].parameters()).device
    x = x.to(device)
    side = x.shape[-1]
    total = torch.zeros(x.shape[0], side, side, device=device)
    for scale in scales:
        xs = x if scale == side else F.interpolate(x, size=(scale, scale), mode="bilinear", align_corners=False)
        if bf16:
            xs = xs.contiguous(memory_format=torch.channels_last)
        for model in models:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xs).float()
            if scale != side:
                logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
            total += torch.sigmoid(logits)[:, 0]
    return (total / (len(scales) * len(models))).cpu().numpy()


def evaluate_pairs(models, meta, pairs: PairSet, idx: list[int], *, batch: int = 16, bf16: bool = False,
                   scales: list[int] | None = None, groups: dict[str, str] | None = None) -> dict:
    """Dice of the refined masks over `idx`: mean, median, worst, the unrefined mean, and with `groups`
    ({name: regex on the pair's name}) the mean and count of each group."""
    refine_cfg = RefineConfig(threshold=meta.threshold)
    scales = scales or [meta.input_size]
    scores, raw_scores = [], []
    t0 = time.monotonic()
    for start in range(0, len(idx), batch):
        chunk = idx[start : start + batch]
        x = torch.from_numpy(np.stack([prepare_input(pairs.images[i], meta) for i in chunk])).float()[:, None] / 255
        prob = predict(models, x, scales=scales, bf16=bf16)
        for p, i in zip(prob, chunk):
            mask = pairs.masks[i]
            scores.append(dice(refine_mask(p, mask.shape, refine_cfg), mask))
            raw_scores.append(dice(_upsampled(p, mask.shape) > meta.threshold, mask))
    s = np.array(scores)
    by_group = {}
    for name, regex in (groups or {}).items():
        mine = [d for d, i in zip(scores, idx) if re.search(regex, pairs.names[i], re.IGNORECASE)]
        by_group[name] = {"n": len(mine), "dice_mean": float(np.mean(mine)) if mine else None}
    return {"n": len(s), "dice_mean": float(s.mean()), "groups": by_group, "dice_median": float(np.median(s)), "dice_min": float(s.min()),
            "dice_unrefined_mean": float(np.mean(raw_scores)), "s_per_image": (time.monotonic() - t0) / max(len(s), 1),
            "worst": [f"{d:.4f} {pairs.names[i]}" for d, i in sorted(zip(s.tolist(), idx))[:3]]}


def _upsampled(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[None], help="weights file(s) (default: the shipped model); "
                   "several: probabilities averaged (an ensemble upper bound)")
    p.add_argument("--scales", nargs="+", type=int, default=None,
                   help="input sides to run each model at, probabilities averaged (default: the model's own)")
    p.add_argument("--val", default=None, help="manifest .csv / packed .npz / folder; its Val split is scored")
    p.add_argument("--external", nargs="*", default=[], help="images/+masks/ folders, scored in full")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cpu-bf16", action="store_true", help="run the model in bf16 (as Segmenter(cpu_bf16=True))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run (default: CUDA when present, in bf16 as the pipeline runs it there)")
    p.add_argument("--record", action="store_true", help="store the results in the model file's meta.metrics")
    p.add_argument("--groups", nargs="*", default=[], metavar="NAME=REGEX",
                   help="also the mean Dice of the pairs whose name matches REGEX, e.g. COVID-19=^covid_")
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each source only (a smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = [load_model(path) for path in args.model]
    fast = args.cpu_bf16 or args.device.startswith("cuda")
    models = [(m.to(memory_format=torch.channels_last) if fast else m).to(args.device) for m, _ in loaded]
    meta = loaded[0][1]
    for path, (_, other) in zip(args.model[1:], loaded[1:]):
        if (other.input_size, other.normalization, other.threshold) != (meta.input_size, meta.normalization, meta.threshold):
            p.error(f"{path}: input size, normalization and threshold must match the first model's to average them")
    if args.record and (len(models) > 1 or args.scales):
        p.error("--record stores one model's own numbers: not with several models or --scales")
    groups = dict(g.split("=", 1) for g in args.groups)
    run = {"bf16": fast, "scales": args.scales}
    results = {}
    if args.val:
        pairs = load_pairs(args.val, limit=args.limit)
        results["val"] = evaluate_pairs(models, meta, pairs, pairs.indices(VAL), groups=groups, **run)
    for folder in args.external:
        pairs = load_pairs(folder, val_fraction=1.0, limit=args.limit)  # every pair counts
        results[Path(folder.rstrip("/")).stem] = evaluate_pairs(models, meta, pairs, list(range(len(pairs.names))), **run)
    print(json.dumps(results, indent=1))
    if args.record:
        summary = {f"{name}_dice_refined": round(r["dice_mean"], 4) for name, r in results.items()}
        summary["refined_dice_measured_by"] = "scripts/eval_lung_model.py (refine_mask at source resolution)"
        meta = dataclasses.replace(meta, metrics={**meta.metrics, **summary})
        save_model(args.model[0] or DEFAULT_WEIGHTS, models[0].cpu(), meta)  # fp16 -> fp32 -> fp16 is exact
        log.info("recorded %s in %s", summary, args.model[0] or DEFAULT_WEIGHTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
