"""Run the job on a multi-node Ray on this machine and take a worker node away mid-run (issue #14.11).

    python tests/node_loss.py INPUT OUTPUT     -> prints one JSON line: the manifest's counts and last run

Ray's own `ray.cluster_utils.Cluster`: a head that runs no work and two worker nodes of one CPU, each a
raylet with its own object store. Once the first shards are written, one worker node is removed (as a
spot instance or an out-of-memory node goes away: its workers, actors and the result blocks in its
object store with it), and a new one joins, as an autoscaler would add. Run as its own process: the
test session's Ray must not be touched.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.config import JobConfig
from pipeline.dataset import run_job
from pipeline.writer import OutputConfig

SHARDS_BEFORE_LOSS = 2  # the node goes once this many image shards are written
TIMEOUT_S = 300


def remove_a_node_mid_run(cluster: Cluster, node, out: Path, removed: threading.Event) -> None:
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and len(list((out / "images").glob("part-*.parquet"))) < SHARDS_BEFORE_LOSS:
        time.sleep(0.05)
    cluster.remove_node(node, allow_graceful=False)
    removed.set()
    cluster.add_node(num_cpus=1)


def main(inputs: str, output: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    removed = threading.Event()
    killer = threading.Thread(target=remove_a_node_mid_run, args=(cluster, doomed, Path(output), removed), daemon=True)
    killer.start()
    cfg = JobConfig(inputs=(inputs,), output=output, variants=("masked",), workers=2, task_files=2,
                    out=OutputConfig(rows_per_shard=2))
    manifest = run_job(cfg)
    killer.join(timeout=60)
    print(json.dumps({"removed": removed.is_set(), "counts": manifest["counts"], "run": manifest["runs"][-1],
                      "complete": manifest["complete"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
