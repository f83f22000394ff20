"""The job against the speed of its parts, on this machine, in one run. Prints ratios; --json writes them.

    python benchmarks/bench_pipeline.py [--n 480] [--cpus 2] [--small 20000] [--json out.json]

1. Stage costs alone: every stage of one image's way timed on ONE core with ONE thread (the process is
   pinned), on a 1k/2k mix of 16-bit PNGs made from the bundled samples, the last one the result rows'
   Arrow table and its Parquet shard. ideal = cpus / sum of the
   stage costs; the free-model ideal leaves the model out (what a GPU node's CPUs can reach).
2. Ray is started (num_cpus=--cpus) and Ray Data's own actors warmed up; that start-up is reported apart.
3. The job (run_job, default options) on --n images of the mix: images/s and the ratio to the ideal.
4. The same with a free segmenter in a segmenter pool of its own: the GPU-node layout, with a model
   that costs nothing; ratio to the free-model ideal.
5. The job on one core (Ray started with num_cpus=1, every process pinned to core 0) against --cpus.
6. Bytes through the object store per image: source blocks, model input and probability (pool
   layout), result rows on their way to the writers.
7. Peak memory (driver RSS, Ray processes' PSS, object store) for --small / 10 and --small images of
   256 px (free segmenter, so the larger run takes a minute, not ten), and --small invalid files/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import ray
import torch
from inputs import invalid_files, small_xrays, xray_mix

from pipeline.config import JobConfig, SegmentConfig
from pipeline.dataset import Layout, process_config, run_job
from pipeline.decode import decode_image
from pipeline.model import read_weights
from pipeline.model_input import prepare_input, probability_to_u8
from pipeline.png import encode_png
from pipeline.privacy import header_columns
from pipeline.process import process
from pipeline.qc import row_qc
from pipeline.quality import quality_features, quality_model, quality_score
from pipeline.read import read_source
from pipeline.refine import RefineConfig, refine
from pipeline.schema import result_schema
from pipeline.segment import Segmenter
from pipeline.variants import DEFAULT_VARIANTS, VariantConfig, make_variants
from pipeline.writer import write_results

STAGES = ("read", "decode", "model input", "model", "refine", "variants", "png", "rows + write")
STAGE_SAMPLE_EVERY = 6  # every 6th image of the mix is timed stage by stage: both sizes, every sample image
MEMORY_SAMPLE_S = 0.25  # seconds between memory samples


class FreeSegmenter:
    """A model that costs nothing: the same two-lung probability for every image (realistic refine work)."""

    def __init__(self, weights, **_):
        s = weights.meta.input_size
        prob = np.zeros((s, s), np.float32)
        for cx in (0.3, 0.7):
            cv2.ellipse(prob, (int(cx * s), s // 2), (int(0.13 * s), int(0.3 * s)), 0, 0, 360, 1.0, -1)
        self.prob = probability_to_u8(cv2.GaussianBlur(prob, (0, 0), s / 64))

    def __call__(self, batch: dict) -> dict:
        n = len(batch["model_input"])
        prob = np.broadcast_to(self.prob, batch["model_input"].shape).copy()
        return {"orientation": np.zeros(n, np.uint8), "turned": np.zeros(n, bool), "lung_prob": prob,
                "lung_prob_flip": prob.copy()}


def stage_costs(paths: list[Path], weights, segment) -> dict[str, float]:
    """Milliseconds per image of each stage, one core, one thread, in this process (the first image, timed
    twice, warms up first-call costs and counts once)."""
    refine_cfg = RefineConfig(threshold=weights.meta.threshold)
    quality = quality_model(weights.meta.quality, mirror_view=True)
    t = dict.fromkeys(STAGES, 0.0)
    for i, path in enumerate([paths[0], *paths]):
        if i == 1:
            t = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        data, _ = read_source(os.fsencode(path))
        t1 = time.perf_counter()
        decoded = decode_image(data, source=path.name)
        t2 = time.perf_counter()
        header_columns(decoded.header, None)
        x = prepare_input(decoded.pixels, weights.meta)
        t3 = time.perf_counter()
        said = segment({"model_input": x[None]})
        t4 = time.perf_counter()
        mask, stats = refine(said["lung_prob"][0], decoded.pixels.shape, refine_cfg)
        score = quality_score(quality_features(said["lung_prob"][0], said["lung_prob_flip"][0], stats,
                                               refine_cfg.threshold), quality)
        row_qc(stats, refine_cfg, quality_score=score, quality_threshold=quality.threshold)
        t5 = time.perf_counter()
        variants = make_variants(decoded.pixels, mask, DEFAULT_VARIANTS, VariantConfig())
        t6 = time.perf_counter()
        for img in variants.values():
            encode_png(img)
        encode_png(mask, mask=True)
        t7 = time.perf_counter()
        for k, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            t[k] += dt
    t["rows + write"] = rows_and_write_s(paths, weights, segment)
    return {k: 1000 * v / len(paths) for k, v in t.items()}


def non_model_ms(costs: dict[str, float]) -> float:
    """The sum of the stage costs without the model's: what the CPUs do per image when a GPU runs the model."""
    return sum(v for k, v in costs.items() if k != "model")


