"""Discovery, the reading datasource's rows, and the exactly-once shard writer (no Ray needed)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.datasource import ReadConfig, read_row
from pipeline.discover import SourceFile, discover
from pipeline.schema import ERRORS_SCHEMA, images_schema
from pipeline.stages import result_schema
from pipeline.writer import (
    OutputConfig,
    done_source_paths,
    list_shards,
    output_is_empty,
    remove_duplicate_rows,
    remove_temporary_files,
    shard_name,
    split_by_bytes,
    write_shards,
)


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


def test_read_rows_give_bytes_and_sha_or_a_reason(tree):
    by_rel = {f.rel_path: f for f in discover([str(tree)])}
    cfg = ReadConfig(max_file_bytes=10)
    good = read_row(by_rel["a/b/x.png"], cfg)
    assert good["data"] == b"x" and good["error_stage"] is None
    assert good["source_sha256"] == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    loop = read_row(by_rel["loop1"], cfg)
    assert loop["error_stage"] == "read" and "symbolic links" in loop["error_message"].lower()
    fifo = read_row(by_rel["fifo.png"], cfg)
    assert fifo["error_stage"] == "read" and "not a regular file" in fifo["error_message"]
    (tree / "big.png").write_bytes(b"0" * 11)
    big = read_row(SourceFile("big.png", str(tree / "big.png"), str(tree)), cfg)
    assert "over the limit of 10" in big["error_message"] and big["data"] is None


def result_rows(names: list[str], *, failed: set[str] = frozenset()) -> pa.Table:
    schema = result_schema(("masked",))
    rows = []
    for n in names:
        row = {k: None for k in schema.names}
        row.update(source_path=n, source_sha256="0" * 64, qc_flags=[], decode_notes=[])
        if n in failed:
            row.update(error_stage="decode", error_type="DecodeError", error_message="bad")
        else:
            row.update(masked_png=b"\x89PNG" + n.encode() * 100, masked_height=1, masked_width=1, qc_pass=True)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def test_write_shards_splits_good_and_bad_rows_and_is_idempotent(tmp_path):
    out = str(tmp_path / "out")
    table = result_rows(["b.png", "a.png", "c.dcm"], failed={"c.dcm"})
    kwargs = {"output": out, "images_schema": images_schema(["masked"]), "cfg": OutputConfig()}
    summary = write_shards(table, **kwargs).to_pylist()
    assert [(s["kind"], s["rows"]) for s in summary] == [("images", 2), ("errors", 1)]
    assert summary[0]["file"] == shard_name(["a.png", "b.png", "c.dcm"]) + "-000.parquet"
    write_shards(table, **kwargs)  # a retried task: same names, files replaced
    assert done_source_paths(out) == {"images": ["b.png", "a.png"], "errors": ["c.dcm"]}
    errors = pq.read_table(list_shards(out)["errors"][0])
    assert errors.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    assert errors.to_pylist()[0]["message"] == "bad"


def test_shards_split_by_bytes_and_temporary_files_are_never_data(tmp_path):
    table = result_rows([f"{i}.png" for i in range(10)])
    parts = split_by_bytes(table, max_bytes=2000)
    assert sum(p.num_rows for p in parts) == 10 and len(parts) > 1
    assert all(p.num_rows >= 1 for p in parts)
    out = tmp_path / "out"
    assert output_is_empty(str(out))
    (out / "images").mkdir(parents=True)
    (out / "images" / ".part-abc-000.parquet.tmp-123").write_bytes(b"half a file")
    assert list_shards(str(out)) == {"images": [], "errors": []}
    assert not output_is_empty(str(out))
    assert remove_temporary_files(str(out)) == 1
    assert list(out.joinpath("images").iterdir()) == []


def test_uris_go_through_pyarrow_filesystems(tmp_path):
    """file:// takes the same pyarrow code path as s3:// and gs:// (listing and reading)."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"abc")
    (root / "y.dcm").write_bytes(b"")
    files = discover([f"file://{root}"])
    assert [f.rel_path for f in files] == ["a/x.png", "y.dcm"]
    assert files[0].location == f"file://{root}/a/x.png"
    row = read_row(files[0], ReadConfig())
    assert row["data"] == b"abc" and row["error_stage"] is None
    gone = read_row(SourceFile("z.png", f"file://{root}/z.png", str(root)), ReadConfig())
    assert gone["error_stage"] == "read" and "not a regular file" in gone["error_message"]
    with pytest.raises(FileNotFoundError):
        discover([f"file://{root}/missing"])


def test_shards_can_be_written_to_a_uri(tmp_path):
    out = f"file://{tmp_path}/out"
    write_shards(result_rows(["a.png", "b.png"], failed={"b.png"}), output=out,
                 images_schema=images_schema(["masked"]), cfg=OutputConfig())
    assert done_source_paths(out) == {"images": ["a.png"], "errors": ["b.png"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors", "images"]


def test_rows_written_twice_by_two_runs_are_reconciled_to_one(tmp_path):
    """Workers of a killed run finishing a write while the resumed run writes the same inputs."""
    out = str(tmp_path / "out")
    kwargs = {"output": out, "images_schema": images_schema(["masked"]), "cfg": OutputConfig()}
    write_shards(result_rows(["a.png", "b.png"]), **kwargs)  # the killed run's late shard
    write_shards(result_rows(["b.png", "c.png", "d.dcm"], failed={"d.dcm"}), **kwargs)  # the resumed run's
    write_shards(result_rows(["a.png"]), **kwargs)  # wholly duplicated
    before = done_source_paths(out)
    assert sorted(before["images"]) == ["a.png", "a.png", "b.png", "b.png", "c.png"]
    assert remove_duplicate_rows(out) == 2
    after = done_source_paths(out)
    assert sorted(after["images"]) == ["a.png", "b.png", "c.png"] and after["errors"] == ["d.dcm"]
    assert remove_duplicate_rows(out) == 0
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
