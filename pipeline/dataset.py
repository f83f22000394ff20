"""The job on Ray: the one module that knows Ray and Arrow tables. The work itself is `pipeline.process`.

    discover (driver)
      -> source blocks: paths only, <= task_files inputs and ~task_bytes input bytes each (driver)
      -> ImageWorker actors, one CPU each: read, decode, model input, [segment], refine, variants, PNG
             [segment] = the model in the worker itself (CPU nodes), or a call to the segmenter
                         pool, GPU actors that get uint8 S x S inputs and return uint8 S x S
                         probabilities (GPU nodes)
      -> write tasks: the driver groups the workers' output blocks by their metadata, <= rows_per_shard
             rows and ~max_shard_bytes, never touching the bytes itself
      -> finalize (pipeline.bookkeeping)

Why this shape (measured in docs/BENCHMARKS.md): the full-resolution pixels never leave the worker
that decoded them, so nothing but 64 KB in and 64 KB out per image crosses to a GPU node, and nothing
grows in the object store ahead of the GPU pool; on a CPU node every core runs whole images with no
stage waiting on another. Output blocks wait in the object store only until a shard's worth is
there, and at most `writes_in_flight` shards are being written at once.

`build_dataset` returns the lazy Dataset of result rows for users who compose their own pipeline;
`run_job` adds resume, the exactly-once write and the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipeline.bookkeeping import JobError, check_output, finalize, pending
from pipeline.config import POOL_BATCH, WORKER_BATCH, JobConfig
from pipeline.discover import SourceFile, discover, is_uri
from pipeline.privacy import hashed_path
from pipeline.process import ProcessConfig, process
from pipeline.schema import SOURCE_SCHEMA, result_schema
from pipeline.writer import OutputConfig, write_results

log = logging.getLogger(__name__)

WRITES_PER_WORKERS = 8  # one shard write in flight per this many workers (at least MIN_WRITES_IN_FLIGHT)
MIN_WRITES_IN_FLIGHT = 2
TAIL_SHARE = 2  # a block holds at most 1 / (TAIL_SHARE * workers) of the work left (see source_blocks)
CALLS_QUEUED_PER_WORKER = 2  # a worker starts its next block as soon as one ends
WRITE_RETRIES = 3  # a write task is retried this often (its shard name makes a retry replace, not add)

__all__ = ["JobError", "Layout", "build_dataset", "check_output", "plan_layout", "preprocess", "run_job", "source_files"]


@dataclass(frozen=True)
class Layout:
    """How the job uses the cluster it is connected to."""

    workers: int  # ImageWorker actors, one CPU each
    segment_actors: int  # segmenter pool actors; 0 = the model runs inside every worker
    segment_gpus: float  # GPUs per segmenter pool actor

    @property
    def writes_in_flight(self) -> int:
        return max(MIN_WRITES_IN_FLIGHT, self.workers // WRITES_PER_WORKERS)


def plan_layout(cfg: JobConfig) -> Layout:
    """Workers and segmenter pool for the connected cluster (as it is now) and the options."""
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    seg = cfg.segment
    gpus = seg.gpus_per_actor if seg.gpus_per_actor is not None else (1.0 if cluster_gpus > 0 else 0.0)
    pool = seg.pool if seg.pool is not None else gpus > 0
    actors = 0
    if pool:
        actors = seg.actors or (max(1, int(cluster_gpus / gpus)) if gpus > 0 else 1)
    return Layout(workers=cfg.workers or max(1, cluster_cpus), segment_actors=actors, segment_gpus=gpus if pool else 0.0)


def source_files(cfg: JobConfig) -> list[SourceFile]:
    """The discovered inputs, with `rel_path` already in the form written as source_path."""
    files = discover(list(cfg.inputs))
    if cfg.source_path_mode == "absolute":
        files = [dataclasses.replace(f, rel_path=f.location) for f in files]
    elif cfg.source_path_mode == "hashed":
        files = [dataclasses.replace(f, rel_path=hashed_path(f.rel_path, cfg.pseudonym_key)) for f in files]
    return files


def source_blocks(files: list[SourceFile], cfg: JobConfig, *, workers: int) -> list[pa.Table]:
    """SOURCE_SCHEMA tables, one per worker call, in the order of `files`.

    A block holds at most cfg.task_files inputs and about cfg.task_bytes listed bytes, and at most a
    1 / (TAIL_SHARE * workers) share of what is left after it ("guided" sizes): the first blocks are
    large (little per-call overhead), the last ones small, so the workers finish together.
    """
    remaining_files, remaining_bytes = len(files), sum(f.size or 0 for f in files)
    share = max(1, workers * TAIL_SHARE)
    blocks, rows, size = [], [], 0
    for f in files:
        n = f.size or 0
        max_files = max(1, min(cfg.task_files, -(-remaining_files // share)))
        max_bytes = max(1, min(cfg.task_bytes, remaining_bytes // share))
        if rows and (len(rows) >= max_files or size + n > max_bytes):
            blocks.append(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA))
            remaining_files, remaining_bytes = remaining_files - len(rows), remaining_bytes - size
            rows, size = [], 0
        location = f.location.encode("utf-8") if is_uri(f.location) else os.fsencode(f.location)
        rows.append({"source_path": f.rel_path, "location": location, "size": f.size})
        size += n
    if rows:
        blocks.append(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA))
    return blocks


class PoolSegmenter:
    """A segmenter pool actor: the model, loaded once from the weights in the object store."""

    def __init__(self, weights, segmenter: type, cpu_bf16: bool | None):
        self.model = segmenter(weights, cpu_bf16=cpu_bf16)

    def segment(self, batch: dict) -> dict:
        return self.model(batch)

    def ready(self) -> bool:
        return True


class PoolClient:
    """What a worker calls instead of a model: one pool actor per call, round robin from a random start."""

    def __init__(self, actors: list):
        start = random.randrange(len(actors))  # workers spread their first calls over the pool
        self.actors = itertools.cycle(actors[start:] + actors[:start])

    def __call__(self, batch: dict) -> dict:
        return ray.get(next(self.actors).segment.remote(batch))


class ImageWorker:
    """The Ray Data UDF: a block of SOURCE rows -> blocks of result rows, one per chunk of images."""

    def __init__(self, cfg: ProcessConfig, weights_ref, pool: list | None, segmenter: type | None,
                 cpu_bf16: bool | None):
        import cv2

        cv2.setNumThreads(1)  # one CPU per worker: OpenCV's own threads would only compete with the others
        self.cfg = cfg
        self.schema = result_schema(cfg.variants)
        if pool:
            self.segment = PoolClient(pool)
        else:
            self.segment = segmenter(ray.get(weights_ref), device="cpu", cpu_threads=1, cpu_bf16=cpu_bf16)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for rows in process(batch.to_pylist(), self.segment, self.cfg):
            yield pa.Table.from_pylist(rows, schema=self.schema)


def process_config(cfg: JobConfig, weights, layout: Layout) -> ProcessConfig:
    """What every worker needs: the options, the model's identity, its threshold unless the user set one."""
    refine = cfg.refine if cfg.refine.threshold is not None else dataclasses.replace(cfg.refine, threshold=weights.meta.threshold)
    batch = cfg.segment.batch_size or (POOL_BATCH if layout.segment_actors else WORKER_BATCH)
    return ProcessConfig(variants=tuple(cfg.variants), model=weights.meta, model_sha256=weights.sha256, refine=refine,
                         read=cfg.read, decode=cfg.decode, variant=cfg.variant, pseudonym_key=cfg.pseudonym_key,
                         segment_batch=batch)


