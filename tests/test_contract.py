"""The output contract: resume refuses what would mix runs, damaged shards are redone, every run leaves a
readable images/ and errors/, and a run in which nothing became an image fails (issue #14, items 3, 5, 10)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from corpus import phantom_xray

from pipeline.bookkeeping import JobError, contract, start
from pipeline.config import JobConfig
from pipeline.dataset import run_job
from pipeline.model import read_weights
from pipeline.schema import METADATA_SCHEMA_VERSION, SCHEMA_VERSION
from pipeline.variants import VariantConfig
from pipeline.writer import OutputConfig, read_manifest

pytestmark = pytest.mark.slow


def write_inputs(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        img = cv2.add((phantom_xray(160, 160) >> 8).astype(np.uint8), np.full((160, 160), i, np.uint8))
        cv2.imwrite(str(root / f"img_{i}.png"), img)
        names.append(f"img_{i}.png")
    return names


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    """A finished run over 4 images with a key: (input folder, output folder, its JobConfig)."""
    root = tmp_path_factory.mktemp("contract")
    write_inputs(root / "in", 4)
    cfg = JobConfig(inputs=(str(root / "in"),), output=str(root / "out"), variants=("masked",), pseudonym_key=b"key-1")
    run_job(cfg)
    return root / "in", root / "out", cfg


CHANGES = {  # field the refusal must name -> the change
    "source_path_mode": {"source_path_mode": "hashed"},
    "variants": {"variants": ("masked", "full")},
    "variant": {"variant": VariantConfig(size=128)},
    "key_fingerprint": {"pseudonym_key": b"key-2"},
    "inputs": {"inputs": ("OTHER",)},
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_resume_refuses_to_mix_runs_that_differ(first_run, tmp_path, field):
    _, out, cfg = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    change = dict(CHANGES[field])
    if change.get("inputs") == ("OTHER",):
        other = tmp_path / "other"
        write_inputs(other, 2)
        change["inputs"] = (str(other),)
    before = sorted(p.name for p in copy.rglob("*"))
    with pytest.raises(JobError, match=rf"--resume would mix rows that differ in .*{field}"):
        run_job(JobConfig(**{**cfg.__dict__, "output": str(copy), "resume": True, **change}))
    assert sorted(p.name for p in copy.rglob("*")) == before  # refused before any work
    assert b"key-2" not in (copy / "manifest.json").read_bytes()


def test_resume_with_the_same_options_is_accepted_and_adds_nothing(first_run, tmp_path):
    _, out, cfg = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    manifest = run_job(JobConfig(**{**cfg.__dict__, "output": str(copy), "resume": True}))
    assert manifest["complete"] and manifest["runs"][-1]["processed"] == 0 and len(manifest["runs"]) == 2


def test_the_contract_is_in_the_manifest_from_the_start_and_in_every_shard(first_run, tmp_path):
    _, out, cfg = first_run
    weights = read_weights()
    manifest = read_manifest(str(out))
    assert manifest["contract"] == contract(cfg, weights) and manifest["schema_version"] == SCHEMA_VERSION
    assert "key-1" not in json.dumps(manifest)
    for shard in out.rglob("part-*.parquet"):
        assert pq.read_schema(shard).metadata[METADATA_SCHEMA_VERSION] == str(SCHEMA_VERSION).encode()
    fresh = JobConfig(**{**cfg.__dict__, "output": str(tmp_path / "new")})
    start(fresh, weights)  # what a run writes before its first shard: a killed run leaves this
    begun = read_manifest(str(tmp_path / "new"))
    assert begun["complete"] is False and begun["contract"] == contract(fresh, weights)


def test_a_truncated_shard_is_moved_aside_and_its_inputs_redone(ray_local, tmp_path):
    names = write_inputs(tmp_path / "in", 6)
    cfg = JobConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), variants=("masked",),
                    out=OutputConfig(rows_per_shard=2))
    run_job(cfg)
    victim = min((tmp_path / "out" / "images").glob("part-*.parquet"))
    lost = pq.read_table(victim, columns=["source_path"]).column("source_path").to_pylist()
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    manifest = run_job(JobConfig(**{**cfg.__dict__, "resume": True}))
    assert manifest["complete"] and manifest["runs"][-1]["processed"] == len(lost)
    assert (tmp_path / "out" / "quarantine" / "images" / victim.name).exists()
    done = pd.read_parquet(tmp_path / "out" / "images", columns=["source_path"]).source_path
    assert sorted(done) == sorted(names)


def test_rows_of_inputs_that_are_gone_make_the_run_incomplete(ray_local, tmp_path):
    write_inputs(tmp_path / "in", 3)
    cfg = JobConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), variants=("masked",))
    run_job(cfg)
    (tmp_path / "in" / "img_0.png").unlink()
    with pytest.raises(JobError, match="1 not among the inputs"):
        run_job(JobConfig(**{**cfg.__dict__, "resume": True}))
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["complete"] is False and manifest["counts"]["not_in_input"] == 1


def test_a_run_with_no_image_fails_and_still_leaves_readable_tables(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"junk_{i}.png").write_bytes(b"not an image %d" % i)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "preprocess.py"), "--input", str(root), "--output", str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "none of the 3 inputs became an image" in r.stderr
    assert len(pd.read_parquet(out / "errors")) == 3
    images = pd.read_parquet(out / "images")  # an empty table with every column, not a missing folder
    assert len(images) == 0 and "masked_crop_eq_png" in images.columns


def test_verify_passes_a_good_output_and_names_each_problem(first_run, tmp_path):
    from pipeline.verify import verify

    _, out, _ = first_run
    ok = subprocess.run([sys.executable, str(REPO / "jobs" / "verify.py"), str(out)], capture_output=True, text=True,
                        timeout=120, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
    assert verify(f"file://{out}") == []  # the same through a URI, as after a copy to S3
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    shards = sorted((bad / "images").glob("part-*.parquet"))
    shards[0].write_bytes(shards[0].read_bytes()[:100])  # damaged in transfer
    shutil.copy(next((bad / "errors").glob("part-*.parquet")), bad / "images" / "part-stray-000.parquet")
    (bad / "images" / ".part-x.parquet.tmp-1").write_bytes(b"half")
    problems = verify(str(bad))
    assert any("cannot be read" in p for p in problems)
    assert any("part-stray-000.parquet is in the output but not in the manifest" in p for p in problems)
    assert any("another schema" in p for p in problems)
    assert any("half-written" in p for p in problems)
    assert any("rows, the manifest counts" in p for p in problems)
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "verify.py"), str(bad)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == len(problems)
