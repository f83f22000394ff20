"""The job on Ray: the one module that knows Ray and Arrow tables. The work itself is `pipeline.process`.

    discover (driver)
      -> source blocks: paths only, <= task_files inputs and ~task_bytes input bytes each (driver)
      -> ImageWorker actors, one CPU each: read, decode, model input, [segment], refine, variants, PNG
             [segment] = the model in the worker itself (CPU nodes), or a call to the segmenter
                         pool, GPU actors that get uint8 S x S inputs and return uint8 S x S
                         probabilities (GPU nodes)
      -> shard writers (actors): the driver groups the workers' output blocks by their metadata,
             <= rows_per_shard rows and ~max_shard_bytes, never touching the bytes itself
      -> finalize (pipeline.bookkeeping)

Why this shape (measured in docs/BENCHMARKS.md): the full-resolution pixels never leave the worker
that decoded them, so nothing but 64 KB in and 64 KB out per image crosses to a GPU node, and nothing
grows in the object store ahead of the GPU pool; on a CPU node every core runs whole images with no
stage waiting on another. Output blocks wait in the object store only until a shard's worth is
there, and at most two shards per writer are being written or queued at once.

`build_dataset` returns the lazy Dataset of result rows for users who compose their own pipeline;
`run_job` adds resume, the exactly-once write and the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from pipeline.bookkeeping import JobError, check_output, finalize, pending, start
from pipeline.config import POOL_BATCH, WORKER_BATCH, JobConfig
from pipeline.contact_sheet import make_contact_sheet
from pipeline.discover import SourceFile, discover, is_uri, spell
from pipeline.privacy import hashed_path
from pipeline.process import ProcessConfig, process
from pipeline.quality import quality_model
from pipeline.schema import SOURCE_SCHEMA, result_schema
from pipeline.writer import OutputConfig, write_results

log = logging.getLogger(__name__)

WRITERS_PER_WORKERS = 16  # one shard writer per this many workers, at least one (a writer writes ~1 GB/s locally)
TAIL_SHARE = 2  # a block holds at most 1 / (TAIL_SHARE * workers) of the work left (see source_blocks)
CALLS_QUEUED_PER_WORKER = 2  # a worker starts its next block as soon as one ends
OUTPUT_BLOCK_BYTES = 32 * 1024**2  # a worker emits its result rows in blocks of about this many PNG bytes
PROGRESS_EVERY_S = 30  # seconds between progress lines when stderr is not a terminal
BAR_COLUMNS = 100  # width of the progress bar when the terminal does not tell its own
PASSES = 3  # a run processes again, at most this often, the inputs whose results a lost node took with it

__all__ = ["JobError", "Layout", "build_dataset", "check_output", "plan_layout", "preprocess", "run_job", "source_files"]


@dataclass(frozen=True)
class Layout:
    """How the job uses the cluster it is connected to."""

    workers: int  # ImageWorker actors, one CPU each
    segment_actors: int  # segmenter pool actors; 0 = the model runs inside every worker
    segment_gpus: float  # GPUs per segmenter pool actor

    @property
    def writers(self) -> int:
        return max(1, self.workers // WRITERS_PER_WORKERS)


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
    files = discover(list(cfg.inputs), exclude=cfg.output)
    if cfg.source_path_mode == "absolute":
        files = [dataclasses.replace(f, rel_path=spell(f.location)) for f in files]
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

    def __init__(self, weights, segmenter: type, options: dict):
        self.model = segmenter(weights, **options)

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


class WorkerModel:
    """The model inside a CPU worker, built at its first call: a worker that meets only broken files never
    imports torch (20k invalid files run at thousands of rows/s, not at the speed of a torch import)."""

    def __init__(self, segmenter: bytes, weights_ref, options: dict):
        self._segmenter, self._weights_ref, self._options = segmenter, weights_ref, options
        self._model = None

    def __call__(self, batch: dict) -> dict:
        if self._model is None:
            segmenter = ray.cloudpickle.loads(self._segmenter)  # imports torch here, not at unpickling
            self._model = segmenter(ray.get(self._weights_ref), device="cpu", cpu_threads=1, **self._options)
        return self._model(batch)


class ImageWorker:
    """The Ray Data UDF: a block of SOURCE rows -> blocks of result rows of about OUTPUT_BLOCK_BYTES."""

    def __init__(self, cfg: ProcessConfig, weights_ref, pool: list | None, segmenter: bytes | None,
                 options: dict):
        import cv2

        cv2.setNumThreads(1)  # one CPU per worker: OpenCV's own threads would only compete with the others
        self.cfg = cfg
        self.schema = result_schema(cfg.variants)
        self.segment = PoolClient(pool) if pool else WorkerModel(segmenter, weights_ref, options)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        rows, size = [], 0
        for chunk in process(batch.to_pylist(), self.segment, self.cfg):
            rows += chunk
            size += sum(len(v) for row in chunk for k, v in row.items() if k.endswith("_png") and v)
            if size >= OUTPUT_BLOCK_BYTES:
                yield pa.Table.from_pylist(rows, schema=self.schema)
                rows, size = [], 0
        if rows:
            yield pa.Table.from_pylist(rows, schema=self.schema)


def segmenter_options(cfg: JobConfig) -> dict:
    """The segmenter's keyword arguments besides the weights (which travel through the object store)."""
    return {"cpu_bf16": cfg.segment.cpu_bf16, "fix_orientation": cfg.segment.fix_orientation,
            "mirror_view": cfg.segment.mirror_view}


