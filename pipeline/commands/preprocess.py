"""Preprocess chest X-rays into lung-focused Parquet shards.

    xray-lung-prep preprocess --input PATH [PATH ...] --output PATH [options]

Starts a local Ray when none is running; under `ray job submit` it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipeline.bookkeeping import JobError, check_output
from pipeline.cli import HelpFormatter
from pipeline.config import (
    POOL_BATCH,
    SOURCE_PATH_MODES,
    WORKER_BATCH,
    JobConfig,
    SegmentConfig,
)
from pipeline.decode import DecodeConfig
from pipeline.model import read_weights
from pipeline.variants import (
    DEFAULT_VARIANTS,
    VARIANT_CONTRASTS,
    VARIANT_REGIONS,
    VariantConfig,
)
from pipeline.writer import OutputConfig

log = logging.getLogger("preprocess")

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job
SUMMARY_REASONS = 3  # error reasons printed at the end (the manifest keeps more)
KEY_ENV = "XRAY_PSEUDONYM_KEY"  # environment variable that may hold the HMAC key
CPU_PRECISIONS = {"auto": None, "fp32": False, "bf16": True}  # --segment-cpu-precision -> SegmentConfig.cpu_bf16


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input folders/files or URIs (s3://, gs://, file://), searched recursively")
    p.add_argument("--output", required=True, help="output folder or URI; must be new or empty unless --resume")
    p.add_argument("--resume", action="store_true", help="continue a killed run into the same output: finished inputs are skipped")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help=f"image variants: REGION[_CONTRAST], REGION in {VARIANT_REGIONS}, CONTRAST in {tuple(c for c in VARIANT_CONTRASTS if c)}")
    p.add_argument("--model", default=None, help="weights file (default: the model shipped in the package)")
    p.add_argument("--size", type=int, default=None, help="output side in px (default: keep the source/crop size)")
    p.add_argument("--resize-mode", choices=("letterbox", "square"), default="letterbox", help="with --size: keep aspect and pad, or stretch")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="bit depth of the variant PNGs")
    p.add_argument("--crop-margin", type=float, default=VariantConfig.crop_margin_frac, help="margin around the lung box, fraction of its side")
    p.add_argument("--pad-square", action="store_true", help="pad crops to a square before resizing")
    p.add_argument("--max-pixels", type=int, default=DecodeConfig.max_pixels, help="refuse images with more pixels than this")
    p.add_argument("--source-path", choices=SOURCE_PATH_MODES, default="relative",
                   help="write source_path relative to its input root, absolute, or as a keyed hash")
    p.add_argument("--pseudonym-key-file", default=None,
                   help=f"file holding the HMAC key for pseudonymous ids and hashed paths (or set {KEY_ENV})")
    p.add_argument("--rows-per-shard", type=int, default=OutputConfig.rows_per_shard, help="rows per Parquet shard at most")
    p.add_argument("--max-shard-mb", type=int, default=OutputConfig.max_shard_bytes // 2**20, help="MB per Parquet shard at most")
    p.add_argument("--segment-gpus", type=float, default=None, help="GPUs per segmenter actor (default: 1 if the cluster has GPUs, else CPU)")
    p.add_argument("--segment-actors", type=int, default=None, help="segmenter pool size (default: one per GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU workers, one CPU each (default: every CPU of the cluster when the job starts)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or "local",
                   help="Ray to run on: $RAY_ADDRESS when set (as under `ray job submit`), else a new local Ray; "
                        "'auto' joins a cluster started with `ray start` on this machine")
    p.add_argument("--segment-start-timeout", type=float, default=SegmentConfig.start_timeout_s,
                   help="seconds the segmenter pool may take to start (GPU nodes being added); then the job stops")
    p.add_argument("--segment-batch", type=int, default=None,
                   help=f"images per model call (default: {POOL_BATCH} with a GPU pool, {WORKER_BATCH} on CPU workers)")
    p.add_argument("--fix-orientation", action="store_true",
                   help="turn an image that the orientation check finds rotated or mirrored upright before segmenting "
                        "(it is flagged either way; without this option it also fails QC)")
    p.add_argument("--no-mirror-view", dest="mirror_view", action="store_false",
                   help="do not also segment the mirror image: half the model's cost on a CPU; quality_score then "
                        "comes from the other signals (see the model card for how well it ranks masks either way)")
    p.add_argument("--orientation-model", default=None,
                   help="orientation classifier file (default: the one shipped in the package)")
    p.add_argument("--segment-cpu-precision", choices=tuple(CPU_PRECISIONS), default="auto",
                   help="model arithmetic of CPU segmenter actors; auto: bf16 where the CPU has native bf16 "
                        "(AVX512-BF16, AMX; 3.5x faster, same Dice), else fp32")
    return p.parse_args(argv)


def read_key(path: str | None) -> bytes | None:
    if path:
        with open(path, "rb") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"pseudonym key file {path} is empty")
        return key
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        inputs=tuple(args.input),
        output=args.output,
        variants=tuple(args.variants),
        source_path_mode=args.source_path,
        pseudonym_key=read_key(args.pseudonym_key_file),
        resume=args.resume,
        decode=DecodeConfig(max_pixels=args.max_pixels),
        workers=args.workers,
        segment=SegmentConfig(weights=args.model, orientation_weights=args.orientation_model,
                              fix_orientation=args.fix_orientation, mirror_view=args.mirror_view,
                              gpus_per_actor=args.segment_gpus,
                              actors=args.segment_actors, batch_size=args.segment_batch,
                              start_timeout_s=args.segment_start_timeout,
                              cpu_bf16=CPU_PRECISIONS[args.segment_cpu_precision]),
        variant=VariantConfig(size=args.size, resize_mode=args.resize_mode, bit_depth=args.bit_depth,
                              crop_margin_frac=args.crop_margin, pad_square=args.pad_square),
        out=OutputConfig(rows_per_shard=args.rows_per_shard, max_shard_bytes=args.max_shard_mb * 2**20),
    )


def where(output: str) -> str:
    """The output as the user can find it: the URI, or the absolute path."""
    return output if "://" in output else os.path.abspath(output)


def check_submitted_output(output: str) -> None:
    """Under `ray job submit` the working directory is Ray's temporary copy: a relative output would vanish there."""
    if os.environ.get(SUBMITTED_JOB_ENV) and "://" not in output and not os.path.isabs(output):
        raise ValueError(f"--output {output} is relative, and under `ray job submit` it would land in Ray's temporary "
                         "working directory; give an absolute path on shared storage or a URI (s3://, gs://)")


