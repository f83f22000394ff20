"""Resume, the final exactly-once check and the manifest: the job's bookkeeping, without Ray.

    check_output -> start (manifest with the run's contract, complete: false) -> pending (what is left)
    -> [the wiring processes it] -> finalize (manifest, complete: true or JobError)

The contract (`contract`) is what makes two runs' rows mean the same thing: the inputs, how paths
are written, the key (by fingerprint), the variants and their geometry, decoding, refinement, the
model, the schema version. It is in the manifest from the first moment of a run, so `--resume`
refuses, in one line and before any work, to mix rows of runs that differ in it.

Everything here reads only the `source_path` column of the shards (its cost grows with the number of
rows, never with the image bytes) and rewrites only a shard that holds a duplicate.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import platform
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING

from pipeline.card import dataset_card
from pipeline.config import JobConfig
from pipeline.discover import SourceFile, is_uri, spell
from pipeline.privacy import pseudonym
from pipeline.schema import SCHEMA_VERSION
from pipeline.writer import (
    CARD,
    ERRORS_DIR,
    IMAGES_DIR,
    KINDS,
    OutputConfig,
    error_reasons,
    list_shards,
    output_is_empty,
    package_version,
    qc_counts,
    read_manifest,
    remove_temporary_files,
    rewrite_without,
    shard_source_paths,
    write_empty_shards,
    write_manifest,
    write_text,
)

if TYPE_CHECKING:
    from pipeline.model import Weights  # torch: only the driver reads weights

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("ray", "torch", "numpy", "opencv-python-headless", "pyarrow", "pydicom")
KEY_FINGERPRINT_MESSAGE = b"xray-lung-prep key fingerprint"  # HMAC'd with the key: compares keys without writing one
FINGERPRINT_HEX = 16  # hex digits of the key fingerprint kept
ERROR_REASONS_KEPT = 10  # the most frequent error reasons listed in the manifest


class JobError(RuntimeError):
    """The job cannot start or did not account for every input."""


def key_fingerprint(key: bytes | None) -> str | None:
    """A short keyed digest that tells two keys apart without revealing either (None without a key)."""
    if key is None:
        return None
    return hmac.new(key, KEY_FINGERPRINT_MESSAGE, "sha256").hexdigest()[:FINGERPRINT_HEX]


def written_location(cfg: JobConfig, location: str) -> str:
    """An input root or the output as the manifest may show it: absolute, or a keyed hash in hashed mode."""
    canonical = location if is_uri(location) else spell(os.path.realpath(location))
    return pseudonym(canonical, cfg.pseudonym_key) if cfg.source_path_mode == "hashed" else canonical


def contract(cfg: JobConfig, weights: Weights) -> dict:
    """What makes the rows of two runs mean the same thing (see the module docstring); plain JSON types."""
    refine = cfg.refine if cfg.refine.threshold is not None else dataclasses.replace(cfg.refine, threshold=weights.meta.threshold)
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": sorted(written_location(cfg, i) for i in cfg.inputs),
        "source_path_mode": cfg.source_path_mode,
        "key_fingerprint": key_fingerprint(cfg.pseudonym_key),
        "variants": list(cfg.variants),
        "variant": dataclasses.asdict(cfg.variant),
        "read": dataclasses.asdict(cfg.read),
        "decode": dataclasses.asdict(cfg.decode),
        "refine": dataclasses.asdict(refine),
        "model_sha256": weights.sha256,
        "orientation_model_sha256": weights.orientation.sha256 if weights.orientation else None,
        "fix_orientation": cfg.segment.fix_orientation,
        "mirror_view": cfg.segment.mirror_view,
    }


def contract_differences(old: dict, new: dict) -> list[str]:
    """The contract's fields that differ, as `name` (values are not shown: they may be keyed hashes)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_output(cfg: JobConfig, weights: Weights | None = None) -> None:
    """Refuse an output that holds something unless resuming into one of ours with the same contract.

    With `weights`, --resume also compares this run's contract with the one in the manifest.
    """
    if output_is_empty(cfg.output):
        return
    if not cfg.resume:
        raise JobError(f"output {cfg.output} exists and is not empty; choose a new folder or pass --resume")
    shards = list_shards(cfg.output)
    manifest = read_manifest(cfg.output)
    if not (shards[IMAGES_DIR] or shards[ERRORS_DIR] or manifest):
        raise JobError(f"--resume given but {cfg.output} holds no shards of this job")
    if manifest is None or "contract" not in manifest:
        raise JobError(f"--resume: {cfg.output} has no manifest with a run contract (written by an older version "
                       "or not by this job); start a new output")
    if weights is not None:
        differ = contract_differences(manifest["contract"], contract(cfg, weights))
        if differ:
            raise JobError(f"--resume would mix rows that differ in {', '.join(differ)}; rerun with the options of the "
                           "first run or choose a new output")


def start(cfg: JobConfig, weights: Weights) -> None:
    """Write the manifest of a run that has begun: its contract, complete: false (so a killed run can be resumed)."""
    previous = read_manifest(cfg.output) or {}
    write_manifest(cfg.output, {**previous, "complete": False, "schema_version": SCHEMA_VERSION,
                                "version": package_version(), "contract": contract(cfg, weights),
                                "options": written_options(cfg)})


def written_options(cfg: JobConfig) -> dict:
    """The options as the manifest shows them: no key, and no verbatim path in hashed mode."""
    options = cfg.options()
    options["inputs"] = [written_location(cfg, i) for i in cfg.inputs]
    options["output"] = written_location(cfg, cfg.output)
    return options


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
    write_empty_shards(cfg.output, tuple(cfg.variants), cfg.out)
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
        "complete": not (duplicated or missing or unexpected),
        "schema_version": SCHEMA_VERSION,
        "version": package_version(),
        "contract": contract(cfg, weights),
        "counts": {
            "images_in": len(files),
            "ok": len(rows[IMAGES_DIR]),
            "errors": len(rows[ERRORS_DIR]),
            "missing": len(missing),
            "duplicated": len(duplicated),
            "not_in_input": len(unexpected),
            "duplicates_removed": removed,
            **qc_counts(cfg.output),
        },
        "error_reasons": error_reasons(cfg.output, top=ERROR_REASONS_KEPT),
        "options": written_options(cfg),
        "model": {"name": weights.meta.name, "sha256": weights.sha256, "meta": weights.meta.to_dict()},
        "orientation_model": ({"name": weights.orientation.meta.name, "sha256": weights.orientation.sha256,
                               "meta": weights.orientation.meta.to_dict()} if weights.orientation else None),
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
    write_text(cfg.output, CARD, dataset_card(tuple(cfg.variants), manifest))
    manifest = read_manifest(cfg.output)  # as written: plain JSON types
    if duplicated or missing or unexpected:
        raise JobError(
            f"output does not hold every input exactly once: {len(missing)} missing, {len(duplicated)} duplicated, "
            f"{len(unexpected)} not among the inputs (first: {(missing + duplicated + unexpected)[:3]})"
        )
    return manifest