def process_config(cfg: JobConfig, weights, layout: Layout) -> ProcessConfig:
    """What every worker needs: the options, the model's identity, its threshold unless the user set one."""
    refine = cfg.refine if cfg.refine.threshold is not None else dataclasses.replace(cfg.refine, threshold=weights.meta.threshold)
    batch = cfg.segment.batch_size or (POOL_BATCH if layout.segment_actors else WORKER_BATCH)
    return ProcessConfig(variants=tuple(cfg.variants), model=weights.meta, model_sha256=weights.sha256, refine=refine,
                         read=cfg.read, decode=cfg.decode, variant=cfg.variant, pseudonym_key=cfg.pseudonym_key,
                         segment_batch=batch,
                         quality=quality_model(weights.meta.quality, mirror_view=cfg.segment.mirror_view))


def start_segmenter_pool(layout: Layout, weights_ref, segmenter: type, cfg: JobConfig) -> list:
    """The segmenter pool's actors, once every one is up (Ray restarts one that dies later and retries its
    call); [] when the layout has no pool (the model runs in the workers).

    Raises JobError when they are not up within cfg.segment.start_timeout_s: a pool that asks for GPUs the
    cluster does not have (and no autoscaler adds) would otherwise wait forever.
    """
    if not layout.segment_actors:
        return []
    timeout_s = cfg.segment.start_timeout_s
    actor = ray.remote(PoolSegmenter).options(num_gpus=layout.segment_gpus, num_cpus=0, max_restarts=-1,
                                              max_task_retries=-1)
    actors = [actor.remote(weights_ref, segmenter, segmenter_options(cfg)) for _ in range(layout.segment_actors)]
    gpus_now = ray.cluster_resources().get("GPU", 0)
    log.info("segmenter pool: %d actors, %s GPU each (the cluster has %s GPUs now)", len(actors), layout.segment_gpus, gpus_now)
    ready, _ = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors), timeout=timeout_s)
    if len(ready) < len(actors):
        for a in actors:
            ray.kill(a)
        raise JobError(f"the segmenter pool did not start within {timeout_s:g} s: {len(ready)} of {len(actors)} actors "
                       f"up, each asks for {layout.segment_gpus:g} GPU and the cluster has {gpus_now:g}; start GPU nodes, "
                       "or pass --segment-gpus 0 to run the model on the CPU workers")
    ray.get(ready)  # an actor that failed to start (a bad weights file...) raises here
    return actors


def build_dataset(files: list[SourceFile], cfg: JobConfig, *, segmenter: type | None = None,
                  layout: Layout | None = None, weights=None) -> ray.data.Dataset:
    """The lazy Dataset of result rows (image rows and error rows) for `files`.

    `segmenter` is the model class (pipeline.segment.Segmenter, or a subclass), run inside every
    worker or as the segmenter pool (`plan_layout`); `weights` as `pipeline.model.read_weights` gives them.
    The pool's actors live as long as the Dataset refers to them (`run_job` ends its own pool at once).
    """
    from pipeline.model import read_weights

    layout = layout or plan_layout(cfg)
    weights = weights or read_weights(cfg.segment.weights, orientation=cfg.segment.orientation_weights)
    weights_ref = ray.put(weights)
    segmenter = segmenter_class(segmenter)
    pool = start_segmenter_pool(layout, weights_ref, segmenter, cfg)
    return map_sources(source_blocks(files, cfg, workers=layout.workers), cfg, layout=layout, segmenter=segmenter,
                       weights=weights, weights_ref=weights_ref, pool=pool)


def segmenter_class(segmenter: type | None) -> type:
    """The model class to run: `segmenter`, or pipeline.segment.Segmenter. torch is imported here, in the
    driver, not at the top: a worker that only calls a segmenter pool never loads it."""
    if segmenter is not None:
        return segmenter
    from pipeline.segment import Segmenter

    return Segmenter


