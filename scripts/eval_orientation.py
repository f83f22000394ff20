"""Accuracy and false alarms of the orientation classifier, the way the pipeline uses it.

    .venv/bin/python scripts/eval_orientation.py --model pipeline/weights/orientation.pt \
        --val /work/shared/data/covid-qu-ex/manifest.csv \
        --external /work/shared/data/external/jsrt /work/shared/data/external/shenzhen --threads 1

Every image is decoded, turned into each of the 8 orientations (`pipeline.orientation.transform` of the
decoded pixels), prepared with the lung model's `prepare_input` (what the classifier sees at inference)
and classified; `decide` with the threshold stored in the model file gives the reported orientation.
Per set: accuracy over all 8 x N (correct = reported k == true k), accuracy per transform, and the
false-alarm rate (untouched images reported as turned). --val uses only the Val split; --external
folders (images/ + masks/, as scripts/eval_lung_model.py lists them) are used in full. The classifier's
CPU time per image is measured on the Val inputs (batch --batch, after a warm-up, best of 3 passes).
Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch

from pipeline.model import load_model
from pipeline.model_input import prepare_input
from pipeline.orient_net import OrientationClassifier
from pipeline.orientation import N_ORIENTATIONS, UPRIGHT, decide, flags, transform
from pipeline.training import VAL, load_pairs

log = logging.getLogger("eval_orientation")

TIMING_REPEATS = 3  # passes over the timing inputs; the best counts


def transform_name(k: int) -> str:
    return "+".join(flags(k)) or "upright"


def evaluate_images(classifier: OrientationClassifier, lung_meta, images: list[np.ndarray], names: list[str],
                    *, batch: int) -> tuple[dict, np.ndarray]:
    """Metrics over every image in every orientation, and the uint8 prepared inputs (N * 8, S, S)."""
    inputs = np.stack([prepare_input(transform(img, k), lung_meta) for img in images for k in range(N_ORIENTATIONS)])
    labels = np.tile(np.arange(N_ORIENTATIONS), len(images))
    probs = np.concatenate([classifier(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])
    pred = decide(probs, threshold=classifier.meta.threshold)
    upright = labels == UPRIGHT
    errors = [f"{names[i // N_ORIENTATIONS]}: {transform_name(int(labels[i]))} -> {transform_name(int(pred[i]))}"
              for i in np.flatnonzero(pred != labels)]
    result = {
        "n_images": len(images),
        "accuracy": float(np.mean(pred == labels)),
        "false_alarm_rate": float(np.mean(pred[upright] != UPRIGHT)),
        "false_alarms": int(np.sum(pred[upright] != UPRIGHT)),
        "per_transform": {transform_name(k): float(np.mean(pred[labels == k] == k)) for k in range(N_ORIENTATIONS)},
        "accuracy_argmax": float(np.mean(probs.argmax(1) == labels)),
        "errors": errors[:20],
        "n_errors": len(errors),
    }
    return result, inputs


def time_classifier(classifier: OrientationClassifier, inputs: np.ndarray, *, batch: int) -> float:
    """CPU ms per image of the classifier's __call__ on `inputs` (uint8 (N, S, S)), best of TIMING_REPEATS."""
    classifier(inputs[:batch])  # warm-up
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        for i in range(0, len(inputs), batch):
            classifier(inputs[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(inputs)


def markdown(results: dict, *, threshold: float, ms: float | None) -> str:
    names = [transform_name(k) for k in range(N_ORIENTATIONS)]
    head = "| set | images | accuracy (8 x N) | false alarms on untouched | " + " | ".join(names) + " |"
    rule = "|" + "---|" * (4 + len(names))
    rows = [head, rule]
    for name, r in results.items():
        per = " | ".join(f"{100 * r['per_transform'][n]:.1f}" for n in names)
        rows.append(f"| {name} | {r['n_images']} | {100 * r['accuracy']:.2f}% | "
                    f"{r['false_alarms']} ({100 * r['false_alarm_rate']:.2f}%) | {per} |")
    note = f"\nthreshold on P(upright): {threshold}"
    if ms is not None:
        note += f"; classifier CPU time {ms:.2f} ms/image ({torch.get_num_threads()} thread(s), batch of inputs)"
    return "\n".join(rows) + note


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="orientation weights file (default: the shipped one)")
    p.add_argument("--val", default=None, help="manifest .csv / packed .npz / folder; its Val split is scored")
    p.add_argument("--external", nargs="*", default=[], help="images/+masks/ folders, scored in full")
    p.add_argument("--batch", type=int, default=64, help="images per classifier call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    classifier = OrientationClassifier(args.model, device="cpu")
    _, lung_meta = load_model()  # the classifier's input is the shipped lung model's input
    results, ms = {}, None
    if args.val:
        pairs = load_pairs(args.val)
        idx = pairs.indices(VAL)
        results["val"], inputs = evaluate_images(classifier, lung_meta, [pairs.images[i] for i in idx],
                                                 [pairs.names[i] for i in idx], batch=args.batch)
        ms = time_classifier(classifier, inputs[: 8 * args.batch], batch=args.batch)
    for folder in args.external:
        pairs = load_pairs(folder, val_fraction=1.0)  # every pair counts
        results[folder.rstrip("/").rsplit("/", 1)[-1]], inputs = evaluate_images(
            classifier, lung_meta, pairs.images, pairs.names, batch=args.batch)
        if ms is None:
            ms = time_classifier(classifier, inputs, batch=args.batch)
    report = {"model": classifier.meta.name, "sha256": classifier.sha256, "threshold": classifier.meta.threshold,
              "classifier_ms_per_image": ms, "threads": args.threads, "sets": results}
    print(json.dumps(report, indent=1))
    print()
    print(markdown(results, threshold=classifier.meta.threshold, ms=ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