def rows_and_write_s(paths: list[Path], weights, segment) -> float:
    """Seconds to turn `paths`' result rows (made first, by the job's own `process`, untimed) into the Arrow
    table a worker emits and to write it as a Parquet shard (`write_results`, what a writer actor runs)."""
    cfg = JobConfig(inputs=("-",), output=tempfile.mkdtemp(prefix="bench_write_"))
    try:
        layout = Layout(workers=1, segment_actors=0, segment_gpus=0)
        sources = [{"source_path": p.name, "location": os.fsencode(p), "size": p.stat().st_size} for p in paths]
        rows = [row for chunk in process(sources, segment, process_config(cfg, weights, layout)) for row in chunk]
        for _ in range(2):  # the second time counts: the first pays for first-call costs, as in stage_costs
            t0 = time.perf_counter()
            table = pa.Table.from_pylist(rows, schema=result_schema(cfg.variants))
            write_results(table, output=cfg.output, variants=tuple(cfg.variants), cfg=cfg.out)
            elapsed = time.perf_counter() - t0
        return elapsed
    finally:
        shutil.rmtree(cfg.output, ignore_errors=True)


def segmenter_bytes_per_image(weights, paths: list[Path]) -> tuple[float, float]:
    """Bytes per image of a call to the segmenter pool, in (the request's arrays) and out (the answer's),
    measured on the real segmenter: what a worker and a GPU actor exchange through the object store."""
    seg = Segmenter(weights, device="cpu", cpu_threads=1)
    x = np.stack([prepare_input(decode_image(p.read_bytes(), source=p.name).pixels, weights.meta) for p in paths])
    out = seg({"model_input": x})
    return x.nbytes / len(x), sum(v.nbytes for v in out.values()) / len(x)


class Sampler:
    """Calls `sample()` every `every_s` seconds in a thread while the `with` block runs."""

    every_s = MEMORY_SAMPLE_S

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class MemorySampler(Sampler):
    """Peaks of the driver's RSS, the summed PSS of every Ray process, and the object store, while running."""

    def __init__(self):
        super().__init__()
        self.peak = {"driver_rss_mb": 0.0, "ray_processes_pss_mb": 0.0, "object_store_mb": 0.0}

    def sample(self) -> None:
        from ray._private.internal_api import memory_summary

        now = {"driver_rss_mb": _status_kb(os.getpid(), "VmRSS") / 1024,
               "ray_processes_pss_mb": sum(_pss_kb(pid) for pid in _ray_pids()) / 1024,
               "object_store_mb": _plasma_mb(memory_summary(stats_only=True))}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)


def _status_kb(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _pss_kb(pid: int) -> float:
    try:
        m = re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.MULTILINE)
        return float(m.group(1)) if m else 0.0
    except OSError:
        return 0.0