def map_sources(blocks: list[pa.Table], cfg: JobConfig, *, layout: Layout, segmenter: type, weights, weights_ref,
                pool: list) -> ray.data.Dataset:
    """The lazy Dataset of result rows for source blocks already made (`source_blocks`): every worker runs
    `segmenter` itself, or calls the segmenter pool's actors `pool` (`start_segmenter_pool`) when there are any."""
    return ray.data.from_arrow(blocks).map_batches(
        ImageWorker,
        batch_size=None,  # one source block per call: blocks are already sized by files and bytes
        batch_format="pyarrow",
        fn_constructor_kwargs={"cfg": process_config(cfg, weights, layout), "weights_ref": weights_ref, "pool": pool,
                               "segmenter": None if pool else ray.cloudpickle.dumps(segmenter),
                               "options": segmenter_options(cfg)},
        compute=ray.data.ActorPoolStrategy(size=max(1, min(layout.workers, len(blocks))),
                                           max_tasks_in_flight_per_actor=CALLS_QUEUED_PER_WORKER),
        num_cpus=1,
    )


def preprocess(inputs: list[str], output: str = "", **options) -> ray.data.Dataset:
    """Public entry for composing: the lazy result Dataset for `inputs` with JobConfig options."""
    cfg = JobConfig(inputs=tuple(inputs), output=output, **options)
    return build_dataset(source_files(cfg), cfg)


class ShardWriter:
    """A writer actor: result blocks -> shards (`pipeline.writer.write_results`), one write at a time.

    Actors, not tasks: when the workers hold every CPU, each zero-CPU task got a freshly started Python
    process (about 1.5 CPU-seconds each, 7% of a benchmark run); a writer starts once. A write is
    idempotent (content-addressed shard names), so Ray restarts a dead writer and retries its call.
    """

    def __init__(self, output: str, variants: tuple[str, ...], cfg: OutputConfig):
        self.output, self.variants, self.cfg = output, variants, cfg

    def write(self, *blocks: pa.Table) -> list[dict]:
        return write_results(pa.concat_tables(blocks), output=self.output, variants=self.variants, cfg=self.cfg)


@dataclass
class WriteStats:
    """What went through the object store between the workers and the shard writers, and what was written."""

    source_bytes: int = 0  # the SOURCE_SCHEMA blocks the workers read (paths, not pixels)
    result_blocks: int = 0  # blocks of result rows the workers emitted
    result_rows: int = 0
    result_bytes: int = 0  # their in-memory size: what the object store held on the way to the writers
    shards: list[dict] = field(default_factory=list)  # one {kind, file, rows} per shard written
    failed_writes: int = 0  # writes whose blocks were lost (a node gone): their inputs are done again
    first_result_at: float | None = None  # time.time() when the first result block reached the driver
    last_result_at: float | None = None  # ... and the last
    first_result_rows: int = 0  # rows of that first block

    def steady_images_per_s(self) -> float | None:
        """Rows per second between the first and the last result block: the rate without start-up and tail."""
        if self.first_result_at is None or self.last_result_at is None or self.last_result_at <= self.first_result_at:
            return None
        return (self.result_rows - self.first_result_rows) / (self.last_result_at - self.first_result_at)


