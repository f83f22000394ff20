"""Exactly-once Parquet shards: content-addressed names, atomic renames, and the few reads resume needs.

Layout of OUTPUT:
    images/part-<hash>-NNN.parquet   one row per image that made it through (images_schema)
    errors/part-<hash>-NNN.parquet   one row per input that failed (ERRORS_SCHEMA)
    manifest.json                    written last (pipeline.bookkeeping)

How exactly-once holds:
- A shard's name is a hash of the sorted source paths of the rows its write task got. If Ray re-runs
  a write task (a worker died after writing, before reporting), the retry writes the same rows under
  the same name and replaces the file: no duplicate.
- A shard is written under a hidden temporary name (`.part-...tmp-<uuid>`, which Parquet readers
  skip) and renamed when complete, so a killed job never leaves a half file that reads as data.
- Resume and the final check read only the `source_path` column of the shards
  (`shard_source_paths`) and rewrite only a shard that holds a duplicate (`rewrite_without`).

Row groups hold about `row_group_bytes` each (tens of rows of 2k images, hundreds of 256 px ones),
so a reader can stream a shard without loading it whole. PNG columns are stored as they are (they
are compressed already), without dictionary or statistics (`parquet_options`); every other column
with `compression`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.discover import is_uri
from pipeline.schema import (
    ERRORS_SCHEMA,
    METADATA_PACKAGE_VERSION,
    METADATA_SCHEMA_VERSION,
    SCHEMA_VERSION,
    images_schema,
)

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
ERRORS_DIR = "errors"
KINDS = (IMAGES_DIR, ERRORS_DIR)
MANIFEST = "manifest.json"
CARD = "README.md"  # the dataset card (pipeline.card): datasets.load_dataset(OUTPUT) reads it
QUARANTINE_DIR = "quarantine"  # finished shards that cannot be read are moved here, and their inputs redone
SHARD_PREFIX = "part-"
TMP_PREFIX = "."
ROW_OVERHEAD_BYTES = 64  # added to a row's payload bytes when sizing shards and row groups


@dataclass(frozen=True)
class OutputConfig:
    rows_per_shard: int = 1000  # a shard holds at most this many rows
    max_shard_bytes: int = 256 * 1024**2  # ... and at most about this many bytes (a single larger row stays alone)
    row_group_bytes: int = 32 * 1024**2  # rows per Parquet row group chosen to hold about this many bytes
    compression: str = "snappy"  # Parquet codec of the non-PNG columns

    def __post_init__(self) -> None:
        for name in ("rows_per_shard", "max_shard_bytes", "row_group_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def package_version() -> str:
    from pipeline.cli import version

    return version()


def with_contract_metadata(table: pa.Table) -> pa.Table:
    """The table with the output contract's schema version and the package version in its metadata."""
    meta = dict(table.schema.metadata or {})
    meta.update({METADATA_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(), METADATA_PACKAGE_VERSION: package_version().encode()})
    return table.replace_schema_metadata(meta)