def start_segmenter_pool(layout: Layout, weights_ref, segmenter: type, cpu_bf16: bool | None) -> list:
    """The segmenter pool's actors (restarted by Ray if they die; a call to a restarting actor is retried)."""
    actor = ray.remote(PoolSegmenter).options(num_gpus=layout.segment_gpus, num_cpus=0, max_restarts=-1,
                                              max_task_retries=-1)
    actors = [actor.remote(weights_ref, segmenter, cpu_bf16) for _ in range(layout.segment_actors)]
    log.info("segmenter pool: %d actors, %s GPU each", len(actors), layout.segment_gpus)
    return actors


def build_dataset(files: list[SourceFile], cfg: JobConfig, *, segmenter: type | None = None,
                  layout: Layout | None = None, weights=None) -> ray.data.Dataset:
    """The lazy Dataset of result rows (image rows and error rows) for `files`.

    `segmenter` is the model class (pipeline.segment.Segmenter, or a subclass), run inside every
    worker or as the segmenter pool (`plan_layout`).
    """
    from pipeline.model import (
        read_weights,  # the driver reads the weights once; workers never import torch for it
    )
    from pipeline.segment import Segmenter

    segmenter = segmenter or Segmenter
    weights = weights or read_weights(cfg.segment.weights)
    layout = layout or plan_layout(cfg)
    weights_ref = ray.put(weights)
    pool = start_segmenter_pool(layout, weights_ref, segmenter, cfg.segment.cpu_bf16) if layout.segment_actors else None
    blocks = source_blocks(files, cfg, workers=layout.workers)
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(
        ImageWorker,
        batch_size=None,  # one source block per call: blocks are already sized by files and bytes
        batch_format="pyarrow",
        fn_constructor_kwargs={"cfg": process_config(cfg, weights, layout), "weights_ref": weights_ref, "pool": pool,
                               "segmenter": None if pool else segmenter, "cpu_bf16": cfg.segment.cpu_bf16},
        compute=ray.data.ActorPoolStrategy(size=max(1, min(layout.workers, len(blocks))),
                                           max_tasks_in_flight_per_actor=CALLS_QUEUED_PER_WORKER),
        num_cpus=1,
    )