def summary(manifest: dict, output: str, seconds: float) -> list[str]:
    """The end-of-run lines: counts, QC, the main error reasons, where things are, the rate."""
    c = manifest["counts"]
    flags = ", ".join(f"{n} {flag}" for flag, n in c["qc_flags"].items()) or "no QC flag"
    rate = manifest["runs"][-1]["processed"] / seconds if seconds > 0 else 0.0
    lines = [(f"done: {c['images_in']} inputs: {c['ok']} images ({c['qc_failed']} failing QC; {flags}), "
              f"{c['errors']} errors; {rate:.1f} images/s over {seconds:.1f} s, start-up included")]
    for r in manifest.get("error_reasons", [])[:SUMMARY_REASONS]:
        lines.append(f"  {r['count']} x {r['stage']} {r['error_type']}: {r['reason']}")
    lines.append(f"output: {where(output)} (images/, errors/, manifest.json; check it with `xray-lung-prep verify`)")
    return lines


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    started = time.time()  # the rate counts Ray's start-up too: it is part of what the user waits for
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, prog)
    try:
        cfg = config_from_args(args)
        check_submitted_output(cfg.output)
        for path in cfg.inputs:
            if "://" not in path and not os.path.lexists(path):
                raise ValueError(f"input {path} does not exist")
        weights = read_weights(cfg.segment.weights, orientation=cfg.segment.orientation_weights)  # read and checked once, before Ray starts
        check_output(cfg, weights)
    except (ValueError, OSError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    from pipeline.dataset import run_job

    ray.init(address=args.ray_address, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job's own bar counts images, end to end
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.ray_address == "local" and (cfg.segment.gpus_per_actor or 0) > gpus:  # no autoscaler will add one
        print(f"error: --segment-gpus {cfg.segment.gpus_per_actor:g} asks for GPUs, this machine has {gpus:g}", file=sys.stderr)
        ray.shutdown()
        return 2
    try:
        manifest = run_job(cfg, weights=weights)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(manifest, cfg.output, time.time() - started)))
    c = manifest["counts"]
    if c["ok"] == 0:  # nothing to train on is a failure, whatever the reason
        what = "no input files were found" if c["images_in"] == 0 else f"none of the {c['images_in']} inputs became an image"
        print(f"error: {what}; the reasons are in {where(cfg.output)}/errors", file=sys.stderr)
        return 1
    return 0
