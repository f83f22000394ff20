"""The pipeline as a Ray Dataset, and the job that writes it out exactly once.

    discover -> read (XrayFileDatasource) -> decode (CPU tasks) -> segment (actor pool, GPU
    when there is one) -> refine + variants (CPU tasks) -> write shards (CPU tasks) -> manifest

`build_dataset` returns the lazy Dataset of result rows for users who want to compose it;
`run_job` adds resume, the exactly-once write and the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections import Counter
from datetime import datetime, timezone

import ray

from pipeline.config import JobConfig
from pipeline.datasource import XrayFileDatasource
from pipeline.discover import SourceFile, discover
from pipeline.model import model_checksum, read_model_meta
from pipeline.privacy import hashed_path
from pipeline.schema import images_schema
from pipeline.segment import Segmenter
from pipeline.stages import PostprocessConfig, decode_batch, postprocess_batch
from pipeline.writer import (
    ERRORS_DIR,
    IMAGES_DIR,
    done_source_paths,
    list_shards,
    output_is_empty,
    read_manifest,
    remove_duplicate_rows,
    remove_temporary_files,
    write_manifest,
    write_shards,
)

log = logging.getLogger(__name__)

CPUS_PER_CPU_ACTOR = 4  # on a CPU-only cluster, one segmenter actor per this many CPUs


class JobError(RuntimeError):
    """The job cannot start or did not account for every input."""


def source_files(cfg: JobConfig) -> list[SourceFile]:
    """The discovered inputs, with `rel_path` already in the form written as source_path."""
    files = discover(list(cfg.inputs))
    if cfg.source_path_mode == "absolute":
        files = [dataclasses.replace(f, rel_path=f.location) for f in files]
    elif cfg.source_path_mode == "hashed":
        files = [dataclasses.replace(f, rel_path=hashed_path(f.rel_path, cfg.pseudonym_key)) for f in files]
    return files


def segmenter_resources(cfg: JobConfig) -> tuple[float, int]:
    """(GPUs per actor, max actors) for the segmenter pool on the connected cluster."""
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = cfg.segment.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    if cfg.segment.max_actors is not None:
        return gpus, cfg.segment.max_actors
    if gpus > 0:
        return gpus, max(1, int(cluster_gpus / gpus))
    return gpus, max(1, cluster_cpus // CPUS_PER_CPU_ACTOR)


def build_dataset(files: list[SourceFile], cfg: JobConfig, *, segmenter: type = Segmenter) -> ray.data.Dataset:
    """The lazy Dataset of result rows (image rows and error rows) for `files`.

    `segmenter` is the callable class run as the actor pool (Segmenter, or a subclass).
    """
    meta = read_model_meta(cfg.segment.weights)
    post = PostprocessConfig(
        variants=tuple(cfg.variants),
        refine=cfg.refine,
        variant=cfg.variant,
        model_name=meta.name,
        model_sha256=model_checksum(cfg.segment.weights),
    )
    gpus, max_actors = segmenter_resources(cfg)
    ds = ray.data.read_datasource(XrayFileDatasource(files, cfg.read))
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=cfg.decode_batch_size,
        fn_kwargs={"cfg": cfg.decode, "meta": meta, "pseudonym_key": cfg.pseudonym_key},
        num_cpus=1,
        memory=cfg.decode_memory_mb * 2**20,
    )
    ds = ds.map_batches(
        segmenter,
        batch_format="pyarrow",
        batch_size=cfg.segment.batch_size,
        fn_constructor_kwargs={"weights": cfg.segment.weights, "cpu_threads": cfg.segment.cpu_threads,
                               "cpu_bf16": cfg.segment.cpu_bf16},
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.segment.min_actors, max_actors), max_size=max_actors),
        num_gpus=gpus,
        num_cpus=0 if gpus > 0 else cfg.segment.cpu_threads,
    )
    return ds.map_batches(
        postprocess_batch,
        batch_format="pyarrow",
        batch_size=cfg.postprocess_batch_size,
        fn_kwargs={"cfg": post, "input_size": meta.input_size},
        num_cpus=1,
    )


def preprocess(inputs: list[str], output: str = "", **options) -> ray.data.Dataset:
    """Public entry for composing: the lazy result Dataset for `inputs` with JobConfig options."""
    cfg = JobConfig(inputs=tuple(inputs), output=output, **options)
    return build_dataset(source_files(cfg), cfg)


def check_output(cfg: JobConfig) -> None:
    """Refuse an output that holds something unless resuming into one of ours."""
    if output_is_empty(cfg.output):
        return
    if not cfg.resume:
        raise JobError(f"output {cfg.output} exists and is not empty; choose a new folder or pass --resume")
    shards = list_shards(cfg.output)
    if not (shards[IMAGES_DIR] or shards[ERRORS_DIR] or read_manifest(cfg.output)):
        raise JobError(f"--resume given but {cfg.output} holds no shards of this job")


def library_versions() -> dict[str, str]:
    import cv2
    import numpy
    import pyarrow
    import pydicom
    import torch

    return {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "pyarrow": pyarrow.__version__,
        "pydicom": pydicom.__version__,
    }


def run_job(cfg: JobConfig, *, segmenter: type = Segmenter) -> dict:
    """Process every input not yet in the output, then write and return the manifest.

    Raises JobError before any work when the output is not usable, and after the work when
    the output does not hold every discovered input exactly once.
    """
    started = time.time()
    check_output(cfg)
    files = source_files(cfg)
    removed = remove_temporary_files(cfg.output)
    if removed:
        log.info("removed %d half-written shards from an earlier run", removed)
    done = done_source_paths(cfg.output)
    already = set(done[IMAGES_DIR]) | set(done[ERRORS_DIR])
    todo = [f for f in files if f.rel_path not in already]
    log.info("%d inputs, %d already done, %d to process", len(files), len(files) - len(todo), len(todo))
    if todo:
        results = build_dataset(todo, cfg, segmenter=segmenter)
        written = results.map_batches(
            write_shards,
            batch_format="pyarrow",
            batch_size=cfg.out.rows_per_shard,
            fn_kwargs={"output": cfg.output, "images_schema": images_schema(list(cfg.variants)), "cfg": cfg.out},
            num_cpus=0.5,
        )
        for _ in written.iter_rows():
            pass
    manifest = finalize(cfg, files, processed=len(todo), started=started)
    return manifest


def finalize(cfg: JobConfig, files: list[SourceFile], *, processed: int, started: float) -> dict:
    """Check that every input is in the output exactly once, then write the manifest."""
    removed = remove_duplicate_rows(cfg.output)
    done = done_source_paths(cfg.output)
    expected = {f.rel_path for f in files}
    seen = Counter(done[IMAGES_DIR]) + Counter(done[ERRORS_DIR])
    duplicated = sorted(p for p, n in seen.items() if n > 1)
    missing = sorted(expected - set(seen))
    unexpected = sorted(set(seen) - expected)
    previous = read_manifest(cfg.output) or {}
    wall = time.time() - started
    meta = read_model_meta(cfg.segment.weights)
    shards = list_shards(cfg.output)
    manifest = {
        "complete": not (duplicated or missing),
        "counts": {
            "images_in": len(files),
            "ok": len(done[IMAGES_DIR]),
            "errors": len(done[ERRORS_DIR]),
            "missing": len(missing),
            "duplicated": len(duplicated),
            "not_in_input": len(unexpected),
            "duplicates_removed": removed,
        },
        "options": cfg.options(),
        "model": {"name": meta.name, "sha256": model_checksum(cfg.segment.weights), "meta": meta.to_dict()},
        "versions": library_versions(),
        "wall_time_s": round(wall, 3),
        "runs": previous.get("runs", []) + [{
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 3),
            "processed": processed,
            "resumed": cfg.resume,
        }],
        "shards": {kind: [p.rsplit("/", 1)[-1] for p in paths] for kind, paths in shards.items()},
    }
    write_manifest(cfg.output, manifest)
    manifest = read_manifest(cfg.output)  # as written: plain JSON types
    if duplicated or missing:
        raise JobError(
            f"output does not hold every input exactly once: {len(missing)} missing, {len(duplicated)} duplicated "
            f"(first: {(missing + duplicated)[:3]})"
        )
    return manifest
