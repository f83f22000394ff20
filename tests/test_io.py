"""Discovery, reading, the row layout, and the exactly-once shard writer and its bookkeeping (no Ray needed)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.bookkeeping import remove_duplicate_rows
from pipeline.config import JobConfig
from pipeline.dataset import source_blocks
from pipeline.discover import SourceFile, discover
from pipeline.read import ReadConfig, read_source
from pipeline.schema import (
    ERRORS_SCHEMA,
    SOURCE_SCHEMA,
    error_row,
    image_row,
    images_schema,
    result_schema,
)
from pipeline.writer import (
    OutputConfig,
    list_shards,
    shard_name,
    shard_source_paths,
    write_results,
)

VARIANTS = ("masked",)


def read_row(src: SourceFile, cfg: ReadConfig) -> tuple[bytes | None, str]:
    """(bytes, sha256) or (None, the reason) for one discovered file."""
    try:
        return read_source(os.fsencode(src.location), cfg)
    except OSError as e:
        return None, e.strerror or str(e)


def done_source_paths(out: str) -> dict[str, list[str]]:
    return {kind: [p for paths in shards.values() for p in paths] for kind, shards in shard_source_paths(out).items()}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.png").write_bytes(b"x")
    (root / "Non_COVID (28).jpg").write_bytes(b"y")
    (root / os.fsdecode(b"caf\xe9.dcm")).write_bytes(b"z")  # not valid UTF-8
    os.symlink(root / "loop2", root / "loop1")
    os.symlink(root / "loop1", root / "loop2")
    os.symlink(root / "a", root / "a_link")  # a directory link: not followed, no duplicates
    os.mkfifo(root / "fifo.png")
    return root


def test_discover_lists_every_non_directory_entry_sorted(tree):
    files = discover([str(tree)])
    rels = [f.rel_path for f in files]
    assert rels == sorted(["a/b/x.png", "Non_COVID (28).jpg", "caf\\xe9.dcm", "loop1", "loop2", "fifo.png"])
    assert all(isinstance(f, SourceFile) for f in files)


def test_discover_prefixes_root_names_when_several_and_refuses_clashes(tmp_path, tree):
    other = tmp_path / "more"
    other.mkdir()
    (other / "y.png").write_bytes(b"1")
    rels = [f.rel_path for f in discover([str(tree), str(other)])]
    assert "in/a/b/x.png" in rels and "more/y.png" in rels
    clash = tmp_path / "x" / "in"
    clash.mkdir(parents=True)
    with pytest.raises(ValueError, match="distinct names"):
        discover([str(tree), str(clash)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([str(tmp_path / "nope")])


def test_read_gives_bytes_and_sha_or_a_reason(tree):
    by_rel = {f.rel_path: f for f in discover([str(tree)])}
    cfg = ReadConfig(max_file_bytes=10)
    data, sha = read_row(by_rel["a/b/x.png"], cfg)
    assert data == b"x" and sha == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert read_row(by_rel["caf\\xe9.dcm"], cfg)[0] == b"z"  # a non-UTF-8 name is opened by its bytes
    assert read_row(by_rel["loop1"], cfg)[0] is None and "symbolic links" in read_row(by_rel["loop1"], cfg)[1].lower()
    assert "not a regular file" in read_row(by_rel["fifo.png"], cfg)[1]
    (tree / "big.png").write_bytes(b"0" * 11)
    assert "over the limit of 10" in read_row(SourceFile("big.png", str(tree / "big.png"), str(tree)), cfg)[1]


def test_discovery_lists_sizes_and_source_blocks_balance_the_work(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(40):
        (root / f"{i:02d}.png").write_bytes(b"x" * (1000 if i < 20 else 5000))
    files = discover([str(root)])
    assert [f.size for f in files] == [1000] * 20 + [5000] * 20
    cfg = JobConfig(inputs=(str(root),), output="", task_files=8, task_bytes=20_000)
    blocks = source_blocks(files, cfg, workers=2)
    assert all(b.schema.equals(SOURCE_SCHEMA) for b in blocks)
    assert [r["source_path"] for b in blocks for r in b.to_pylist()] == [f.rel_path for f in files]  # all, in order
    sizes = [sum(b.column("size").to_pylist()) for b in blocks]
    assert max(b.num_rows for b in blocks) <= 8 and max(sizes) <= 20_000
    assert blocks[-1].num_rows == 1 and sizes[-1] < sizes[0]  # guided: the last calls are small
    assert os.fsdecode(blocks[0].column("location")[0].as_py()) == files[0].location


def test_rows_must_match_the_layout_exactly():
    schema = result_schema(VARIANTS)
    values = {name: None for name in images_schema(VARIANTS).names}
    assert image_row(values, schema)["error_stage"] is None
    with pytest.raises(ValueError, match=r"unknown \['dicom_station_name'\]"):
        image_row({**values, "dicom_station_name": "X"}, schema)  # a column not declared in schema.py
    with pytest.raises(ValueError, match=r"missing \['qc_pass'\]"):
        image_row({k: v for k, v in values.items() if k != "qc_pass"}, schema)
    err = error_row("a.png", None, stage="decode", error_type="DecodeError", message="x" * 900, schema=schema)
    assert set(err) == set(schema.names) and len(err["error_message"]) == 500


def result_rows(names: list[str], *, failed: set[str] = frozenset(), payload: int = 100) -> pa.Table:
    schema = result_schema(VARIANTS)
    rows = []
    for n in names:
        row = {k: None for k in schema.names}
        row.update(source_path=n, source_sha256="0" * 64, qc_flags=[], decode_notes=[])
        if n in failed:
            row.update(error_stage="decode", error_type="DecodeError", error_message="bad")
        else:
            row.update(masked_png=b"\x89PNG" + n.encode() * payload, masked_height=1, masked_width=1, qc_pass=True)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def test_write_results_splits_good_and_bad_rows_and_is_idempotent(tmp_path):
    out = str(tmp_path / "out")
    table = result_rows(["b.png", "a.png", "c.dcm"], failed={"c.dcm"})
    kwargs = {"output": out, "variants": VARIANTS, "cfg": OutputConfig()}
    summary = write_results(table, **kwargs)
    assert [(s["kind"], s["rows"]) for s in summary] == [("images", 2), ("errors", 1)]
    assert summary[0]["file"] == shard_name(["a.png", "b.png", "c.dcm"]) + "-000.parquet"
    write_results(table, **kwargs)  # a retried task: same names, files replaced
    assert done_source_paths(out) == {"images": ["b.png", "a.png"], "errors": ["c.dcm"]}
    errors = pq.read_table(list_shards(out)["errors"][0])
    assert errors.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    assert errors.to_pylist()[0]["message"] == "bad"


def test_shards_respect_rows_and_bytes_and_row_groups_follow_bytes(tmp_path):
    out = str(tmp_path / "out")
    names = [f"{i:03d}.png" for i in range(50)]
    cfg = OutputConfig(rows_per_shard=20, max_shard_bytes=10**9, row_group_bytes=5_000)
    summary = write_results(result_rows(names, payload=200), output=out, variants=VARIANTS, cfg=cfg)
    assert [s["rows"] for s in summary] == [20, 20, 10]
    meta = pq.ParquetFile(list_shards(out)["images"][0]).metadata
    row_bytes = 4 + 7 * 200 + 64 + 64 + 18  # PNG payload + path + sha + a constant, roughly
    assert 1 < meta.num_row_groups <= 20 and meta.row_group(0).num_rows <= 5_000 // (row_bytes // 2)
    png = meta.schema.names.index("masked_png")
    assert meta.row_group(0).column(png).compression == "UNCOMPRESSED"  # PNG is compressed already
    assert meta.row_group(0).column(0).compression == "SNAPPY"


def test_uris_go_through_pyarrow_filesystems(tmp_path):
    """file:// takes the same pyarrow code path as s3:// and gs:// (listing and reading)."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"abc")
    (root / "y.dcm").write_bytes(b"")
    files = discover([f"file://{root}"])
    assert [f.rel_path for f in files] == ["a/x.png", "y.dcm"]
    assert files[0].location == f"file://{root}/a/x.png"
    assert read_row(files[0], ReadConfig())[0] == b"abc"
    gone = read_row(SourceFile("z.png", f"file://{root}/z.png", str(root)), ReadConfig())
    assert gone[0] is None and "not a regular file" in gone[1]
    with pytest.raises(FileNotFoundError):
        discover([f"file://{root}/missing"])


