"""Train the orientation classifier (`pipeline.orient_net`) on COVID-QU-Ex Train, select on its Val split.

    .venv/bin/python scripts/train_orientation.py --manifest /work/shared/data/covid-qu-ex/manifest.csv \
        --out pipeline/weights/orientation.pt --seed 0 --epochs 16 --threads 1

Labels are free: every image is shown in each of the 8 orientations (`pipeline.orientation.transform`)
every epoch. The inputs are the lung model's, `prepare_input` with the shipped lung model's meta,
computed once and averaged down to the net's side once. Augmentation, so that it carries to other
hospitals: `augment_intensity` (source side, before `prepare_input`) drawn once into `--versions - 1`
extra copies of each Train image, and per batch a random rotation (+-10 degrees), scale, aspect and
shift (`random_affines`, which never mirrors). A left-right flip is a label here, never an augmentation.

The best epoch by Val accuracy (argmax over the 8 classes) is kept; then the threshold on P(upright)
(`pipeline.orientation.decide`) is the one with the highest Val accuracy over all 8 transforms among
those whose false-alarm rate on untouched Val images is at most `--max-false-alarm`. Val inputs are
made as at inference: `prepare_input(transform(decoded image, k))`.
Deterministic for a given --seed and --threads on the same machine (CPU).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import load_model
from pipeline.model_input import prepare_input
from pipeline.orient_net import (
    DEFAULT_ORIENTATION_WEIGHTS,
    DEFAULT_WIDTHS,
    OrientationMeta,
    OrientationNet,
    count_parameters,
    downsample,
    save_orientation_model,
)
from pipeline.orientation import MIRROR_FROM, N_ORIENTATIONS, UPRIGHT, decide, transform
from pipeline.training.augment import AugmentConfig, augment_intensity, random_affines
from pipeline.training.data import read_gray

log = logging.getLogger("train_orientation")

GEOMETRY = AugmentConfig(rotate_deg=10.0, scale=(0.85, 1.15), aspect=0.1, shift=0.08)  # per-batch affine
THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidate P(upright) thresholds
WARMUP_FRACTION = 0.05  # of all steps: linear LR warm-up, then cosine to zero


def read_split(manifest: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{"Train": [(name, pixels)], "Val": [...]}: the decoded images of the manifest's Train and Val rows."""
    out: dict[str, list[tuple[str, np.ndarray]]] = {"Train": [], "Val": []}
    with manifest.open(newline="") as f:
        for row in csv.DictReader(f):
            split = row["split"].strip().capitalize()
            if split in out:
                out[split].append((Path(row["image"]).stem, read_gray(manifest.parent / row["image"])))
    return out


