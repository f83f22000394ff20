"""What bounds lung-model training: the loader processes or the training step.

    python benchmarks/bench_train_step.py [--data .gpu/covid_qu_ex.npz] [--batch 64] [--steps 30] [--compile]

Times, in this one run and on real pairs (any `xray-lung-prep train --data` source):
- one loader process preparing a training item (`PairDataset`: the augmentation preset's intensity
  changes, then `prepare_input`), per preset, on one thread;
- the training step of `pipeline.training.loop.train_step` (geometry augmentation on the device,
  forward, BCE + soft Dice, backward, AdamW) on CUDA when present, else the CPU (bf16 where it has
  native bf16, as `train --cpu-bf16`), optionally under torch.compile;
and prints how many loader processes one training step needs. `train` starts min(14, cores - 2)
of them: fewer than needed means the GPU waits for its data.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import torch

from pipeline.model_input import NORMALIZATION_EQUALIZE_U8, ModelMeta
from pipeline.segment import cpu_has_native_bf16
from pipeline.training.augment import AUGMENT_PRESETS
from pipeline.training.data import TRAIN, PairDataset, load_pairs
from pipeline.training.loop import loader_processes, train_step
from pipeline.training.metrics import BOUNDARY_PX
from pipeline.unet import UNetConfig, build_unet, count_parameters


def loader_ms(ds: PairDataset, n: int) -> float:
    """Milliseconds per item, one thread, after a warm-up of 10 items."""
    for i in range(10):
        ds[i]
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return (time.perf_counter() - t) / n * 1e3


def step_ms(model, optimizer, batches, *, device, fast: bool, steps: int, boundary_weight: float) -> float:
    """Milliseconds per image of `train_step` over `steps` steps, after 5 warm-up steps (compilation)."""

    def run(k: int) -> None:
        for i in range(k):
            x, m = batches[i % len(batches)]
            train_step(model, optimizer, x, m, augment=AUGMENT_PRESETS["default"], device=device, fast=fast,
                       boundary_weight=boundary_weight, boundary_px=BOUNDARY_PX)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(5)
    t = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t) / (steps * len(batches[0][0])) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".gpu/covid_qu_ex.npz")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--loader-images", type=int, default=300)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--boundary-weight", type=float, default=2.0)
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    pairs = load_pairs(args.data)
    idx = pairs.indices(TRAIN)
    meta = ModelMeta(name="bench", input_size=256, normalization=NORMALIZATION_EQUALIZE_U8, threshold=0.5)
    images, masks = [pairs.images[i] for i in idx], [pairs.masks[i] for i in idx]
    print(f"{len(idx)} training pairs from {args.data}; {os.cpu_count()} cores")

    torch.set_num_threads(1)
    per_preset = {}
    for name in sorted(AUGMENT_PRESETS):
        per_preset[name] = loader_ms(PairDataset(images, masks, meta, augment=AUGMENT_PRESETS[name]), args.loader_images)
        print(f"loader, preset {name:8s}: {per_preset[name]:6.2f} ms per item on one thread "
              f"({1e3 / per_preset[name]:,.0f} items/s per loader process)")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    fast = cuda or cpu_has_native_bf16()
    ds = PairDataset(images, masks, meta, augment=AUGMENT_PRESETS["default"])
    batches = []
    for b in range(4):
        items = [ds[(b * args.batch + i) % len(ds)] for i in range(args.batch)]
        batches.append((torch.stack([x for x, _ in items]), torch.stack([m for _, m in items])))
    results = {}
    for compiled in (False, True) if args.compile else (False,):
        torch.manual_seed(0)
        model = build_unet(UNetConfig(base_width=args.base_width, depth=4)).to(device)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run_model = torch.compile(model) if compiled else model
        label = "compiled" if compiled else "eager"
        results[label] = step_ms(run_model, optimizer, batches, device=device, fast=fast, steps=args.steps,
                                 boundary_weight=args.boundary_weight)
        print(f"training step, {label}, {device.type}{' bf16' if fast else ''}, batch {args.batch}, "
              f"{count_parameters(model):,} parameters: {results[label]:.3f} ms per image "
              f"({1e3 / results[label]:,.0f} images/s)")
    workers = loader_processes(-1)
    for label, ms in results.items():
        need = per_preset["default"] / ms
        print(f"{label}: the step needs {need:.2f} loader processes (default preset); train starts {workers} here")
    if "compiled" in results:
        print(f"compiled / eager speed: {results['eager'] / results['compiled']:.2f}x")


if __name__ == "__main__":
    main()
