"""What a training run reads and writes besides the weights: the resumable checkpoint and the model meta.

- `last.pt` in the checkpoint folder: model, optimizer, loop state and the weight average, if any;
  written atomically (temp file + rename), read back by `--resume`.
- the meta saved with the best weights (`pipeline.model.save_model`): architecture and input size, then
  data, split, schedule, device, command, git commit, date, per-epoch history, the model it was
  fine-tuned from (path, sha256, its training and metrics) and the best val Dice.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.model import load_model, read_weights
from pipeline.model_input import DEFAULT_THRESHOLD, NORMALIZATION_EQUALIZE_U8, ModelMeta
from pipeline.training.data import PairSet
from pipeline.unet import UNetConfig

if TYPE_CHECKING:
    from pipeline.training.loop import Runtime, TrainConfig

log = logging.getLogger(__name__)

MODEL_NAME = "lung-unet"
CHECKPOINT_NAME = "last.pt"
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def initial_meta(cfg: TrainConfig) -> tuple[ModelMeta, torch.nn.Module | None]:
    """The meta of the model to train, and the model to start from (None: random init)."""
    if cfg.init_weights:
        weights = read_weights(cfg.init_weights)
        start, start_meta = load_model(weights)
        if start_meta.normalization != NORMALIZATION_EQUALIZE_U8:
            raise ValueError(f"{cfg.init_weights}: expected normalization {NORMALIZATION_EQUALIZE_U8!r}, "
                             f"got {start_meta.normalization!r}")
        log.info("fine-tuning %s (arch %s, input %d px)", cfg.init_weights, start_meta.arch, start_meta.input_size)
        arch, size = UNetConfig(**start_meta.arch), start_meta.input_size
        base = {k: v for k, v in start_meta.training.items() if k != "history"}
        training = {"fine_tuned_from": {"path": str(cfg.init_weights), "sha256": weights.sha256,
                                        "training": base, "metrics": start_meta.metrics}}
    else:
        start, arch, size = None, UNetConfig(base_width=cfg.base_width, depth=cfg.depth), cfg.input_size
        training = {}
    meta = ModelMeta(name=MODEL_NAME, input_size=size, normalization=NORMALIZATION_EQUALIZE_U8,
                     threshold=DEFAULT_THRESHOLD, arch=dataclasses.asdict(arch), training=training)
    return meta, start


def final_meta(meta: ModelMeta, cfg: TrainConfig, pairs: PairSet, train_idx: list[int], val_idx: list[int],
               state: dict, rt: Runtime) -> ModelMeta:
    """`meta` with the run's record in `training` and the best val Dice in `metrics`."""
    training = {
        **meta.training,  # fine_tuned_from, when there is one
        "data": pairs.source,
        "split": {"train": len(train_idx), "val": len(val_idx)},
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "steps": state["step"],
        "batch_size": cfg.batch_size * rt.world_size,
        "lr": cfg.lr,
        "schedule": "one cosine cycle per epoch, weight averaging" if cfg.average else "cosine",
        "minutes_budget": cfg.minutes,
        "device": str(rt.device) if rt.device.type != "cuda" else torch.cuda.get_device_name(rt.device),
        "world_size": rt.world_size,
        "command": cfg.command,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": list(state["history"]),
    }
    metrics = {"val_dice": float(state["best_dice"]), "val_dice_at": f"{cfg.input_size}px, threshold {meta.threshold}"}
    return dataclasses.replace(meta, training=training, metrics=metrics)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    averaged: torch.nn.Module | None = None) -> None:
    """Write the full training state to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    if averaged is not None:
        payload["averaged"] = averaged.state_dict()
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    averaged: torch.nn.Module | None, *, device: torch.device) -> None:
    """Restore what `save_checkpoint` wrote into `model`, `optimizer`, `state` and `averaged`, in place;
    a missing file (or no checkpoint folder) leaves them as they are, with a warning."""
    if path is None or not path.is_file():
        log.warning("--resume: no checkpoint at %s, starting fresh", path)
        return
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state.update(ckpt["state"])
    if averaged is not None and "averaged" in ckpt:
        averaged.load_state_dict(ckpt["averaged"])
    log.info("resumed from %s at epoch %d (schedule progress %.3f, best val Dice %.4f)", path, state["epoch"],
             state["progress"], state["best_dice"])
