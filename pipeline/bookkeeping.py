"""Resume, the final exactly-once check and the manifest: the job's bookkeeping, without Ray.

    check_output -> pending (what a run still has to do) -> [the wiring processes it] -> finalize

Everything here reads only the `source_path` column of the shards (its cost grows with the number of
rows, never with the image bytes) and rewrites only a shard that holds a duplicate.
"""

from __future__ import annotations

import logging
import platform
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING

from pipeline.config import JobConfig
from pipeline.discover import SourceFile
from pipeline.writer import (
    ERRORS_DIR,
    IMAGES_DIR,
    KINDS,
    OutputConfig,
    list_shards,
    output_is_empty,
    read_manifest,
    remove_temporary_files,
    rewrite_without,
    shard_source_paths,
    write_manifest,
)

if TYPE_CHECKING:
    from pipeline.model import Weights  # torch: only the driver reads weights

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("ray", "torch", "numpy", "opencv-python-headless", "pyarrow", "pydicom")


class JobError(RuntimeError):
    """The job cannot start or did not account for every input."""


def check_output(cfg: JobConfig) -> None:
    """Refuse an output that holds something unless resuming into one of ours."""
    if output_is_empty(cfg.output):
        return
    if not cfg.resume:
        raise JobError(f"output {cfg.output} exists and is not empty; choose a new folder or pass --resume")
    shards = list_shards(cfg.output)
    if not (shards[IMAGES_DIR] or shards[ERRORS_DIR] or read_manifest(cfg.output)):
        raise JobError(f"--resume given but {cfg.output} holds no shards of this job")


def pending(files: list[SourceFile], output: str) -> list[SourceFile]:
    """The inputs not yet in a finished shard; half-written shards of an earlier run are removed first."""
    removed = remove_temporary_files(output)
    if removed:
        log.info("removed %d half-written shards from an earlier run", removed)
    done = {p for shards in shard_source_paths(output).values() for paths in shards.values() for p in paths}
    return [f for f in files if f.rel_path not in done]


def remove_duplicate_rows(output: str, sources: dict[str, dict[str, list[str]]], cfg: OutputConfig) -> int:
    """Make every source_path occur once in the output. Returns how many rows were removed.

    Duplicates arise only when two runs wrote the same input into differently composed shards,
    e.g. workers of a killed driver that finished a write after `--resume` had started. The first
    occurrence wins: images shards before errors shards, each in name order, then row order. Only a
    shard that holds a later occurrence is read whole and rewritten (`writer.rewrite_without`).
    `sources` is `writer.shard_source_paths(output)`, updated in place.
    """
    seen: set[str] = set()
    removed = 0
    for kind in KINDS:
        for path, paths in list(sources[kind].items()):
            drop = []
            for i, p in enumerate(paths):
                if p in seen:
                    drop.append(i)
                seen.add(p)
            if drop:
                new_path, rest = rewrite_without(output, kind, path, drop, cfg=cfg)
                del sources[kind][path]
                if new_path is not None:
                    sources[kind][new_path] = rest
                removed += len(drop)
                log.warning("removed %d duplicated rows from %s", len(drop), path.rsplit("/", 1)[-1])
    return removed


def library_versions() -> dict[str, str]:
    """Python and the main libraries' versions, from the installed metadata (nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def finalize(cfg: JobConfig, files: list[SourceFile], weights: Weights, *, run: dict, started: float) -> dict:
    """Check that every input is in the output exactly once, then write and return the manifest.

    `run`: what this run did, for its record in `runs` (at least {"processed": inputs it processed}).

    Raises JobError (after writing the manifest, `complete: false`) when an input is missing or duplicated.
    """
    sources = shard_source_paths(cfg.output)
    removed = remove_duplicate_rows(cfg.output, sources, cfg.out)
    rows = {kind: [p for paths in sources[kind].values() for p in paths] for kind in KINDS}
    expected = {f.rel_path for f in files}
    seen = Counter(rows[IMAGES_DIR]) + Counter(rows[ERRORS_DIR])
    duplicated = sorted(p for p, n in seen.items() if n > 1)
    missing = sorted(expected - set(seen))
    unexpected = sorted(set(seen) - expected)
    previous = read_manifest(cfg.output) or {}
    wall = time.time() - started
    manifest = {
        "complete": not (duplicated or missing),
        "counts": {
            "images_in": len(files),
            "ok": len(rows[IMAGES_DIR]),
            "errors": len(rows[ERRORS_DIR]),
            "missing": len(missing),
            "duplicated": len(duplicated),
            "not_in_input": len(unexpected),
            "duplicates_removed": removed,
        },
        "options": cfg.options(),
        "model": {"name": weights.meta.name, "sha256": weights.sha256, "meta": weights.meta.to_dict()},
        "versions": library_versions(),
        "wall_time_s": round(wall, 3),
        "runs": previous.get("runs", []) + [{
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 3),
            "resumed": cfg.resume,
            **run,
        }],
        "shards": {kind: sorted(p.rsplit("/", 1)[-1] for p in sources[kind]) for kind in KINDS},
    }
    write_manifest(cfg.output, manifest)
    manifest = read_manifest(cfg.output)  # as written: plain JSON types
    if duplicated or missing:
        raise JobError(
            f"output does not hold every input exactly once: {len(missing)} missing, {len(duplicated)} duplicated "
            f"(first: {(missing + duplicated)[:3]})"
        )
    return manifest
