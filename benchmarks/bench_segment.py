"""Segmenter cost per image at the model's input size, and the per-image CPU stages beside it.

    python benchmarks/bench_segment.py [--model PATH] [--threads 2] [--batch 16] [--repeats 5]

Prints milliseconds per image for: prepare_input (CPU), the model (on the device chosen:
CUDA when present), the whole segmenter call the job makes (orientation check, then the model on
the image and its mirror image), refine_mask + variants at 1024x1024, and their ratios, all measured
in this one run. The model is timed on real arrays (the bundled samples), after a warm-up.
On a CPU it times the model in fp32, then in bf16 (`Segmenter(cpu_bf16=True)`, the default on CPUs
with native bf16; `--segment-cpu-precision`)
and prints the speed ratio and the Dice between the fp32 and bf16 masks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.decode import decode_image
from pipeline.evaluate import dice
from pipeline.model_input import prepare_input
from pipeline.png import encode_png
from pipeline.refine import refine
from pipeline.segment import Segmenter
from pipeline.variants import DEFAULT_VARIANTS, VariantConfig, make_variants

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "xrays"
SOURCE_SIDE = 1024  # px: the source resolution at which refinement and variants are timed


def per_image_ms(fn, n_images: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1000.0 * best / n_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    seg = Segmenter(args.model, device=args.device, cpu_threads=args.threads, cpu_bf16=False)
    images = [decode_image(f.read_bytes(), source=f.name).pixels for f in sorted(SAMPLES.iterdir())]
    batch = [images[i % len(images)] for i in range(args.batch)]
    prep_ms = per_image_ms(lambda: [prepare_input(x, seg.meta) for x in batch], len(batch), args.repeats)
    inputs = np.stack([prepare_input(x, seg.meta) for x in batch])
    seg.predict(inputs)  # warm-up
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    model_ms = per_image_ms(lambda: seg.predict(inputs), len(batch), args.repeats)
    seg({"model_input": inputs})  # warm-up of the whole call
    call_ms = per_image_ms(lambda: seg({"model_input": inputs}), len(batch), args.repeats)
    orientation_ms = per_image_ms(lambda: seg.orientation(inputs), len(batch), args.repeats)

    prob = seg.predict(inputs[:1])[0]
    import cv2

    pixels = cv2.resize(images[0], (SOURCE_SIDE, SOURCE_SIDE), interpolation=cv2.INTER_AREA)

    def post():
        mask, _ = refine(prob, pixels.shape)
        for img in make_variants(pixels, mask, list(DEFAULT_VARIANTS), VariantConfig()).values():
            encode_png(img)
        encode_png(mask, mask=True)

    post_ms = per_image_ms(post, 1, args.repeats)
    bf16 = None
    if seg.device.type == "cpu":
        seg16 = Segmenter(args.model, device="cpu", cpu_threads=args.threads, cpu_bf16=True)
        seg16.predict(inputs)  # warm-up
        bf16_ms = per_image_ms(lambda: seg16.predict(inputs), len(batch), args.repeats)
        threshold = seg.meta.threshold
        agree = [dice(a >= threshold, b >= threshold) for a, b in zip(seg.predict(inputs), seg16.predict(inputs))]
        bf16 = (bf16_ms, min(agree))
    params = sum(p.numel() for p in seg.model.parameters())
    print(f"model {seg.meta.name}: {params / 1e6:.2f}M parameters, input {seg.size}x{seg.size}, device {seg.device}, "
          f"{args.threads} CPU threads, batch {args.batch}")
    print(f"prepare_input          {prep_ms:8.2f} ms/image")
    print(f"model forward          {model_ms:8.2f} ms/image  ({1000.0 / model_ms:.1f} images/s)")
    print(f"segmenter call         {call_ms:8.2f} ms/image  (what the job runs: orientation check + image and mirror image)")
    print(f"  orientation check    {orientation_ms:8.2f} ms/image")
    print(f"refine + 4 variants    {post_ms:8.2f} ms/image at {SOURCE_SIDE}x{SOURCE_SIDE}")
    print(f"ratio model / (prepare + post) = {model_ms / (prep_ms + post_ms):.2f}")
    if bf16:
        print(f"model forward, bf16    {bf16[0]:8.2f} ms/image  ({1000.0 / bf16[0]:.1f} images/s); "
              f"fp32 / bf16 time = {model_ms / bf16[0]:.2f}; Dice fp32 vs bf16 masks, worst image: {bf16[1]:.4f}")


if __name__ == "__main__":
    main()