def output_fs(output: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of an output location (local path or URI)."""
    if is_uri(output):
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), posixpath.abspath(output)


def shard_name(source_paths: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(source_paths)).encode("utf-8")).hexdigest()
    return f"{SHARD_PREFIX}{digest[:24]}"


def row_bytes(table: pa.Table) -> list[int]:
    """Approximate size of each row: the lengths of its binary and string values plus a small constant."""
    total = pa.array([ROW_OVERHEAD_BYTES] * table.num_rows, pa.int64())
    for col in table.columns:
        if pa.types.is_binary(col.type) or pa.types.is_string(col.type):
            total = pc.add(total, pc.fill_null(pc.binary_length(col), 0).cast(pa.int64()))
    return total.to_pylist()


def split_by_bytes(table: pa.Table, max_bytes: int, *, max_rows: int | None = None) -> list[pa.Table]:
    """Consecutive slices of `table`, each at most `max_bytes` and `max_rows` (a single larger row stays alone)."""
    if table.num_rows == 0:
        return []
    parts, start, size = [], 0, 0
    for i, n in enumerate(row_bytes(table)):
        if i > start and (size + n > max_bytes or (max_rows is not None and i - start >= max_rows)):
            parts.append(table.slice(start, i - start))
            start, size = i, 0
        size += n
    parts.append(table.slice(start))
    return parts


def is_png_column(name: str) -> bool:
    return name.endswith("_png")


def parquet_options(schema: pa.Schema, codec: str) -> dict:
    """pq.write_table options: PNG columns stored as they are, with no dictionary and no min/max statistics
    (hashing and comparing megabytes of PNG per row bought nothing and took half the write time); every
    other column compressed with `codec`, dictionary-encoded and with statistics, as usual."""
    other = [f.name for f in schema if not is_png_column(f.name)]
    return {
        "compression": {f.name: "NONE" if is_png_column(f.name) else codec for f in schema},
        "use_dictionary": other,
        "write_statistics": other,
    }


def write_atomic(table: pa.Table, fs: pafs.FileSystem, directory: str, name: str, *, cfg: OutputConfig) -> str:
    """Write `table` to directory/name.parquet via a hidden temporary file and a rename; row groups of ~cfg.row_group_bytes."""
    final = f"{directory}/{name}.parquet"
    tmp = f"{directory}/{TMP_PREFIX}{name}.parquet.tmp-{uuid.uuid4().hex}"
    fs.create_dir(directory, recursive=True)
    table = with_contract_metadata(table)
    if table.num_rows == 0:  # no row group at all: readers (Hugging Face datasets) choke on an empty one
        pq.ParquetWriter(tmp, table.schema, filesystem=fs, **parquet_options(table.schema, cfg.compression)).close()
    else:
        mean_row = max(1, sum(row_bytes(table)) // table.num_rows)
        pq.write_table(table, tmp, filesystem=fs, row_group_size=max(1, cfg.row_group_bytes // mean_row),
                       **parquet_options(table.schema, cfg.compression))
    fs.move(tmp, final)
    return final


def split_results(results: pa.Table, variants: tuple[str, ...]) -> dict[str, pa.Table]:
    """Result rows (result_schema) -> {"images": images_schema rows, "errors": ERRORS_SCHEMA rows}."""
    failed = pc.is_valid(results.column("error_stage"))
    good_schema = images_schema(variants)
    if pc.any(failed).as_py():  # filtering copies every PNG: only when there is something to filter
        good, bad = results.filter(pc.invert(failed)), results.filter(failed)
    else:
        good, bad = results, results.slice(0, 0)
    good = good.select(good_schema.names).cast(good_schema)
    errors = pa.table({
        "source_path": bad.column("source_path"),
        "source_sha256": bad.column("source_sha256"),
        "stage": bad.column("error_stage"),
        "error_type": bad.column("error_type"),
        "message": bad.column("error_message"),
    }, schema=ERRORS_SCHEMA)
    return {IMAGES_DIR: good, ERRORS_DIR: errors}


def write_results(results: pa.Table, *, output: str, variants: tuple[str, ...], cfg: OutputConfig) -> list[dict]:
    """One write task: result rows -> image and error shards. Returns [{kind, file, rows}] per shard written."""
    fs, base = output_fs(output)
    stem = shard_name(results.column("source_path").to_pylist())
    summary = []
    for kind, rows in split_results(results, variants).items():
        for k, part in enumerate(split_by_bytes(rows, cfg.max_shard_bytes, max_rows=cfg.rows_per_shard)):
            path = write_atomic(part, fs, f"{base}/{kind}", f"{stem}-{k:03d}", cfg=cfg)
            summary.append({"kind": kind, "file": posixpath.basename(path), "rows": part.num_rows})
    return summary


def write_empty_shards(output: str, variants: tuple[str, ...], cfg: OutputConfig) -> list[str]:
    """An empty shard (schema only) in images/ or errors/ when the folder holds none, so that readers of a
    run with no image, or no error, still find a table with the right columns. Returns the kinds written."""
    fs, base = output_fs(output)
    written = []
    for kind, schema in ((IMAGES_DIR, images_schema(variants)), (ERRORS_DIR, ERRORS_SCHEMA)):
        if not list_shards(output)[kind]:
            write_atomic(schema.empty_table(), fs, f"{base}/{kind}", f"{shard_name([])}-000", cfg=cfg)
            written.append(kind)
    return written


def list_shards(output: str) -> dict[str, list[str]]:
    """Finished shard paths under OUTPUT, by kind ("images", "errors"), in name order; temporary files excluded."""
    fs, base = output_fs(output)
    found: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for kind, paths in found.items():
        if fs.get_file_info(f"{base}/{kind}").type != pafs.FileType.Directory:
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
    for kind in KINDS:
        if fs.get_file_info(f"{base}/{kind}").type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(f"{base}/{kind}")):
            if entry.base_name.startswith(TMP_PREFIX) and ".tmp-" in entry.base_name:
                fs.delete_file(entry.path)
                removed += 1
    return removed


def shard_source_paths(output: str) -> dict[str, dict[str, list[str]]]:
    """{kind: {shard path: its source_path values in row order}}, reading that one column only.

    A finished shard that cannot be read (truncated or damaged after it was written) is moved to
    OUTPUT/quarantine/<kind>/ with a warning and left out: its inputs count as not done.
    """
    fs, base = output_fs(output)
    found: dict[str, dict[str, list[str]]] = {}
    for kind, paths in list_shards(output).items():
        found[kind] = {}
        for p in paths:
            try:
                found[kind][p] = pq.read_table(p, columns=["source_path"], filesystem=fs).column("source_path").to_pylist()
            except (pa.ArrowException, OSError) as e:
                name = posixpath.basename(p)
                fs.create_dir(f"{base}/{QUARANTINE_DIR}/{kind}", recursive=True)
                fs.move(p, f"{base}/{QUARANTINE_DIR}/{kind}/{name}")
                log.warning("shard %s/%s cannot be read (%s): moved to %s/%s/, its inputs will be processed again",
                            kind, name, type(e).__name__, QUARANTINE_DIR, kind)
    return found


def qc_counts(output: str) -> dict:
    """{"qc_failed": rows with qc_pass false, "qc_flags": {flag: rows}} over the images shards (two small columns)."""
    fs, _ = output_fs(output)
    failed, flags = 0, Counter()
    for path in list_shards(output)[IMAGES_DIR]:
        table = pq.read_table(path, columns=["qc_pass", "qc_flags"], filesystem=fs)
        failed += table.num_rows - pc.sum(table.column("qc_pass")).as_py() if table.num_rows else 0
        flags.update(f for row in table.column("qc_flags").to_pylist() for f in row or [])
    return {"qc_failed": failed, "qc_flags": dict(sorted(flags.items()))}


def error_reasons(output: str, *, top: int) -> list[dict]:
    """The `top` most frequent reasons in errors/: [{stage, error_type, reason, count}], the file's own
    name replaced by <file> in the reason so that one cause counts once."""
    fs, _ = output_fs(output)
    reasons: Counter = Counter()
    for path in list_shards(output)[ERRORS_DIR]:
        table = pq.read_table(path, columns=["source_path", "stage", "error_type", "message"], filesystem=fs)
        for row in table.to_pylist():
            reasons[(row["stage"], row["error_type"], (row["message"] or "").replace(row["source_path"] or "\0", "<file>"))] += 1
    return [{"stage": s, "error_type": t, "reason": r, "count": n} for (s, t, r), n in reasons.most_common(top)]


def rewrite_without(output: str, kind: str, path: str, drop: list[int], *, cfg: OutputConfig) -> tuple[str | None, list[str]]:
    """Rewrite one shard without the rows at indices `drop`, atomically, under the name of what it still holds.

    Returns (new shard path, its source paths), or (None, []) when nothing was left and the shard was deleted.
    """
    fs, base = output_fs(output)
    table = pq.read_table(path, filesystem=fs)
    dropped = set(drop)
    rest = table.filter(pa.array([i not in dropped for i in range(table.num_rows)]))
    new_path, paths = None, rest.column("source_path").to_pylist()
    if rest.num_rows:  # a new name: the hash of a strict subset differs from the old one
        new_path = write_atomic(rest, fs, f"{base}/{kind}", f"{shard_name(paths)}-000", cfg=cfg)
    fs.delete_file(path)
    return new_path, paths


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


def write_text(output: str, name: str, text: str) -> None:
    """A small text file at OUTPUT/name, written atomically."""
    fs, base = output_fs(output)
    fs.create_dir(base, recursive=True)
    tmp = f"{base}/{TMP_PREFIX}{name}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, f"{base}/{name}")


def write_manifest(output: str, manifest: dict) -> None:
    write_text(output, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