def preprocess(inputs: list[str], output: str = "", **options) -> ray.data.Dataset:
    """Public entry for composing: the lazy result Dataset for `inputs` with JobConfig options."""
    cfg = JobConfig(inputs=tuple(inputs), output=output, **options)
    return build_dataset(source_files(cfg), cfg)


def _write_task(*blocks: pa.Table, output: str, variants: tuple[str, ...], cfg: OutputConfig) -> list[dict]:
    return write_results(pa.concat_tables(blocks), output=output, variants=variants, cfg=cfg)


def write_dataset(results: ray.data.Dataset, cfg: JobConfig, *, writes_in_flight: int) -> list[dict]:
    """Stream the result blocks into shard write tasks; returns one summary per shard written.

    The driver sees only block references and their metadata (rows, bytes): a group of blocks becomes
    one write task when the next block would take it over rows_per_shard rows or max_shard_bytes bytes.
    """
    write = ray.remote(_write_task).options(num_cpus=0, max_retries=WRITE_RETRIES)
    kwargs = {"output": cfg.output, "variants": tuple(cfg.variants), "cfg": cfg.out}
    summaries: list[dict] = []
    in_flight: list = []
    group: list = []
    rows = size = 0

    def submit() -> None:
        nonlocal group, rows, size
        if group:
            in_flight.append(write.remote(*group, **kwargs))
        group, rows, size = [], 0, 0
        while len(in_flight) > writes_in_flight:
            done, in_flight[:] = ray.wait(in_flight, num_returns=1)
            summaries.extend(ray.get(done[0]))

    for bundle in results.iter_internal_ref_bundles():
        for entry, block_slice in zip(bundle.blocks, bundle.slices):
            if block_slice is not None:
                raise JobError(f"unexpected sliced block in the result stream: {block_slice}")
            n, nbytes = entry.metadata.num_rows or 0, entry.metadata.size_bytes or 0
            if group and (rows + n > cfg.out.rows_per_shard or size + nbytes > cfg.out.max_shard_bytes):
                submit()
            group.append(entry.ref)
            rows, size = rows + n, size + nbytes
    submit()
    for ref in in_flight:
        summaries.extend(ray.get(ref))
    return summaries


def run_job(cfg: JobConfig, *, segmenter: type | None = None, weights=None) -> dict:
    """Process every input not yet in the output, then write and return the manifest.

    `weights`: the model as `pipeline.model.read_weights` read it (read here when None).
    Raises JobError before any work when the output is not usable, and after the work when
    the output does not hold every discovered input exactly once.
    """
    from pipeline.model import read_weights

    started = time.time()
    check_output(cfg)
    weights = weights or read_weights(cfg.segment.weights)
    files = source_files(cfg)
    todo = pending(files, cfg.output)
    log.info("%d inputs, %d already done, %d to process", len(files), len(files) - len(todo), len(todo))
    if todo:
        layout = plan_layout(cfg)
        log.info("%s", layout)
        results = build_dataset(todo, cfg, segmenter=segmenter, layout=layout, weights=weights)
        write_dataset(results, cfg, writes_in_flight=layout.writes_in_flight)
    return finalize(cfg, files, weights, processed=len(todo), started=started)
