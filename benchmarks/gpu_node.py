"""The whole job on one GPU node, measured in one run (issue #12): the script to run on the device machine.

On the device machine (Python with CUDA torch; Ray and the decoders from the bundle, see below):

    source .device/activate && python benchmarks/gpu_node.py --out "$OUT"      # about 3 minutes on an H200 node

Here, to debug it before device time is spent (no GPU: the GPU node's layout on a CPU actor):

    .venv/bin/python benchmarks/gpu_node.py --out /tmp/gpu_node --n 200

`.device/` is built by `../shared/tools/device-bundle` (run from the project root) and carried with
the device call (`carry [".device"]`).

Steps, all in this one process, each timed:
1. inputs on local disk: `--n` X-rays made from the bundled samples (`benchmarks/inputs.py`): 45% of
   about 1k px, 45% of about 2k px (16-bit PNG, with noise), 10% copies of the bundled DICOMs;
2. `pytest tests/test_gpu.py` (the segmenter on CUDA against the CPU), its output in the log;
3. Ray started (its start-up reported apart), then the job with the default options and one GPU per
   segmenter actor (`--segment-gpus 1`), timed from `run_job`'s call to the manifest; a sampler
   records every second the CPU utilisation (/proc/stat), the GPU's utilisation and memory
   (nvidia-smi), the GPUs Ray has free (0 while the pool holds them) and the object store;
   afterwards the output is checked: `verify` and every input exactly once;
4. the same inputs with a free segmenter (a constant answer) in the same pool layout: the ceiling of
   the CPU side on this node;
5. the CPU cost per image of every stage on one core (`bench_pipeline.stage_costs`), the same with
   every core timing them at once (one process per core: shared caches, memory bandwidth and hyper-
   threads included), and the segmenter call on the GPU at the pool's batch: which one bounds the node;
6. $OUT/gpu_node.json (every figure) and $OUT/gpu_node.log.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import bench_pipeline as bench  # the sibling benchmark modules (this script's folder is on sys.path)
import numpy as np
from inputs import as_u16, sample_pixels, write_xray

from pipeline.config import POOL_BATCH, SegmentConfig
from pipeline.decode import decode_image
from pipeline.model import read_weights
from pipeline.model_input import prepare_input
from pipeline.verify import verify

log = logging.getLogger("gpu_node")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "xrays"
DICOM_SHARE = 0.10  # of the inputs: copies of the bundled DICOMs
SAMPLE_S = 1.0  # seconds between utilisation samples
STAGE_SAMPLE = 24  # images timed stage by stage on one core
GPU_REPEATS = 5  # best of, for the segmenter call on the GPU


# --- inputs ----------------------------------------------------------------------------------


@functools.cache
def _bases() -> list[np.ndarray]:
    """The bundled samples as float32 on the uint16 scale, decoded once per process."""
    return [as_u16(p) for p in sample_pixels()]


def _make_one(args: tuple[int, int, str, int]) -> str:
    """One 16-bit PNG of about `side` px from sample i % len(samples) (`inputs.write_xray`), its own random stream."""
    i, side, root, seed = args
    path = Path(root) / f"{side // 1000}k_{i:05d}.png"
    return str(write_xray(path, _bases()[i % len(_bases())], side, np.random.default_rng((seed, i))))


def make_inputs(root: Path, n: int, *, seed: int = 0) -> dict:
    """n inputs under root (see the module docstring), made on every core; what was made."""
    root.mkdir(parents=True, exist_ok=True)
    dicoms = sorted(SAMPLES.glob("*.dcm"))
    n_dicom = int(n * DICOM_SHARE) if dicoms else 0
    n_png = n - n_dicom
    jobs = [(i, 1024 if i < n_png // 2 else 2048, str(root), seed) for i in range(n_png)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_make_one, jobs, chunksize=8))
    for i in range(n_dicom):
        src = dicoms[i % len(dicoms)]
        shutil.copyfile(src, root / f"dicom_{i:05d}_{src.name}")
    return {"n": n, "png_1k": n_png // 2, "png_2k": n_png - n_png // 2, "dicom": n_dicom,
            "bytes": sum(p.stat().st_size for p in root.iterdir())}


# --- sampling --------------------------------------------------------------------------------


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _gpu_now() -> dict | None:
    """{"util_pct", "mem_mb"} of GPU 0 from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    util, mem = (float(v) for v in out.splitlines()[0].split(","))
    return {"util_pct": util, "mem_mb": mem}


