"""Stage costs of the pipeline as it was before the straight data path (commit ea99c35), for the comparison
in docs/BENCHMARKS.md: same inputs and the same one-core, one-thread timing as bench_pipeline.py.

    git worktree add /tmp/before ea99c35
    python benchmarks/stage_costs_before.py /tmp/before [--n 480]

The old modules are imported from the given checkout (their API differs: prepare_input lived in
pipeline.model, encode_png in pipeline.variants, refine_mask returned the mask alone).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch
from inputs import xray_mix

STAGES = ("read", "decode", "model input", "model", "refine", "variants", "png")
STAGE_SAMPLE_EVERY = 6  # as bench_pipeline.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tree", help="a checkout of the old code (git worktree add /tmp/before ea99c35)")
    p.add_argument("--n", type=int, default=480)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample = xray_mix(Path(tmp), args.n // 2, args.n - args.n // 2)[::STAGE_SAMPLE_EVERY]
        for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            del sys.modules[name]  # inputs.py imported the new package; time the old one
        sys.path.insert(0, str(Path(args.tree).resolve()))
        decode = importlib.import_module("pipeline.decode")
        model = importlib.import_module("pipeline.model")
        refine = importlib.import_module("pipeline.refine")
        segment = importlib.import_module("pipeline.segment")
        variants = importlib.import_module("pipeline.variants")
        assert Path(decode.__file__).is_relative_to(Path(args.tree).resolve()), decode.__file__
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        seg = segment.Segmenter(device="cpu", cpu_threads=1)
        t = dict.fromkeys(STAGES, 0.0)
        for i, path in enumerate([sample[0], *sample]):  # the first image warms up and counts once
            if i == 1:
                t = dict.fromkeys(STAGES, 0.0)
            t0 = time.perf_counter()
            data = path.read_bytes()
            hashlib.sha256(data).hexdigest()
            t1 = time.perf_counter()
            pixels = decode.decode_image(data, source=path.name).pixels
            t2 = time.perf_counter()
            x = model.prepare_input(pixels, seg.meta)
            t3 = time.perf_counter()
            prob = seg.predict(x[None])[0]
            t4 = time.perf_counter()
            mask = refine.refine_mask(prob, pixels.shape)
            refine.qc_flags(refine.mask_stats(mask))
            t5 = time.perf_counter()
            out = variants.make_variants(pixels, mask, list(variants.DEFAULT_VARIANTS), variants.VariantConfig())
            t6 = time.perf_counter()
            for img in out.values():
                variants.encode_png(img)
            variants.encode_png(mask)
            t7 = time.perf_counter()
            for k, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
                t[k] += dt
    ms = {k: 1000 * v / len(sample) for k, v in t.items()}
    print(f"stage costs before ({args.tree}), one core, one thread, ms/image over {len(sample)} images of the mix:")
    for k, v in ms.items():
        print(f"  {k:12s} {v:7.1f}")
    print(f"  {'sum':12s} {sum(ms.values()):7.1f}   (without the model: {sum(ms.values()) - ms['model']:.1f})")


if __name__ == "__main__":
    main()
