"""Dice of a lung model on image/mask pairs, the way the pipeline uses it.

    PYTHONPATH=. .venv/bin/python scripts/eval_lung_model.py --model pipeline/weights/lung_unet.pt \
        --val /work/shared/data/covid-qu-ex/manifest.csv \
        --external /work/shared/data/external/jsrt /work/shared/data/external/shenzhen

Per image: prepare_input -> model -> sigmoid -> refine_mask (bilinear upsample to the source size,
threshold, close, fill holes, keep the 2 largest components) -> Dice against the mask at the source
resolution. --val uses only the Val split of its source; --external folders are all used (they are
for measuring generalization only, never for training or model selection).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import numpy as np
import torch

from pipeline.evaluate import dice
from pipeline.model import DEFAULT_WEIGHTS, load_model, prepare_input, save_model
from pipeline.refine import RefineConfig, refine_mask
from pipeline.training import VAL, PairSet, load_pairs

log = logging.getLogger("eval_lung_model")


def evaluate_pairs(model, meta, pairs: PairSet, idx: list[int], *, batch: int = 16, bf16: bool = False) -> dict:
    refine_cfg = RefineConfig(threshold=meta.threshold)
    scores, raw_scores = [], []
    t0 = time.monotonic()
    for start in range(0, len(idx), batch):
        chunk = idx[start : start + batch]
        x = torch.from_numpy(np.stack([prepare_input(pairs.images[i], meta) for i in chunk])).float()[:, None] / 255
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prob = torch.sigmoid(model(x).float())[:, 0].numpy()
        for p, i in zip(prob, chunk):
            mask = pairs.masks[i]
            scores.append(dice(refine_mask(p, mask.shape, refine_cfg), mask))
            raw_scores.append(dice(_upsampled(p, mask.shape) > meta.threshold, mask))
    s = np.array(scores)
    return {"n": len(s), "dice_mean": float(s.mean()), "dice_median": float(np.median(s)), "dice_min": float(s.min()),
            "dice_unrefined_mean": float(np.mean(raw_scores)), "s_per_image": (time.monotonic() - t0) / max(len(s), 1),
            "worst": [f"{d:.4f} {pairs.names[i]}" for d, i in sorted(zip(s.tolist(), idx))[:3]]}


def _upsampled(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="weights file (default: the shipped model)")
    p.add_argument("--val", default=None, help="manifest .csv / packed .npz / folder; its Val split is scored")
    p.add_argument("--external", nargs="*", default=[], help="images/+masks/ folders, scored in full")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cpu-bf16", action="store_true", help="run the model in bf16 (as Segmenter(cpu_bf16=True))")
    p.add_argument("--record", action="store_true", help="store the results in the model file's meta.metrics")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_model(args.model)
    if args.cpu_bf16:
        model = model.to(memory_format=torch.channels_last)
    results = {}
    if args.val:
        pairs = load_pairs(args.val)
        results["val"] = evaluate_pairs(model, meta, pairs, pairs.indices(VAL), bf16=args.cpu_bf16)
    for folder in args.external:
        pairs = load_pairs(folder, val_fraction=1.0)  # every pair counts
        results[folder.rstrip("/").rsplit("/", 1)[-1]] = evaluate_pairs(model, meta, pairs, list(range(len(pairs.names))),
                                                                           bf16=args.cpu_bf16)
    print(json.dumps(results, indent=1))
    if args.record:
        summary = {f"{name}_dice_refined": round(r["dice_mean"], 4) for name, r in results.items()}
        summary["refined_dice_measured_by"] = "scripts/eval_lung_model.py (refine_mask at source resolution)"
        meta = dataclasses.replace(meta, metrics={**meta.metrics, **summary})
        save_model(args.model or DEFAULT_WEIGHTS, model, meta)  # fp16 -> fp32 -> fp16 is exact
        log.info("recorded %s in %s", summary, args.model or DEFAULT_WEIGHTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
