"""Train the lung UNET and write the best-by-val-Dice weights with their meta.

    xray-lung-prep train --data .gpu/covid_qu_ex.npz --out pipeline/weights/lung_unet.pt --minutes 15

--backend ray (default): Ray Train TorchTrainer, one CPU worker on a laptop, --workers N GPU workers on a
cluster, the same command. --backend local: the same loop in this process, without Ray (ray is not
even imported). --data: packed .npz (jobs/pack_pairs.py), manifest .csv, Parquet or images/+masks/ folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys

from pipeline.cli import HelpFormatter
from pipeline.training import TrainConfig, train
from pipeline.training.augment import AUGMENT_PRESETS

log = logging.getLogger("train")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="packed .npz, manifest .csv, Parquet (image/mask bytes columns), or folder with images/ and masks/")
    p.add_argument("--out", required=True, help="weights file to write (best val Dice)")
    p.add_argument("--backend", choices=("ray", "local"), default="ray", help="Ray Train workers, or this process")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per GPU on a cluster)")
    p.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="Ray workers use GPUs (auto: if CUDA is visible)")
    p.add_argument("--checkpoint-dir", default=None, help="folder for last.pt (full training state)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; the LR schedule spans it")
    p.add_argument("--epochs", type=int, default=d.epochs, help="max epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of the schedule in linear warm-up")
    p.add_argument("--input-size", type=int, default=d.input_size, help="model input side in px")
    p.add_argument("--base-width", type=int, default=d.base_width, help="UNET channels at full resolution")
    p.add_argument("--depth", type=int, default=d.depth, help="UNET downsamplings")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="val share when the data has no split")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs (smoke runs)")
    p.add_argument("--loader-workers", type=int, default=d.loader_workers, help="DataLoader processes; -1 = auto")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast + channels_last on CPU (~3x faster with AVX512-BF16/AMX)")
    p.add_argument("--init-weights", default=None, help="start from this weights file (fine-tuning; its arch wins)")
    p.add_argument("--average", action="store_true", help="stochastic weight averaging: constant LR, average of the epochs")
    p.add_argument("--bn-images", type=int, default=d.bn_images, help="training images that re-estimate BatchNorm of the average")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--boundary-weight", type=float, default=d.boundary_weight,
                   help="extra BCE weight of pixels within --boundary-px of the true outline")
    p.add_argument("--boundary-px", type=int, default=d.boundary_px, help="half-width of that band, px at the input size")
    p.add_argument("--oversample", type=parse_oversample, action="append", default=[], metavar="REGEX=FACTOR",
                   help="draw training pairs whose name matches REGEX FACTOR times as often (repeatable; "
                        "COVID-QU-Ex: '^covid_=2' '^non_covid=2'); one training worker only")
    p.add_argument("--augment", choices=sorted(AUGMENT_PRESETS), default=d.augment,
                   help="augmentation preset: 'strong' widens gamma, contrast, blur and noise and inverts 10%%")
    return p.parse_args(argv)


def parse_oversample(text: str) -> tuple[str, float]:
    pattern, sep, factor = text.rpartition("=")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if not sep or not pattern or not value > 0:
        raise argparse.ArgumentTypeError(f"expected REGEX=FACTOR with a factor > 0, got {text!r}")
    return pattern, value


def config_from_args(args: argparse.Namespace, argv: list[str]) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["oversample"] = tuple(values.get("oversample") or ())
    return TrainConfig(**values, command=shlex.join(["xray-lung-prep", "train", *argv]))


def run_ray(cfg: TrainConfig, *, workers: int, gpu: str) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.training import ray_worker_loop

    if not ray.is_initialized():  # $RAY_ADDRESS under `ray job submit`, else a Ray of its own
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    if gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    else:
        use_gpu = gpu == "yes"
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={"train": dataclasses.asdict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
    )
    result = trainer.fit()
    return dict(result.metrics or {})  # Ray Train v2 keeps metrics only with a reported checkpoint


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv, prog)
    cfg = config_from_args(args, argv)
    if args.backend == "local":
        result = train(cfg)
    else:
        result = run_ray(cfg, workers=args.workers, gpu=args.gpu)
    log.info("result: %s", result)
    return 0

