"""Training the lung UNET: image/mask pairs, augmentation, loss, and one training loop for every backend.

- `data`: pairs from a packed .npz (`jobs/pack_pairs.py`), a manifest CSV, Parquet, or an images/ + masks/
  folder split by a stable hash of the patient key; image files and bytes are read with the job's decoder
  (`pipeline.decode`: DICOM, PNG 8/16 bit, JPEG, TIFF); `PairDataset` yields model inputs made by the same
  `prepare_input` that inference uses.
- `augment`: intensity on the CPU before `prepare_input`, geometry batched on the device; never mirrored.
- `metrics`: BCE + soft Dice loss, hard Dice, evaluation on prepared inputs.
- `loop`: `TrainConfig`, `train` (plain PyTorch, no Ray): AdamW, warm-up + cosine over a time budget or
  epochs, bf16 on CUDA or `cpu_bf16`, fine-tuning, stochastic weight averaging with BatchNorm re-estimation.
- `checkpoint`: the resumable `last.pt` and the metadata saved with the best weights.
- `ray_train`: `ray_worker_loop`, the Ray Train adapter (`jobs/train.py --backend ray`); imports ray lazily.
"""

from pipeline.training.augment import (
    AugmentConfig,
    augment_geometry,
    augment_intensity,
    random_affines,
)
from pipeline.training.data import (
    TRAIN,
    VAL,
    PairDataset,
    PairSet,
    hash_split,
    load_pairs,
    patient_key,
)
from pipeline.training.loop import (
    TrainConfig,
    augmented_inputs,
    cycle_factor,
    lr_factor,
    recompute_batchnorm,
    train,
)
from pipeline.training.metrics import dice_bce_loss, dice_scores
from pipeline.training.ray_train import ray_worker_loop

__all__ = [
    "TRAIN",
    "VAL",
    "AugmentConfig",
    "PairDataset",
    "PairSet",
    "TrainConfig",
    "augment_geometry",
    "augment_intensity",
    "augmented_inputs",
    "cycle_factor",
    "dice_bce_loss",
    "dice_scores",
    "hash_split",
    "load_pairs",
    "lr_factor",
    "patient_key",
    "random_affines",
    "ray_worker_loop",
    "recompute_batchnorm",
    "train",
]
