"""Ray Data datasource that reads the bytes of discovered X-ray files, one row per file.

Unlike `ray.data.read_binary_files`, a file that cannot be read (permissions, a symlink loop,
a FIFO, a file over the size limit) does not fail the read task: it becomes a row whose
`error_*` columns say why, so every discovered input is accounted for downstream.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.discover import SourceFile, is_uri
from pipeline.schema import READ_SCHEMA, error_fields


@dataclass(frozen=True)
class ReadConfig:
    max_file_bytes: int = 2 * 1024**3  # files larger than this (bytes) become error rows unread
    block_bytes: int = 128 * 1024**2  # a read task emits a block once it holds this many bytes
    max_files_per_task: int = 64  # upper bound on files per read task (more tasks = more parallelism)


class FileReadError(OSError):
    """A file that exists in the listing but cannot be read as a regular file."""


def _read_local(path: str, *, max_bytes: int) -> bytes:
    st = os.stat(path)  # follows symlinks; a loop raises ELOOP here
    if not stat.S_ISREG(st.st_mode):
        raise FileReadError(f"not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_size > max_bytes:
        raise FileReadError(f"file is {st.st_size} bytes, over the limit of {max_bytes}")
    with open(path, "rb") as f:
        return f.read()


def _read_uri(uri: str, *, max_bytes: int) -> bytes:
    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileReadError(f"not a regular file ({info.type.name})")
    if info.size is not None and info.size > max_bytes:
        raise FileReadError(f"file is {info.size} bytes, over the limit of {max_bytes}")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_file(location: str, *, max_bytes: int) -> bytes:
    """The whole file's bytes. Raises OSError (or FileReadError) when it cannot be read."""
    if is_uri(location):
        return _read_uri(location, max_bytes=max_bytes)
    return _read_local(location, max_bytes=max_bytes)


def read_row(src: SourceFile, cfg: ReadConfig) -> dict:
    """One row of READ_SCHEMA for one file: its bytes and sha256, or the reason it has none."""
    row = {"source_path": src.rel_path, "source_sha256": None, "data": None, **error_fields()}
    try:
        data = read_file(src.location, max_bytes=cfg.max_file_bytes)
    except OSError as e:
        reason = e.strerror or str(e)
        row.update(error_fields("read", type(e).__name__, reason))
        return row
    row["source_sha256"] = hashlib.sha256(data).hexdigest()
    row["data"] = data
    return row


def _read_blocks(files: list[SourceFile], cfg: ReadConfig) -> Iterator[pa.Table]:
    rows, size = [], 0
    for src in files:
        row = read_row(src, cfg)
        rows.append(row)
        size += len(row["data"] or b"")
        if size >= cfg.block_bytes:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
            rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


class XrayFileDatasource(Datasource):
    """Reads a fixed, already discovered list of files; one row per file (READ_SCHEMA)."""

    def __init__(self, files: list[SourceFile], cfg: ReadConfig = ReadConfig()):
        self._files = list(files)
        self._cfg = cfg

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        if not self._files:
            return []
        per_task = -(-len(self._files) // max(1, parallelism))
        per_task = max(1, min(per_task, self._cfg.max_files_per_task))
        tasks = []
        for start in range(0, len(self._files), per_task):
            chunk = self._files[start:start + per_task]
            meta = BlockMetadata(num_rows=len(chunk), size_bytes=None, exec_stats=None, input_files=None)
            tasks.append(ReadTask(lambda chunk=chunk, cfg=self._cfg: _read_blocks(chunk, cfg), meta, schema=READ_SCHEMA))
        return tasks
