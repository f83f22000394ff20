"""The job as a cluster runs it: `ray start --head`, then `ray job submit --working-dir .`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_job_on_a_cluster(tmp_path):
    gcs, dash = free_port(), free_port()
    # Ports of its own for the agents too: the test session's Ray may hold the default ones, and an
    # agent that cannot bind leaves the head answering "No available agent to submit job".
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    # Ray 2.60's default: the head asks for a token. As the README says, the token is generated on the head
    # (~/.ray/auth_token; HOME is the test's own folder) and handed to the client as RAY_AUTH_TOKEN.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path / "home")
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert token and (tmp_path / "home" / ".ray" / "auth_token").exists()
    client = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=client,
                             capture_output=True, check=False).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
            time.sleep(1)
        out = tmp_path / "out"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                  sys.executable, "jobs/preprocess.py", "--input", str(SAMPLES / "xrays"), "--output", str(out),
                  "--variants", "masked_crop_eq"]
        while True:  # the job agent comes up a little after the dashboard answers
            r = subprocess.run(submit, env=client, capture_output=True, text=True, timeout=400, check=False)
            if "No available agent" not in r.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "done: 9 inputs: 9 images" in r.stdout and "0 errors" in r.stdout
        without_token = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                                       text=True, timeout=60, check=False)
        assert without_token.returncode != 0  # the head really asks for the token
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["counts"]["ok"] == 9
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # `ray start` leaves its address behind; a later plain ray.init() would try to join it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
