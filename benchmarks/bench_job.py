"""Throughput of the whole job on this machine, against the sum of its per-image stage costs.

    python benchmarks/bench_job.py [--copies 8] [--cpus 2]

Makes COPIES distinct copies of each bundled sample (so 9 x COPIES inputs, mixed sizes and
formats), then in one run:
1. times each stage in this process, one image at a time (read, decode + prepare_input, model
   forward on `--cpus` threads, refine + the four default variants + PNG encoding);
2. runs the job on a local Ray with `--cpus` CPUs (Ray start-up excluded) and times it.
Prints images/s for both and their ratio: the job's throughput over what one core doing the
stages back to back would give, i.e. the parallel speed-up the job gets out of `--cpus` cores.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from pipeline.config import JobConfig
from pipeline.dataset import run_job
from pipeline.decode import decode_image
from pipeline.model import prepare_input
from pipeline.refine import refine_mask
from pipeline.segment import Segmenter
from pipeline.variants import DEFAULT_VARIANTS, VariantConfig, encode_png, make_variants

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "xrays"


def make_inputs(root: Path, copies: int) -> list[Path]:
    files = []
    for k in range(copies):
        for src in sorted(SAMPLES.iterdir()):
            dst = root / f"copy{k:03d}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            files.append(dst)
    return files


def stage_seconds(files: list[Path], threads: int) -> dict[str, float]:
    """Seconds per image for each stage, measured sequentially on the first copy of each sample."""
    torch.set_num_threads(threads)
    seg = Segmenter(device="cpu", cpu_threads=threads)
    t = dict.fromkeys(("read", "decode", "model", "post"), 0.0)
    for f in files:
        t0 = time.perf_counter()
        data = f.read_bytes()
        t1 = time.perf_counter()
        pixels = decode_image(data, source=f.name).pixels
        x = prepare_input(pixels, seg.meta)
        t2 = time.perf_counter()
        prob = seg.predict(x[None])[0]
        t3 = time.perf_counter()
        mask = refine_mask(prob, pixels.shape)
        for img in make_variants(pixels, mask, list(DEFAULT_VARIANTS), VariantConfig()).values():
            encode_png(img)
        encode_png(mask)
        t4 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k] += dt
    return {k: v / len(files) for k, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_job_"))
    try:
        files = make_inputs(work / "in", args.copies)
        per_image = stage_seconds(files[: len(list(SAMPLES.iterdir()))], threads=1)
        sequential = 1.0 / sum(per_image.values())

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        manifest = run_job(JobConfig(inputs=(str(work / "in"),), output=str(work / "out")))
        wall = time.perf_counter() - t0
        ray.shutdown()
        assert manifest["complete"] and manifest["counts"]["ok"] == len(files), manifest["counts"]
        job = len(files) / wall

        print(f"{len(files)} inputs ({args.copies} copies of {len(files) // args.copies} samples), {args.cpus} CPUs")
        for k, v in per_image.items():
            print(f"  {k:7s} {1000 * v:8.1f} ms/image (one core, in process)")
        print(f"one core, stages back to back: {sequential:6.2f} images/s")
        print(f"the job on Ray ({args.cpus} CPUs):   {job:6.2f} images/s  ({wall:.1f} s)")
        print(f"ratio job / one core = {job / sequential:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