def orient_batch(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """float (N, 1, s, s) upright -> each image i in orientation ks[i] (torch twin of `transform`)."""
    out = torch.empty_like(x)
    for k in range(N_ORIENTATIONS):
        sel = ks == k
        if sel.any():
            xs = torch.flip(x[sel], dims=(3,)) if k >= MIRROR_FROM else x[sel]
            out[sel] = torch.rot90(xs, k % 4, dims=(2, 3))
    return out


def predict(model: torch.nn.Module, x: torch.Tensor, *, batch: int = 512) -> np.ndarray:
    """float (N, 1, s, s) -> float32 (N, 8) softmax probabilities, eval mode."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([torch.softmax(model(x[i : i + batch]), 1) for i in range(0, len(x), batch)]).numpy()


def choose_threshold(probs: np.ndarray, labels: np.ndarray, *, max_false_alarm: float) -> tuple[float, float, float]:
    """(threshold, accuracy, false-alarm rate): the highest accuracy whose false-alarm rate <= max_false_alarm;
    ties go to the lowest threshold."""
    best = None
    upright = labels == UPRIGHT
    for t in THRESHOLD_GRID:
        pred = decide(probs, threshold=float(t))
        fa = float(np.mean(pred[upright] != UPRIGHT))
        acc = float(np.mean(pred == labels))
        if fa <= max_false_alarm and (best is None or acc > best[1]):
            best = (float(t), acc, fa)
    if best is None:
        raise RuntimeError(f"no threshold in {THRESHOLD_GRID[0]}..{THRESHOLD_GRID[-1]} keeps false alarms "
                           f"<= {max_false_alarm}")
    return best


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=Path("/work/shared/data/covid-qu-ex/manifest.csv"))
    p.add_argument("--out", type=Path, default=DEFAULT_ORIENTATION_WEIGHTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=16, help="passes over Train x 8 orientations")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--net-size", type=int, default=64, help="px, side the net averages the 256 px input down to")
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS), help="channels of the conv blocks")
    p.add_argument("--versions", type=int, default=3, help="copies of each Train image: 1 plain + intensity-augmented")
    p.add_argument("--max-false-alarm", type=float, default=0.005, help="on untouched Val images")
    p.add_argument("--limit", type=int, default=None, help="use only the first N Train and Val images (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.monotonic()

    _, lung_meta = load_model()  # the shipped lung model: its input is this net's input
    data = read_split(args.manifest)
    train, val = data["Train"][: args.limit], data["Val"][: args.limit]
    log.info("read %d Train and %d Val images in %.0f s", len(train), len(val), time.monotonic() - t_start)

    # Train cache: float32 (N, V, 1, s, s); version 0 plain, the rest intensity-augmented once.
    versions = []
    for v in range(args.versions):
        u8 = np.stack([prepare_input(img if v == 0 else augment_intensity(img, rng), lung_meta) for _, img in train])
        versions.append(downsample(u8, args.net_size))
    x_train = torch.stack(versions, dim=1)
    # Val: every image in every orientation, made as at inference.
    val_u8 = np.stack([prepare_input(transform(img, k), lung_meta) for _, img in val for k in range(N_ORIENTATIONS)])
    x_val = downsample(val_u8, args.net_size)
    y_val = np.tile(np.arange(N_ORIENTATIONS), len(val))
    log.info("prepared inputs in %.0f s: train %s, val %s", time.monotonic() - t_start, tuple(x_train.shape),
             tuple(x_val.shape))

    widths = tuple(args.widths)
    model = OrientationNet(widths)
    n_params = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n_items = len(train) * N_ORIENTATIONS
    steps_per_epoch = math.ceil(n_items / args.batch_size)
    total_steps, warmup = args.epochs * steps_per_epoch, max(1, int(WARMUP_FRACTION * args.epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    best = (-1.0, math.inf, None, -1)  # (val accuracy, val nll, state, epoch)
    history = []
    t_train = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n_items, generator=gen)
        total_loss = 0.0
        for start in range(0, n_items, args.batch_size):
            items = order[start : start + args.batch_size]
            img_idx, ks = items // N_ORIENTATIONS, items % N_ORIENTATIONS
            ver = torch.randint(0, args.versions, (len(items),), generator=gen)
            x = orient_batch(x_train[img_idx, ver], ks)
            theta = random_affines(len(items), cfg=GEOMETRY, generator=gen)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            loss = F.cross_entropy(model(x), ks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(items)
        probs = predict(model, x_val)
        acc = float(np.mean(probs.argmax(1) == y_val))
        nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y_val)), y_val], 1e-12))))
        history.append({"epoch": epoch + 1, "train_loss": round(total_loss / n_items, 5), "val_accuracy": round(acc, 5),
                        "val_nll": round(nll, 5)})
        log.info("epoch %d: train loss %.4f, val accuracy %.5f, nll %.4f (%.1f min)", epoch + 1, total_loss / n_items,
                 acc, nll, (time.monotonic() - t_train) / 60)
        if (acc, -nll) > (best[0], -best[1]):
            best = (acc, nll, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
    train_minutes = (time.monotonic() - t_train) / 60

    model.load_state_dict(best[2])
    probs = predict(model, x_val)
    threshold, acc, fa = choose_threshold(probs, y_val, max_false_alarm=args.max_false_alarm)
    log.info("best epoch %d; threshold %.2f: Val accuracy %.5f, false alarms %.4f", best[3], threshold, acc, fa)
    command = "python scripts/train_orientation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = OrientationMeta(
        name="orientation-cnn", input_size=lung_meta.input_size, net_size=args.net_size, threshold=threshold,
        widths=widths,
        training={"data": f"{args.manifest} Train ({len(train)} images x 8 orientations); selected on Val ({len(val)})",
                  "command": command, "seed": args.seed, "epochs": args.epochs, "best_epoch": best[3],
                  "batch_size": args.batch_size, "lr": args.lr, "versions": args.versions,
                  "augment": "augment_intensity (once per extra version) + random_affines rotate 10 deg, "
                             "scale 0.85-1.15, aspect 0.1, shift 0.08; never mirrored",
                  "threads": args.threads, "train_minutes": round(train_minutes, 1),
                  "parameters": n_params, "date": datetime.date.today().isoformat(), "history": history},
        metrics={"val_accuracy": round(acc, 5), "val_false_alarm_rate": round(fa, 5),
                 "val_accuracy_argmax": round(best[0], 5), "max_false_alarm": args.max_false_alarm},
    )
    save_orientation_model(args.out, model, meta)
    log.info("wrote %s (%d bytes, %d parameters) after %.1f min in all", args.out, args.out.stat().st_size, n_params,
             (time.monotonic() - t_start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
