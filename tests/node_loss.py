"""Run the job on a multi-node Ray on this machine and take a worker node away mid-run (issue #14.11).

    python tests/node_loss.py INPUT OUTPUT RESULT.json   -> the manifest's counts and last run, as JSON

(A file, not stdout: Ray forwards its processes' log lines to the driver's stdout at any moment.)

Ray's own `ray.cluster_utils.Cluster`: a head that runs no work and two worker nodes of one CPU, each a
raylet with its own object store. Once the first shards are written, one worker node is removed (as a
spot instance or an out-of-memory node goes away: its workers, actors and the result blocks in its
object store with it), and a new one joins, as an autoscaler would add. The job runs in a thread; the
nodes are changed from the main thread, which Ray's node start-up needs. Run as its own process: the
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


def main(inputs: str, output: str, result: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = JobConfig(inputs=(inputs,), output=output, variants=("masked",), workers=2, task_files=2,
                    out=OutputConfig(rows_per_shard=2))
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(manifest=run_job(cfg)), daemon=True)
    job.start()
    deadline = time.time() + TIMEOUT_S
    while job.is_alive() and time.time() < deadline and len(list(Path(output, "images").glob("part-*.parquet"))) < SHARDS_BEFORE_LOSS:
        time.sleep(0.05)
    removed = job.is_alive()
    if removed:
        cluster.remove_node(doomed, allow_graceful=False)
        cluster.add_node(num_cpus=1)
    job.join(TIMEOUT_S)
    manifest = outcome["manifest"]
    Path(result).write_text(json.dumps({"removed": removed, "counts": manifest["counts"], "run": manifest["runs"][-1],
                                        "complete": manifest["complete"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