class UtilSampler(bench.Sampler):
    """Every SAMPLE_S seconds while running: CPU %, GPU % and memory, GPUs free in Ray, object store MB."""

    every_s = SAMPLE_S

    def __init__(self):
        super().__init__()
        self.samples: list[dict] = []
        self._cpu = _cpu_times()

    def sample(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        (busy, total), self._cpu = self._cpu, _cpu_times()
        now = {"t_s": round(time.perf_counter() - self.started, 1),
               "cpu_pct": round(100.0 * (self._cpu[0] - busy) / max(self._cpu[1] - total, 1e-9), 1),
               "ray_gpus_free": ray.available_resources().get("GPU", 0.0),
               "object_store_mb": bench._plasma_mb(memory_summary(stats_only=True))}
        gpu = _gpu_now()
        if gpu:
            now.update(gpu_util_pct=gpu["util_pct"], gpu_mem_mb=gpu["mem_mb"])
        self.samples.append(now)

    def summary(self) -> dict:
        def stats(key: str) -> dict | None:
            values = [s[key] for s in self.samples if key in s]
            return {"mean": round(float(np.mean(values)), 1), "max": round(float(np.max(values)), 1)} if values else None

        return {"n": len(self.samples), "cpu_pct": stats("cpu_pct"), "gpu_util_pct": stats("gpu_util_pct"),
                "gpu_mem_mb": stats("gpu_mem_mb"), "object_store_mb": stats("object_store_mb"),
                "ray_gpus_free_min": min((s["ray_gpus_free"] for s in self.samples), default=None)}


# --- stage costs with every core busy ----------------------------------------------------------


def _threads_per_core() -> int | None:
    """Hardware threads that share CPU 0's core (2 where the cores are hyper-threads), from sysfs."""
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return None
    return sum(int(b) - int(a) + 1 for a, b in (part.split("-") if "-" in part else (part, part) for part in siblings.split(",")))


def _free_costs_on(core: int, sample: list[str]) -> dict[str, float]:
    """The non-model stage costs (ms/image) in this process, pinned to `core`: the second of two passes."""
    import cv2

    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    weights = read_weights()
    paths = [Path(p) for p in sample]
    bench.stage_costs(paths, weights, bench.FreeSegmenter(weights))  # the first pass: every process up and busy
    return bench.stage_costs(paths, weights, bench.FreeSegmenter(weights))


def loaded_stage_costs(sample: list[Path], cores: set[int]) -> dict[str, float]:
    """The non-model stage costs with one process per core timing them at once (ms/image, the mean over
    cores): what the job's stages cost when every core works, shared caches, memory and turbo included."""
    with ProcessPoolExecutor(max_workers=len(cores)) as pool:
        per_core = list(pool.map(_free_costs_on, sorted(cores), [[str(p) for p in sample]] * len(cores)))
    return {k: float(np.mean([c[k] for c in per_core])) for k in per_core[0]}


# --- the runs --------------------------------------------------------------------------------


def exactly_once(out: Path, manifest: dict, n: int) -> dict:
    """What the output says about the inputs: verify's problems and the manifest's counts."""
    c = manifest["counts"]
    problems = verify(str(out))
    return {"verify_problems": problems[:10], "images_in": c["images_in"], "ok": c["ok"], "errors": c["errors"],
            "missing": c["missing"], "duplicated": c["duplicated"],
            "every_input_once": not problems and c["images_in"] == n and c["ok"] + c["errors"] == n
            and c["missing"] == 0 and c["duplicated"] == 0,
            "error_reasons": manifest.get("error_reasons", [])[:3]}


def timed_job(inputs: Path, out: Path, n: int, *, weights, segment: SegmentConfig, segmenter: type | None = None) -> dict:
    with UtilSampler() as util:
        wall, manifest = bench.run(inputs, out, weights=weights, segmenter=segmenter, segment=segment)
    last = manifest["runs"][-1]
    return {"wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
            "steady_images_per_s": last.get("steady_images_per_s"), "first_result_s": last.get("first_result_s"),
            "utilisation": util.summary(), "samples": util.samples, "output": exactly_once(out, manifest, n)}


def gpu_segmenter_ms(weights, paths: list[Path], device: str) -> dict:
    """ms per image of the segmenter call (orientation + image and mirror image) at the pool's batch, on `device`."""
    import torch

    from pipeline.segment import Segmenter

    seg = Segmenter(weights, device=device)
    images = [decode_image(p.read_bytes(), source=p.name).pixels for p in paths]
    x = np.stack([prepare_input(images[i % len(images)], weights.meta) for i in range(POOL_BATCH)])
    seg({"model_input": x})  # warm-up
    best = float("inf")
    for _ in range(GPU_REPEATS):
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        seg({"model_input": x})
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return {"device": str(seg.device), "batch": POOL_BATCH, "ms_per_image": round(1000 * best / POOL_BATCH, 3),
            "name": torch.cuda.get_device_name(0) if seg.device.type == "cuda" else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_node"), help="folder for gpu_node.json and the log")
    p.add_argument("--n", type=int, default=3000, help="inputs")
    p.add_argument("--work", default=None, help="folder for inputs and outputs (default: a new temporary folder)")
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out_dir / "gpu_node.log")])
    import ray
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_node_"))
    gpu = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0))
    res: dict = {"machine": {"cpus": cpus, "threads_per_core": _threads_per_core(), "cpu_model": bench._cpu_model(),
                             "gpu": torch.cuda.get_device_name(0) if gpu else None,
                             "python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__}}
    log.info("machine: %s", res["machine"])

    t = time.perf_counter()
    res["inputs"] = make_inputs(work / "in", args.n)
    res["inputs"]["seconds"] = round(time.perf_counter() - t, 1)
    log.info("inputs: %s", res["inputs"])

    t = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py")],
                           capture_output=True, text=True, cwd=REPO, check=False)
    res["test_gpu"] = {"returncode": tests.returncode, "tail": tests.stdout.strip().splitlines()[-1:],
                       "seconds": round(time.perf_counter() - t, 1)}
    log.info("tests/test_gpu.py (rc %d):\n%s", tests.returncode, tests.stdout[-3000:])

    weights = read_weights()
    res["ray_start_s"] = round(bench.start_ray(cpus, os.sched_getaffinity(0)), 2)
    log.info("Ray started in %.1f s: %s", res["ray_start_s"], ray.cluster_resources())
    segment = SegmentConfig(gpus_per_actor=1.0) if gpu else SegmentConfig(pool=True, actors=1)
    res["job"] = timed_job(work / "in", work / "out", args.n, weights=weights, segment=segment)
    log.info("job: %s", {k: v for k, v in res["job"].items() if k != "samples"})
    res["free_model"] = timed_job(work / "in", work / "out_free", args.n, weights=weights, segmenter=bench.FreeSegmenter,
                                  segment=segment)
    log.info("free model: %s", {k: v for k, v in res["free_model"].items() if k != "samples"})
    res["job_over_free_model"] = round(res["job"]["images_per_s"] / res["free_model"]["images_per_s"], 3)
    ray.shutdown()

    sample = sorted((work / "in").glob("*.png"))[:: max(1, (args.n - int(args.n * DICOM_SHARE)) // STAGE_SAMPLE)][:STAGE_SAMPLE]
    costs, free_costs = bench.measure_stages(sample, weights, os.sched_getaffinity(0))
    res["stages_ms_one_core"] = {k: round(v, 2) for k, v in costs.items()}
    non_model = bench.non_model_ms(free_costs)
    res["cpu_ms_per_image_without_model"] = round(non_model, 1)
    res["cpu_side_ideal_images_per_s"] = round(cpus * 1000 / non_model, 1)
    loaded = loaded_stage_costs(sample, os.sched_getaffinity(0))
    res["stages_ms_every_core_busy"] = {k: round(v, 2) for k, v in loaded.items()}
    loaded_non_model = bench.non_model_ms(loaded)
    res["cpu_side_ideal_every_core_busy_images_per_s"] = round(cpus * 1000 / loaded_non_model, 1)
    res["steady_over_cpu_side_ideal_every_core_busy"] = round(
        (res["job"]["steady_images_per_s"] or 0) / res["cpu_side_ideal_every_core_busy_images_per_s"], 3)
    res["segmenter"] = gpu_segmenter_ms(weights, sample[:8], "cuda" if gpu else "cpu")
    gpu_rate = 1000 / res["segmenter"]["ms_per_image"]
    res["bound"] = "segmenter" if gpu_rate < res["cpu_side_ideal_images_per_s"] else "CPU stages"
    res["segmenter_images_per_s"] = round(gpu_rate, 1)
    res["job_over_cpu_side_ideal"] = round(res["job"]["images_per_s"] / res["cpu_side_ideal_images_per_s"], 3)
    (out_dir / "gpu_node.json").write_text(json.dumps(res, indent=1))
    log.info("stages (ms/image, one core): %s", res["stages_ms_one_core"])
    log.info("node: CPU side ideal %.1f images/s (%d cores / %.1f ms), segmenter %.1f images/s on %s: bound by %s",
             res["cpu_side_ideal_images_per_s"], cpus, non_model, gpu_rate, res["segmenter"]["device"], res["bound"])
    for name in ("job", "free_model"):
        r = res[name]
        log.info("%s: %.1f images/s (%.1f s), steady %s, every input once: %s, utilisation %s", name, r["images_per_s"],
                 r["wall_s"], r["steady_images_per_s"], r["output"]["every_input_once"], r["utilisation"])
    log.info("job / free model = %.3f; job / CPU-side ideal = %.3f", res["job_over_free_model"], res["job_over_cpu_side_ideal"])
    log.info("stages with every core busy (ms/image): %s; CPU-side ideal then %.1f images/s; steady job / that = %.3f",
             res["stages_ms_every_core_busy"], res["cpu_side_ideal_every_core_busy_images_per_s"],
             res["steady_over_cpu_side_ideal_every_core_busy"])
    shutil.rmtree(work, ignore_errors=True)
    return 0 if res["job"]["output"]["every_input_once"] and res["free_model"]["output"]["every_input_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