def test_shards_can_be_written_to_a_uri(tmp_path):
    out = f"file://{tmp_path}/out"
    write_results(result_rows(["a.png", "b.png"], failed={"b.png"}), output=out, variants=VARIANTS, cfg=OutputConfig())
    assert done_source_paths(out) == {"images": ["a.png"], "errors": ["b.png"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors", "images"]


def test_rows_written_twice_by_two_runs_are_reconciled_to_one(tmp_path):
    """Workers of a killed run finishing a write while the resumed run writes the same inputs."""
    out = str(tmp_path / "out")
    kwargs = {"output": out, "variants": VARIANTS, "cfg": OutputConfig()}
    write_results(result_rows(["a.png", "b.png"]), **kwargs)  # the killed run's late shard
    write_results(result_rows(["b.png", "c.png", "d.dcm"], failed={"d.dcm"}), **kwargs)  # the resumed run's
    write_results(result_rows(["a.png"]), **kwargs)  # wholly duplicated
    write_results(result_rows(["e.png", "e.png", "f.png"]), **kwargs)  # a duplicate inside one shard
    clean = write_results(result_rows(["g.png"]), **kwargs)[0]["file"]
    clean_path = tmp_path / "out" / "images" / clean
    clean_stat = clean_path.stat()
    before = done_source_paths(out)
    assert sorted(before["images"]) == ["a.png", "a.png", "b.png", "b.png", "c.png", "e.png", "e.png", "f.png", "g.png"]
    sources = shard_source_paths(out)
    assert remove_duplicate_rows(out, sources, OutputConfig()) == 3
    after = done_source_paths(out)
    assert sorted(after["images"]) == ["a.png", "b.png", "c.png", "e.png", "f.png", "g.png"] and after["errors"] == ["d.dcm"]
    assert {k: sorted(p for v in shards.values() for p in v) for k, shards in sources.items()} == \
        {k: sorted(v) for k, v in after.items()}  # the in-memory listing was kept up to date
    assert clean_path.stat().st_mtime_ns == clean_stat.st_mtime_ns  # a shard without duplicates is not rewritten
    assert remove_duplicate_rows(out, shard_source_paths(out), OutputConfig()) == 0
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]


def test_distinct_files_get_distinct_reversible_names(tmp_path):
    """Issue #14.1: b"a\\xff.png" and a file literally named a\\xff.png were one row."""
    from pipeline.discover import unspell

    root = tmp_path / "in"
    root.mkdir()
    raw = [b"a\xff.png", b"a\\xff.png", b"b\\\\c.png", "café.png".encode()]
    for name in raw:
        (root / os.fsdecode(name)).write_bytes(name)
    files = discover([str(root)])
    assert len(files) == len(raw) == len({f.rel_path for f in files})
    assert sorted(unspell(f.rel_path) for f in files) == sorted(raw)
    assert all(f.rel_path.encode("utf-8") for f in files)  # storable as UTF-8


def test_absolute_source_paths_of_non_utf8_names_are_storable(tmp_path):
    """Issue #14.2: a non-UTF-8 name with --source-path absolute used to kill the read task."""
    from pipeline.dataset import source_files
    from pipeline.discover import unspell

    root = tmp_path / "in"
    root.mkdir()
    (root / os.fsdecode(b"x\xe9.png")).write_bytes(b"x")
    cfg = JobConfig(inputs=(str(root),), output=str(tmp_path / "out"), source_path_mode="absolute")
    (f,) = source_files(cfg)
    assert unspell(f.rel_path) == os.fsencode(root) + b"/x\xe9.png"
    (block,) = source_blocks([f], cfg, workers=1)
    assert block.column("source_path")[0].as_py() == f.rel_path


@pytest.mark.parametrize("uri", [False, True])
def test_the_output_folder_inside_an_input_root_is_never_read(tmp_path, uri):
    """Issue #14.4: on --resume the job's own Parquet and manifest became error rows."""
    root = tmp_path / "in"
    (root / "out" / "images").mkdir(parents=True)
    (root / "x.png").write_bytes(b"x")
    (root / "out" / "images" / "part-1.parquet").write_bytes(b"PAR1")
    (root / "out" / "manifest.json").write_text("{}")
    (root / "outside").mkdir()
    (root / "outside" / "y.png").write_bytes(b"y")
    prefix = "file://" if uri else ""
    files = discover([f"{prefix}{root}"], exclude=f"{prefix}{root / 'out'}")
    assert [f.rel_path for f in files] == ["outside/y.png", "x.png"]