def _ray_pids() -> list[int]:
    """Every process of the local Ray (workers, actors, raylet, GCS, plasma lives in the raylet)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::") or b"/ray/" in cmd:
                pids.append(int(d.name))
    return pids


def _plasma_mb(summary: str) -> float:
    m = re.search(r"Plasma memory usage (\d+) MiB", summary)
    spilled = re.search(r"Spilled (\d+) MiB", summary)
    return (float(m.group(1)) if m else 0.0) + (float(spilled.group(1)) if spilled else 0.0)


def start_ray(cpus: int, cores: set[int]) -> float:
    """ray.init on `cpus` CPUs with every Ray process pinned to `cores`; warm Ray Data up. Returns seconds."""
    os.sched_setaffinity(0, cores)  # inherited by the raylet and every worker it starts
    t = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(4).map_batches(lambda b: b, batch_size=None).materialize()  # Ray Data's own actors
    return time.perf_counter() - t


def job_result(wall: float, manifest: dict, n: int, ideal: float) -> dict:
    """Whole-job and steady-state (first to last result block: no start-up, no tail) rates and ratios."""
    last = manifest["runs"][-1]
    steady = last.get("steady_images_per_s") or 0.0
    return {"wall_s": wall, "images_per_s": n / wall, "ratio_to_ideal": n / wall / ideal,
            "first_result_s": last["first_result_s"], "steady_images_per_s": steady, "steady_ratio_to_ideal": steady / ideal}


def measure_stages(sample: list[Path], weights, all_cores: set[int]) -> tuple[dict, dict]:
    """Stage costs with the model and with the free one, pinned to one core and one thread."""
    os.sched_setaffinity(0, {min(all_cores)})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        return (stage_costs(sample, weights, Segmenter(weights, device="cpu", cpu_threads=1)),
                stage_costs(sample, weights, FreeSegmenter(weights)))
    finally:
        cv2.setNumThreads(0)
        os.sched_setaffinity(0, all_cores)


def run(inputs: Path, out: Path, *, weights, segmenter: type | None = None, **options) -> tuple[float, dict]:
    """run_job as jobs/preprocess.py calls it (the weights read before, as the command does before Ray starts)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    manifest = run_job(JobConfig(inputs=(str(inputs),), output=str(out), **options), segmenter=segmenter, weights=weights)
    wall = time.perf_counter() - t
    assert manifest["complete"], manifest["counts"]
    return wall, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=480, help="images of the 1k/2k mix (half each)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--small", type=int, default=20000, help="256 px images and invalid files in the scale runs")
    p.add_argument("--skip-one-core", action="store_true", help="skip step 5 (it takes about --cpus times as long)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    all_cores = os.sched_getaffinity(0)
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    res: dict = {"machine": {"cpus": args.cpus, "cpu_model": _cpu_model()}, "n": args.n}
    try:
        mix = work / "mix"
        paths = xray_mix(mix, args.n // 2, args.n - args.n // 2)
        sample = paths[::STAGE_SAMPLE_EVERY]
        weights = read_weights()

        before = measure_stages(sample, weights, all_cores)
        cores = set(sorted(all_cores)[: args.cpus])
        res["ray_start_s"] = start_ray(args.cpus, cores)
        job = run(mix, work / "out", weights=weights)
        free = run(mix, work / "out", weights=weights, segmenter=FreeSegmenter, segment=SegmentConfig(pool=True, actors=1))
        ray.shutdown()
        after = measure_stages(sample, weights, all_cores)  # the machine's speed drifts: the ideal brackets the jobs
        costs = {k: (before[0][k] + after[0][k]) / 2 for k in STAGES}
        free_costs = {k: (before[1][k] + after[1][k]) / 2 for k in STAGES}
        sum_ms, free_sum_ms = sum(costs.values()), non_model_ms(free_costs)
        res["stages_ms"] = {k: round(v, 2) for k, v in costs.items()}
        res["stage_sum_ms_before_after"] = [round(sum(before[0].values()), 1), round(sum(after[0].values()), 1)]
        res["non_model_ms"] = round(non_model_ms(costs), 2)
        res["ideal_images_per_s"] = args.cpus * 1000 / sum_ms
        res["free_ideal_images_per_s"] = args.cpus * 1000 / free_sum_ms
        res["job"] = job_result(*job, args.n, res["ideal_images_per_s"])
        res["free_model_pool"] = job_result(*free, args.n, res["free_ideal_images_per_s"])
        per_image = {k: v / args.n for k, v in job[1]["runs"][-1]["object_store_bytes"].items()}
        pool_in, pool_out = segmenter_bytes_per_image(weights, sample)
        res["object_store_bytes_per_image"] = {"sources": per_image["sources"], "segmenter_in": pool_in,
                                               "segmenter_out": pool_out, "results": per_image["results"]}

        start_ray(args.cpus, cores)
        small = small_xrays(work / "small", args.small)
        for n in (args.small // 10, args.small):
            with MemorySampler() as mem:
                wall, _ = run(small[0].parent.parent if n == args.small else _subset(small, n, work / "small_part"),
                              work / "out_small", weights=weights, segmenter=FreeSegmenter,
                              segment=SegmentConfig(pool=True, actors=1))
            res[f"memory_{n}_small"] = {**{k: round(v, 1) for k, v in mem.peak.items()}, "wall_s": round(wall, 1)}
        shutil.rmtree(work / "small", ignore_errors=True)
        junk = invalid_files(work / "junk", args.small)
        wall, manifest = run(junk[0].parent.parent, work / "out_junk", weights=weights)
        assert manifest["counts"]["errors"] == args.small
        res["invalid_rows_per_s"] = args.small / wall
        ray.shutdown()

        if not args.skip_one_core:
            res["ray_start_one_core_s"] = start_ray(1, {min(all_cores)})
            wall, _ = run(mix, work / "out", weights=weights)
            res["job_one_core"] = {"wall_s": wall, "images_per_s": args.n / wall}
            res["speedup_cpus_over_one_core"] = res["job"]["images_per_s"] / res["job_one_core"]["images_per_s"]
            ray.shutdown()
    finally:
        os.sched_setaffinity(0, all_cores)
        shutil.rmtree(work, ignore_errors=True)
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


def _subset(paths: list[Path], n: int, root: Path) -> Path:
    """A folder of hard links to the first n paths."""
    root.mkdir(parents=True, exist_ok=True)
    for p in paths[:n]:
        os.link(p, root / p.name)
    return root


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def report(res: dict, args: argparse.Namespace) -> None:
    print(f"machine: {res['machine']['cpus']} CPUs, {res['machine']['cpu_model']}; {args.n} images, half ~1k, half ~2k px, 16-bit PNG")
    print("stage costs, one core, one thread (ms/image):")
    for k, v in res["stages_ms"].items():
        print(f"  {k:12s} {v:7.1f}")
    print(f"  {'sum':12s} {sum(res['stages_ms'].values()):7.1f}   (without the model: {res['non_model_ms']:.1f}; "
          f"mean of before the jobs {res['stage_sum_ms_before_after'][0]} and after {res['stage_sum_ms_before_after'][1]})")
    print(f"Ray start-up (ray.init + Ray Data's actors), reported apart: {res['ray_start_s']:.1f} s")
    j, f = res["job"], res["free_model_pool"]
    for name, r, ideal in (("job, default options", j, res["ideal_images_per_s"]),
                           ("job, free model in a pool", f, res["free_ideal_images_per_s"])):
        print(f"{name:26s} ideal {ideal:6.2f} images/s | whole job {r['images_per_s']:6.2f} ({r['wall_s']:.1f} s), "
              f"ratio {r['ratio_to_ideal']:.2f} | steady {r['steady_images_per_s']:6.2f}, ratio "
              f"{r['steady_ratio_to_ideal']:.2f} | first result after {r['first_result_s']:.1f} s")
    if "job_one_core" in res:
        print(f"job on one core: {res['job_one_core']['images_per_s']:.2f} images/s; {args.cpus} cores / one core = "
              f"{res['speedup_cpus_over_one_core']:.2f}")
    b = res["object_store_bytes_per_image"]
    print("object store, bytes per image: " + ", ".join(f"{k} {v / 1024:.1f} KB" for k, v in b.items()))
    for n in (args.small // 10, args.small):
        m = res[f"memory_{n}_small"]
        print(f"peak memory, {n} images of 256 px: driver {m['driver_rss_mb']:.0f} MB, Ray processes {m['ray_processes_pss_mb']:.0f} MB "
              f"(PSS), object store {m['object_store_mb']:.0f} MB; {n / m['wall_s']:.0f} images/s")
    small, large = res[f"memory_{args.small // 10}_small"], res[f"memory_{args.small}_small"]
    print("memory ratio larger/smaller: " + ", ".join(
        f"{k.split('_mb')[0]} {large[k] / max(small[k], 1):.2f}" for k in ("driver_rss_mb", "ray_processes_pss_mb", "object_store_mb")))
    print(f"{args.small} invalid files: {res['invalid_rows_per_s']:.0f} rows/s")


if __name__ == "__main__":
    main()