class Progress:
    """Images done so far: a live bar in a terminal, a plain line every PROGRESS_EVERY_S seconds when piped."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()
        self.last_line = self.started
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            columns = os.get_terminal_size(sys.stderr.fileno()).columns or BAR_COLUMNS  # 0: a terminal without a size
            self.bar = tqdm(total=total, unit="img", desc="images", smoothing=0.05, ncols=columns)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last_line >= PROGRESS_EVERY_S or self.done == self.total:
            self.last_line = time.time()
            rate = self.done / max(self.last_line - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%d of %d images (%.1f/s, %s left)", self.done, self.total, rate,
                     f"{eta / 60:.0f} min" if eta != float("inf") else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_dataset(results: ray.data.Dataset, cfg: JobConfig, *, writers: int, total: int = 0) -> WriteStats:
    """Stream the result blocks into shard writers; returns what went through and what was written.

    The driver sees only block references and their metadata (rows, bytes): a group of blocks becomes
    one write when the next block would take it over rows_per_shard rows or max_shard_bytes bytes.
    `total`: the inputs in this pass, for the progress report.
    """
    writer = ray.remote(ShardWriter).options(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD")
    pool = itertools.cycle([writer.remote(cfg.output, tuple(cfg.variants), cfg.out) for _ in range(writers)])
    writes_in_flight = 2 * writers  # each writer writes one shard and has the next one queued
    stats = WriteStats()
    in_flight: list = []
    group: list = []
    rows = size = 0

    def submit() -> None:
        nonlocal group, rows, size
        if group:
            in_flight.append(next(pool).write.remote(*group))
        group, rows, size = [], 0, 0
        while len(in_flight) > writes_in_flight:
            done, in_flight[:] = ray.wait(in_flight, num_returns=1)
            collect(done[0])

    def collect(ref) -> None:
        try:
            stats.shards.extend(ray.get(ref))
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.RayTaskError) as e:
            if isinstance(e, ray.exceptions.RayTaskError) and not isinstance(e.cause, ray.exceptions.ObjectLostError):
                raise
            stats.failed_writes += 1  # result blocks that lived on a lost node: run_job processes their inputs again
            log.warning("a shard write lost its input blocks (%s); its inputs will be processed again", type(e).__name__)

    progress = Progress(total)
    for bundle in results.iter_internal_ref_bundles():
        for entry, block_slice in zip(bundle.blocks, bundle.slices):
            if block_slice is not None:
                raise JobError(f"unexpected sliced block in the result stream: {block_slice}")
            n, nbytes = entry.metadata.num_rows or 0, entry.metadata.size_bytes or 0
            if group and (rows + n > cfg.out.rows_per_shard or size + nbytes > cfg.out.max_shard_bytes):
                submit()
            group.append(entry.ref)
            rows, size = rows + n, size + nbytes
            stats.last_result_at = time.time()
            if stats.first_result_at is None:
                stats.first_result_at, stats.first_result_rows = stats.last_result_at, n
            stats.result_blocks, stats.result_rows, stats.result_bytes = (
                stats.result_blocks + 1, stats.result_rows + n, stats.result_bytes + nbytes)
            progress.update(n)
    submit()
    for ref in in_flight:
        collect(ref)
    progress.close()
    return stats


def run_job(cfg: JobConfig, *, segmenter: type | None = None, weights=None) -> dict:
    """Process every input not yet in the output, then write and return the manifest.

    `weights`: the model as `pipeline.model.read_weights` read it (read here when None).
    Raises JobError before any work when the output is not usable, and after the work when
    the output does not hold every discovered input exactly once.
    """
    from pipeline.model import read_weights

    started = time.time()
    weights = weights or read_weights(cfg.segment.weights, orientation=cfg.segment.orientation_weights)
    check_output(cfg, weights)
    start(cfg, weights)
    files = source_files(cfg)
    todo = pending(files, cfg.output)
    log.info("%d inputs, %d already done, %d to process", len(files), len(files) - len(todo), len(todo))
    processed, redone, stats = len(todo), 0, WriteStats()
    segmenter, weights_ref = segmenter_class(segmenter), ray.put(weights)
    for attempt in range(PASSES):
        if not todo:
            break
        if attempt:
            log.warning("pass %d: %d inputs whose results were lost (a node gone mid-run) are processed again", attempt + 1, len(todo))
            redone += len(todo)
        layout = plan_layout(cfg)
        log.info("%s", layout)
        blocks = source_blocks(todo, cfg, workers=layout.workers)
        pool = start_segmenter_pool(layout, weights_ref, segmenter, cfg)
        try:
            results = map_sources(blocks, cfg, layout=layout, segmenter=segmenter, weights=weights,
                                  weights_ref=weights_ref, pool=pool)
            stats = write_dataset(results, cfg, writers=layout.writers, total=len(todo))
        finally:  # the pool's GPUs are free when run_job returns, not when Ray collects the actors (~20 s later)
            for actor in pool:
                ray.kill(actor)
        stats.source_bytes = sum(b.nbytes for b in blocks)
        todo = pending(files, cfg.output) if stats.failed_writes else []
    run = {"processed": processed, "redone_after_loss": redone,
           "object_store_bytes": {"sources": stats.source_bytes, "results": stats.result_bytes},
           "first_result_s": round(stats.first_result_at - started, 2) if stats.first_result_at else None}
    if stats.steady_images_per_s():
        run["steady_images_per_s"] = round(stats.steady_images_per_s(), 2)
    manifest = finalize(cfg, files, weights, run=run, started=started)
    try:
        log.info("QC contact sheet: %s", make_contact_sheet(cfg.output))
    except (OSError, ValueError, pa.ArrowException) as e:  # a picture for people must not fail a finished run
        log.warning("no QC contact sheet (%s: %s); draw one with `xray-lung-prep contact-sheet`", type(e).__name__, e)
    return manifest
