"""Exactly-once Parquet output: content-addressed shards, atomic renames, a manifest last.

Layout of OUTPUT:
    images/part-<hash>.parquet   one row per image that made it through (images_schema)
    errors/part-<hash>.parquet   one row per input that failed (ERRORS_SCHEMA)
    manifest.json                written last: counts, options, model, versions, finished shards

How exactly-once holds:
- A shard's name is a hash of the sorted source paths it holds. If Ray re-runs a write task
  (a worker died after writing, before reporting), the retry writes the same rows under the
  same name and replaces the file: no duplicate.
- A shard is written under a hidden temporary name (`.part-...tmp-<uuid>`, which Parquet
  readers skip) and renamed when complete, so a killed job never leaves a half file that reads
  as data.
- `--resume` lists the finished shards, skips every source path they hold, and removes
  leftover temporary files. `finalize` checks that no source path occurs twice before it writes
  the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.discover import is_uri
from pipeline.schema import ERRORS_SCHEMA

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
ERRORS_DIR = "errors"
MANIFEST = "manifest.json"
SHARD_PREFIX = "part-"
TMP_PREFIX = "."

SUMMARY_SCHEMA = pa.schema([
    pa.field("kind", pa.string()),
    pa.field("file", pa.string()),
    pa.field("rows", pa.int64()),
])


@dataclass(frozen=True)
class OutputConfig:
    rows_per_shard: int = 1000  # rows handed to one write task; a shard holds at most this many
    max_shard_bytes: int = 256 * 1024**2  # a write task splits its rows into shards of at most ~this many bytes
    compression: str = "snappy"  # Parquet codec (PNG payloads are already compressed)


def output_fs(output: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of an output location (local path or URI)."""
    if is_uri(output):
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), posixpath.abspath(output)


def shard_name(source_paths: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(source_paths)).encode("utf-8")).hexdigest()
    return f"{SHARD_PREFIX}{digest[:24]}"


def _row_bytes(table: pa.Table) -> list[int]:
    """Approximate size of each row: the sum of its binary/string payloads plus a small constant."""
    sizes = [64] * table.num_rows
    for col in table.columns:
        if pa.types.is_binary(col.type) or pa.types.is_string(col.type):
            for i, v in enumerate(col.to_pylist()):
                sizes[i] += len(v) if v is not None else 0
    return sizes


def split_by_bytes(table: pa.Table, max_bytes: int) -> list[pa.Table]:
    """Consecutive slices of `table`, each at most `max_bytes` (a single larger row stays alone)."""
    if table.num_rows == 0:
        return []
    parts, start, size = [], 0, 0
    for i, n in enumerate(_row_bytes(table)):
        if i > start and size + n > max_bytes:
            parts.append(table.slice(start, i - start))
            start, size = i, 0
        size += n
    parts.append(table.slice(start))
    return parts


def write_atomic(table: pa.Table, fs: pafs.FileSystem, directory: str, name: str, *, compression: str) -> str:
    """Write `table` to directory/name.parquet via a hidden temporary file and a rename."""
    final = f"{directory}/{name}.parquet"
    tmp = f"{directory}/{TMP_PREFIX}{name}.parquet.tmp-{uuid.uuid4().hex}"
    fs.create_dir(directory, recursive=True)
    pq.write_table(table, tmp, filesystem=fs, compression=compression)
    fs.move(tmp, final)
    return final


