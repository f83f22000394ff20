"""Check an output folder against its manifest: run it after copying an output elsewhere (to S3...).

    verify(output) -> list of problems, one line each; [] when the output keeps its contract

What is checked: the manifest is there, readable and complete, and of a schema version this package
reads; every shard it lists exists and reads, and no other shard is there; the rows match its counts
(images, errors, inputs); no source_path occurs twice; every images shard has one and the same
schema, the one its variants give, and carries the manifest's schema version; no half-written file
is left. Reads the `source_path` column and the Parquet footers only, never the image bytes.
"""

from __future__ import annotations

import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import (
    ERRORS_SCHEMA,
    METADATA_SCHEMA_VERSION,
    SCHEMA_VERSION,
    images_schema,
)
from pipeline.writer import (
    ERRORS_DIR,
    IMAGES_DIR,
    KINDS,
    TMP_PREFIX,
    list_shards,
    output_fs,
    read_manifest,
)


def _expected_schema(kind: str, manifest: dict) -> pa.Schema | None:
    if kind == ERRORS_DIR:
        return ERRORS_SCHEMA
    variants = (manifest.get("contract") or {}).get("variants")
    return images_schema(variants) if variants is not None else None


def verify(output: str) -> list[str]:
    """Every way the output at `output` (a folder or URI) breaks its contract, one line each."""
    try:
        manifest = read_manifest(output)
    except (ValueError, OSError) as e:
        return [f"manifest.json cannot be read: {type(e).__name__}"]
    if manifest is None:
        return [f"no manifest.json in {output}"]
    problems = []
    if manifest.get("complete") is not True:
        problems.append("manifest says the run is not complete")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema version {manifest.get('schema_version')!r}, this package reads {SCHEMA_VERSION}")
    fs, base = output_fs(output)
    found = list_shards(output)
    rows: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for kind in KINDS:
        listed = set(manifest.get("shards", {}).get(kind, []))
        present = {posixpath.basename(p): p for p in found[kind]}
        problems += [f"{kind}/{name} is in the manifest but not in the output" for name in sorted(listed - set(present))]
        problems += [f"{kind}/{name} is in the output but not in the manifest" for name in sorted(set(present) - listed)]
        expected = _expected_schema(kind, manifest)
        for name, path in sorted(present.items()):
            try:
                schema = pq.read_schema(path, filesystem=fs)
                rows[kind].update(pq.read_table(path, columns=["source_path"], filesystem=fs).column("source_path").to_pylist())
            except (pa.ArrowException, OSError) as e:
                problems.append(f"{kind}/{name} cannot be read: {type(e).__name__}")
                continue
            if expected is not None and not schema.equals(expected, check_metadata=False):
                problems.append(f"{kind}/{name} has another schema than the manifest's variants give")
            if (schema.metadata or {}).get(METADATA_SCHEMA_VERSION) != str(manifest.get("schema_version")).encode():
                problems.append(f"{kind}/{name} does not carry the manifest's schema version")
    counts = manifest.get("counts", {})
    for kind, key in ((IMAGES_DIR, "ok"), (ERRORS_DIR, "errors")):
        if sum(rows[kind].values()) != counts.get(key):
            problems.append(f"{kind}/ holds {sum(rows[kind].values())} rows, the manifest counts {counts.get(key)}")
    both = rows[IMAGES_DIR] + rows[ERRORS_DIR]
    if sum(both.values()) != counts.get("images_in"):
        problems.append(f"{sum(both.values())} rows in all, the manifest counts {counts.get('images_in')} inputs")
    duplicated = sorted(p for p, n in both.items() if n > 1)
    if duplicated:
        problems.append(f"{len(duplicated)} source paths occur more than once (first: {duplicated[0]})")
    for kind in KINDS:
        if fs.get_file_info(f"{base}/{kind}").type == pafs.FileType.Directory:
            left = [e.base_name for e in fs.get_file_info(pafs.FileSelector(f"{base}/{kind}")) if e.base_name.startswith(TMP_PREFIX)]
            problems += [f"{kind}/{name} is a half-written file" for name in left]
    return problems
