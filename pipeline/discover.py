"""Find the input files under one or more roots: local paths or pyarrow-filesystem URIs.

Every entry that is not a directory becomes a `SourceFile`, whatever its extension: the
decoder recognises formats by content, and anything it cannot read becomes an error row, so
nothing found here is silently dropped. Local trees are walked without following directory
symlinks (no loops); a symlink that points nowhere or into a loop is still listed, and fails
later with a clear read error. The job's own output folder is never walked, even inside a root.

A file's identity is its raw path. Its `rel_path` (what the output calls `source_path`) is a
lossless, reversible spelling of those bytes as text (`spell`): distinct files always get distinct
names, and `unspell` gives the bytes back.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://", "hdfs://", "abfs://", "abfss://")


@dataclass(frozen=True, order=True)
class SourceFile:
    """One input file.

    `rel_path` identifies it in the output and on resume: the path relative to its input root,
    prefixed with the root's name when several roots are given. `location` is what the reader
    opens (a local path, possibly not valid UTF-8, or a URI).
    """

    rel_path: str
    location: str
    root: str
    size: int | None = None  # bytes as listed (None when the listing cannot tell); used to balance work


def is_uri(path: str) -> bool:
    return path.startswith(_URI_SCHEMES)


ESCAPE = "\\"


def spell(name: str | bytes) -> str:
    """A path as text that UTF-8 can store, losslessly: a backslash becomes two, a byte that is not
    UTF-8 becomes \\xNN. So b"a\\xff.png" -> "a\\xff.png" and a name literally a\\xff.png ->
    "a\\\\xff.png": never the same."""
    text = os.fsencode(name).decode("utf-8", errors="surrogateescape")
    out = []
    for ch in text:
        if ch == ESCAPE:
            out.append(ESCAPE * 2)
        elif "\udc80" <= ch <= "\udcff":  # an undecodable byte, as surrogateescape carries it
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unspell(text: str) -> bytes:
    """The bytes `spell` was given (its exact inverse)."""
    out, i = bytearray(), 0
    while i < len(text):
        if text.startswith(ESCAPE * 2, i):
            out += b"\\"
            i += 2
        elif text.startswith(ESCAPE + "x", i):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += text[i].encode("utf-8")
            i += 1
    return bytes(out)


def _size(location: str) -> int | None:
    """The file's size in bytes (a symlink's target), or None when it cannot be stat-ed (a broken link)."""
    try:
        return os.stat(location).st_size
    except OSError:
        return None


def _walk_local(root: str, skip: str | None) -> list[tuple[str, str, int | None]]:
    """(location, relative posix path, size) for every non-directory entry under a local root, not under `skip`."""
    if not os.path.isdir(root):
        return [(root, os.path.basename(root), _size(root))]
    found = []
    skipped_dir_links = 0

    def on_error(err: OSError) -> None:
        # An unreadable directory: its files cannot be listed, so say so loudly.
        log.warning("cannot list %s: %s", spell(str(err.filename)), err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        kept_dirs = []
        for d in dirnames:
            path = os.path.join(dirpath, d)
            if os.path.islink(path):
                skipped_dir_links += 1
            elif skip is None or os.path.realpath(path) != skip:
                kept_dirs.append(d)
        dirnames[:] = sorted(kept_dirs)
        for name in filenames:
            location = os.path.join(dirpath, name)
            rel = os.path.relpath(location, root).replace(os.sep, "/")
            found.append((location, rel, _size(location)))
    if skipped_dir_links:
        log.warning("%d symlinked directories under %s were not followed", skipped_dir_links, root)
    return found


def _walk_uri(uri: str, skip: str | None) -> list[tuple[str, str, int | None]]:
    fs, base = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        return [(uri, posixpath.basename(base), info.size)]
    scheme_prefix = uri[: uri.index("://") + 3]
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if entry.type == pafs.FileType.Directory or (skip and (entry.path + "/").startswith(skip + "/")):
            continue
        rel = posixpath.relpath(entry.path, base)
        found.append((scheme_prefix + entry.path, rel, entry.size))
    return found


def root_name(root: str) -> str:
    return posixpath.basename(root.rstrip("/")) or root


def _skip_for(output: str | None, uri: bool) -> str | None:
    """The output folder as the walk of a local root (real path) or a URI root (the filesystem's path) sees it."""
    if not output:
        return None
    if uri:
        return pafs.FileSystem.from_uri(output)[1].rstrip("/") if is_uri(output) else None
    return None if is_uri(output) else os.path.realpath(output)


def discover(roots: list[str], *, exclude: str | None = None) -> list[SourceFile]:
    """All files under `roots`, sorted by `rel_path`; nothing under the folder `exclude` (the job's output).

    Raises FileNotFoundError for a root that does not exist and ValueError when two roots would
    give the same relative names.
    """
    if not roots:
        raise ValueError("expected at least one input path, got none")
    prefix_roots = len(roots) > 1
    if prefix_roots:
        names = [root_name(r) for r in roots]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ValueError(f"input roots must have distinct names, got {clashes} more than once")
    files: dict[str, SourceFile] = {}
    for root in roots:
        if is_uri(root):
            entries = _walk_uri(root, _skip_for(exclude, uri=True))
        else:
            if not os.path.lexists(root):
                raise FileNotFoundError(f"input {root} does not exist")
            entries = _walk_local(root, _skip_for(exclude, uri=False))
        for location, rel, size in entries:
            rel = spell(rel)
            if prefix_roots:
                rel = f"{spell(root_name(root))}/{rel}"
            files.setdefault(rel, SourceFile(rel_path=rel, location=location, root=root, size=size))
    return sorted(files.values())
