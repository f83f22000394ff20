"""Crashes: a segmenter actor that dies mid-run, and a driver killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from corpus import phantom_xray

from pipeline.config import JobConfig, SegmentConfig
from pipeline.dataset import run_job
from pipeline.segment import Segmenter
from pipeline.writer import OutputConfig

pytestmark = pytest.mark.slow

CRASH_AFTER_BATCHES = 2  # the doomed actor dies while holding its third batch


def write_phantoms(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        img = (phantom_xray(160 + 8 * (i % 5), 160) >> 8).astype(np.uint8)
        img = cv2.add(img, np.full_like(img, i % 7))  # distinct content, distinct sha256
        name = f"img_{i:03d}.png"
        cv2.imwrite(str(root / name), img)
        names.append(name)
    return names


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment holds marker=1 (a process tree that inherited it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"{marker}=1".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def source_paths(out: Path) -> Counter:
    paths: Counter = Counter()
    for kind in ("images", "errors"):
        for p in (out / kind).glob("part-*.parquet"):
            paths.update(pq.read_table(p, columns=["source_path"]).column("source_path").to_pylist())
    return paths


class CrashOnceSegmenter(Segmenter):
    """Dies (like a lost GPU node) after a few batches, once per marker file."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker
        self.batches = 0

    def __call__(self, batch):
        self.batches += 1
        if self.batches > CRASH_AFTER_BATCHES and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.parametrize("layout", ["model in the workers", "segmenter pool"])
def test_a_dying_segmenter_loses_and_duplicates_nothing(ray_local, tmp_path, layout):
    """The process running the model dies mid-run: a CPU worker (Ray Data restarts it and re-runs its
    block) or a pool actor, as on a lost GPU node (Ray restarts it and retries the call)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    names = write_phantoms(tmp_path / "in", 12)
    marker = tmp_path / "crashed"

    class Doomed(CrashOnceSegmenter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, marker=str(marker), **kwargs)

    out = tmp_path / "out"
    pool = layout == "segmenter pool"
    cfg = JobConfig(inputs=(str(tmp_path / "in"),), output=str(out), variants=("masked",), workers=2, task_files=3,
                    segment=SegmentConfig(batch_size=1, pool=pool, actors=1 if pool else None),
                    out=OutputConfig(rows_per_shard=3))
    manifest = run_job(cfg, segmenter=Doomed)
    assert marker.exists(), "the segmenter never crashed: the test did not test anything"
    assert source_paths(out) == Counter(names)
    assert manifest["complete"] and manifest["counts"]["ok"] == len(names)


def test_killed_driver_then_resume_gives_every_input_exactly_once(tmp_path):
    names = write_phantoms(tmp_path / "in", 40)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "jobs" / "preprocess.py"), "--input", str(tmp_path / "in"),
           "--output", str(out), "--variants", "masked", "--rows-per-shard", "2", "--segment-batch", "2"]
    marker = f"XRAY_KILL_TEST_{os.getpid()}"
    env = {**os.environ, "RAY_ADDRESS": "local", marker: "1"}  # a Ray of its own, not the test session's
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "images").glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Ray's workers outlive the driver for a moment and may still finish a shard: wait until that
    # whole process tree is gone, so `before` is what the resumed run will find.
    deadline = time.time() + 120
    while processes_with_marker(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_with_marker(marker), "processes of the killed run are still alive"
    before = source_paths(out)
    assert 0 < sum(before.values()) < len(names), "kill did not land mid-run"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False  # written at the start, with the contract

    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    after = source_paths(out)
    assert after == Counter(names)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["runs"][-1]["processed"] == len(names) - sum(before.values())


def test_a_worker_node_lost_mid_run_costs_no_input_and_duplicates_none(tmp_path):
    """Issue #14.11: a whole worker node (raylet, object store, workers) goes away mid-run."""
    names = write_phantoms(tmp_path / "in", 24)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "node_loss.py"), str(tmp_path / "in"), str(out),
                        str(tmp_path / "result.json")], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["removed"], "the node was never removed: the test did not test anything"
    assert result["complete"] and result["counts"]["ok"] == len(names)
    assert source_paths(out) == Counter(names)  # every input exactly once, counted from the files
    print("redone after the loss:", result["run"]["redone_after_loss"], "of", len(names))
