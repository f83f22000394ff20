"""The Ray Train adapter: `ray_worker_loop` runs `train` in a Ray Train worker (`jobs/train.py --backend ray`).

Ray is imported inside the function, so importing this module (or the package) never loads it.
"""

from __future__ import annotations

import logging

from pipeline.training.loop import Runtime, TrainConfig, train


def ray_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: config = {"train": TrainConfig fields}. Imports ray lazily."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rt = Runtime(
        device=ray.train.torch.get_device(),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        wrap_model=ray.train.torch.prepare_model,
        report=lambda metrics: ray.train.report(metrics),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(TrainConfig(**config["train"]), rt)
