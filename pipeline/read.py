"""Read one input file: its bytes and their sha256, from a local path or a URI (s3://, gs://, file://...).

Unlike `ray.data.read_binary_files`, a file that cannot be read (permissions, a symlink loop, a FIFO,
a file over the size limit, a file that vanished since discovery) does not fail anything: `read_source`
raises `OSError` with a one-line reason, and the caller turns it into an error row, so every
discovered input is accounted for. No Ray here: the workers call it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.discover import is_uri


@dataclass(frozen=True)
class ReadConfig:
    max_file_bytes: int = 2 * 1024**3  # files larger than this (bytes) become error rows unread


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


def read_source(location: bytes, cfg: ReadConfig = ReadConfig()) -> tuple[bytes, str]:
    """(bytes, sha256 hex) of the file at `location` (SOURCE_SCHEMA's encoding: os.fsencode of a path, or a URI).

    Raises OSError whose `strerror` (or text) is the one-line reason.
    """
    data = read_file(os.fsdecode(location), max_bytes=cfg.max_file_bytes)
    return data, hashlib.sha256(data).hexdigest()