def write_shards(table: pa.Table, *, output: str, images_schema: pa.Schema, cfg: OutputConfig) -> pa.Table:
    """One write task: split result rows into image and error shards, write them, return a summary.

    `table` holds result rows (images_schema plus error_* columns). Returns SUMMARY_SCHEMA rows.
    """
    fs, base = output_fs(output)
    failed = pc.is_valid(table.column("error_stage"))
    good = table.filter(pc.invert(failed)).select(images_schema.names).cast(images_schema)
    bad = table.filter(failed)
    errors = pa.table({
        "source_path": bad.column("source_path"),
        "source_sha256": bad.column("source_sha256"),
        "stage": bad.column("error_stage"),
        "error_type": bad.column("error_type"),
        "message": bad.column("error_message"),
    }, schema=ERRORS_SCHEMA)
    stem = shard_name(table.column("source_path").to_pylist())
    summary = []
    for kind, directory, rows in ((IMAGES_DIR, f"{base}/{IMAGES_DIR}", good), (ERRORS_DIR, f"{base}/{ERRORS_DIR}", errors)):
        for k, part in enumerate(split_by_bytes(rows, cfg.max_shard_bytes)):
            path = write_atomic(part, fs, directory, f"{stem}-{k:03d}", compression=cfg.compression)
            summary.append({"kind": kind, "file": posixpath.basename(path), "rows": part.num_rows})
    return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


def list_shards(output: str) -> dict[str, list[str]]:
    """Finished shard paths under OUTPUT, by kind ("images", "errors"); temporary files excluded."""
    fs, base = output_fs(output)
    found: dict[str, list[str]] = {IMAGES_DIR: [], ERRORS_DIR: []}
    for kind, paths in found.items():
        info = fs.get_file_info(f"{base}/{kind}")
        if info.type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(f"{base}/{kind}")):
            if entry.base_name.startswith(SHARD_PREFIX) and entry.base_name.endswith(".parquet"):
                paths.append(entry.path)
        paths.sort()
    return found


def remove_temporary_files(output: str) -> int:
    """Delete half-written shards left by a killed run. Returns how many were removed."""
    fs, base = output_fs(output)
    removed = 0
    for kind in (IMAGES_DIR, ERRORS_DIR):
        if fs.get_file_info(f"{base}/{kind}").type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(f"{base}/{kind}")):
            if entry.base_name.startswith(TMP_PREFIX) and ".tmp-" in entry.base_name:
                fs.delete_file(entry.path)
                removed += 1
    return removed


def done_source_paths(output: str) -> dict[str, list[str]]:
    """source_path values held by the finished shards, by kind, in shard order (duplicates kept)."""
    fs, _ = output_fs(output)
    done: dict[str, list[str]] = {}
    for kind, paths in list_shards(output).items():
        values: list[str] = []
        for path in paths:
            values += pq.read_table(path, columns=["source_path"], filesystem=fs).column("source_path").to_pylist()
        done[kind] = values
    return done


def remove_duplicate_rows(output: str) -> int:
    """Make every source_path occur in one finished shard only. Returns how many rows were removed.

    Duplicates arise only when two runs wrote the same input into differently composed shards,
    e.g. workers of a killed driver that finished a write after `--resume` had started. The first
    occurrence wins: images shards before errors shards, each in name order. A shard that holds
    any later occurrence is rewritten without those rows (atomically, under the name of what it
    still holds), or deleted when nothing is left.
    """
    fs, base = output_fs(output)
    seen: set[str] = set()
    removed = 0
    for kind, paths in list_shards(output).items():
        for path in paths:
            table = pq.read_table(path, filesystem=fs)
            sources = table.column("source_path").to_pylist()
            keep = [p not in seen for p in sources]
            seen.update(sources)
            if all(keep):
                continue
            removed += keep.count(False)
            rest = table.filter(pa.array(keep))
            if rest.num_rows:  # a new name: the hash of a strict subset differs from the old one
                name = f"{shard_name(rest.column('source_path').to_pylist())}-000"
                write_atomic(rest, fs, f"{base}/{kind}", name, compression=OutputConfig.compression)
            fs.delete_file(path)
            log.warning("removed %d duplicated rows from %s", keep.count(False), posixpath.basename(path))
    return removed


def output_is_empty(output: str) -> bool:
    fs, base = output_fs(output)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type == pafs.FileType.File:
        return False
    return not fs.get_file_info(pafs.FileSelector(base))


def read_manifest(output: str) -> dict | None:
    fs, base = output_fs(output)
    path = f"{base}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_manifest(output: str, manifest: dict) -> None:
    fs, base = output_fs(output)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/{TMP_PREFIX}{MANIFEST}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    fs.move(tmp, f"{base}/{MANIFEST}")
