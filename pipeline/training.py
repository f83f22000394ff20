"""Training the lung UNET: image/mask pairs, augmentation, loss, and one training loop for every backend.

Data sources (`load_pairs`):
- a packed `.npz` written by `jobs/pack_pairs.py` (train/val split stored in it);
- a manifest CSV with columns image, mask, split (paths relative to the CSV; split Train/Val, any case);
- Parquet (a file or a folder of *.parquet) with encoded `image` and `mask` bytes columns (`load_parquet`);
- a folder with images/ and masks/ whose files pair by stem (any extension); a manifest.csv in the folder
  is used if present, otherwise the split is a stable hash of the *patient* key (see `patient_key`), so
  all images of one patient land on the same side and the split never changes between runs.

Augmentation, applied on the fly and never mirrored left-right (the heart is on the left):
- intensity, on the CPU in the data loader, on the source pixels BEFORE `prepare_input` (the same
  function inference uses): black film borders and corner patches, smooth exposure gradients, gamma,
  contrast and brightness, CLAHE (an equalization variant), blur, sharpening, noise;
- geometry, batched on the device with affine_grid + grid_sample on image and mask together:
  rotation, scale, aspect change and shift (`augment_geometry`).

Loss: BCE + soft Dice on logits. AdamW, linear warm-up then cosine decay. The schedule runs over
`progress` in [0, 1]: elapsed time / budget with --minutes (so it ends exactly when the time is up),
else step / total steps. bf16 autocast and channels_last on CUDA, and on the CPU with `cpu_bf16`
(3x faster training on a CPU with AVX512-BF16, see TrainConfig).

Fine-tuning and weight averaging: `init_weights` starts from a saved model (its architecture and
input size win over the config's). `average` is stochastic weight averaging with a cyclical LR
(Izmailov et al. 2018), meant for fine-tuning a trained model: every epoch is one cosine cycle from
the peak LR down to 1 % of it, the weights at the end of each cycle are averaged, BatchNorm
statistics of the average are recomputed on augmented training images, and it is the average that is
evaluated and saved.

The loop (`train`) is plain PyTorch and does not import Ray; `ray_worker_loop` adapts it to Ray Train
(`jobs/train.py --backend ray`) and imports ray lazily.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.model import (
    DEFAULT_THRESHOLD,
    NORMALIZATION_EQUALIZE_U8,
    ModelMeta,
    load_model,
    model_checksum,
    prepare_input,
    save_model,
)
from pipeline.unet import UNetConfig, build_unet, count_parameters

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TRAIN, VAL = "train", "val"
SPLIT_NAMES = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL, "validation": VAL}
HASH_BUCKETS = 2**32  # the stable hash split compares sha256[:8] / HASH_BUCKETS with the val fraction
MODEL_NAME = "lung-unet"
CHECKPOINT_NAME = "last.pt"
DICE_EPS = 1.0  # px; smoothing of the soft Dice loss

# Patient id patterns, tried in order on the file stem; the first group is the patient key.
PATIENT_PATTERNS = (
    re.compile(r"^(\d{8})_\d{3}$"),  # NIH ChestX-ray14: 00000001_000
    re.compile(r"^((?:CHN|MCU)CXR_\d{4})_\d$"),  # Shenzhen / Montgomery: CHNCXR_0001_0
    re.compile(r"^(patient\d+)_study\d+"),  # CheXpert: patient00001_study1_view1_frontal
)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class PairSet:
    """Image/mask pairs. images: uint8 or uint16 (H, W); masks: bool (H, W), same shape; split: TRAIN/VAL."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    names: list[str]
    split: list[str]
    source: str  # description of where the pairs came from and how they were split

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == split]


def patient_key(stem: str) -> str:
    """The patient id parsed from a file stem (NIH, Shenzhen/Montgomery, CheXpert names), else the stem itself."""
    for pattern in PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def hash_split(stem: str, *, val_fraction: float) -> str:
    """VAL for a stable `val_fraction` of patients (sha256 of `patient_key(stem)`), else TRAIN."""
    digest = hashlib.sha256(patient_key(stem).encode()).hexdigest()
    return VAL if int(digest[:8], 16) / HASH_BUCKETS < val_fraction else TRAIN


def read_gray(path: Path) -> np.ndarray:
    """uint8 or uint16 (H, W) from an image file; colour is converted to gray."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"could not decode an image from {path}")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected an 8- or 16-bit image, got {img.dtype} from {path}")
    return img


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W): pixels above half the mask's maximum; must match the image `shape`."""
    m = read_gray(path)
    if m.shape != shape:
        raise ValueError(f"mask {path} has shape {m.shape}, its image has {shape}")
    top = int(m.max())
    return m > top / 2 if top > 0 else np.zeros(shape, bool)


def _split_name(value: str, where: str) -> str | None:
    """TRAIN / VAL, or None for splits this trainer does not use (e.g. Test)."""
    v = value.strip().lower()
    if v in SPLIT_NAMES:
        return SPLIT_NAMES[v]
    if v in ("test", "testing", "holdout"):
        return None
    raise ValueError(f"unknown split {value!r} in {where}; expected Train/Val/Test")


def _load_manifest(path: Path, *, limit: int | None) -> PairSet:
    images, masks, names, split = [], [], [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "mask", "split"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"manifest {path} lacks columns {sorted(missing)}; got {reader.fieldnames}")
        for row in reader:
            s = _split_name(row["split"], str(path))
            if s is None:
                continue
            img = read_gray(path.parent / row["image"])
            images.append(img)
            masks.append(read_mask(path.parent / row["mask"], img.shape))
            names.append(Path(row["image"]).stem)
            split.append(s)
            if limit and len(images) >= limit:
                break
    return PairSet(images, masks, names, split, source=f"manifest {path} (split from its split column)")


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def _load_folder(root: Path, *, val_fraction: float, limit: int | None) -> PairSet:
    if (root / "manifest.csv").is_file():
        return _load_manifest(root / "manifest.csv", limit=limit)
    img_files, mask_files = _files_by_stem(root / "images"), _files_by_stem(root / "masks")
    stems = sorted(set(img_files) & set(mask_files))
    if not stems:
        raise ValueError(f"expected images/ and masks/ with matching file stems under {root}, found none")
    unpaired = len(img_files) - len(stems)
    if unpaired:
        log.warning("%d images under %s have no mask and are skipped", unpaired, root)
    stems = stems[:limit] if limit else stems
    images = [read_gray(img_files[s]) for s in stems]
    masks = [read_mask(mask_files[s], img.shape) for s, img in zip(stems, images)]
    split = [hash_split(s, val_fraction=val_fraction) for s in stems]
    source = f"folder {root} (split: sha256 of patient key, val fraction {val_fraction})"
    return PairSet(images, masks, stems, split, source=source)


def load_packed(path: Path, *, limit: int | None = None) -> PairSet:
    """Pairs from a jobs/pack_pairs.py .npz: JPEG bytes or raw uint8 images, bit-packed masks."""
    with np.load(path, allow_pickle=False) as z:
        n = len(z["names"]) if not limit else min(limit, len(z["names"]))
        side = int(z["mask_width"])
        masks = np.unpackbits(z["masks_packed"][:n], axis=-1, count=side).astype(bool)
        if "jpeg_data" in z:
            data, offsets = z["jpeg_data"], z["jpeg_offsets"]
            images = [cv2.imdecode(data[offsets[i] : offsets[i + 1]], cv2.IMREAD_GRAYSCALE) for i in range(n)]
        else:
            images = list(z["images"][:n])
        names, split, source = [str(s) for s in z["names"][:n]], [str(s) for s in z["split"][:n]], str(z["source"])
    for name, img, m in zip(names, images, masks):
        if img is None or img.shape != m.shape:
            raise ValueError(f"{path}: image {name!r} could not be decoded or does not match its mask {m.shape}")
    return PairSet(images, list(masks), names, split, source=f"packed {path.name}: {source}")


def load_parquet(path: Path, *, val_fraction: float, limit: int | None = None) -> PairSet:
    """Pairs from Parquet (one file, or a folder of *.parquet): columns `image` and `mask` hold encoded
    images (PNG/JPEG bytes, any size; masks nonzero = lung); optional `name` (else the row number) and
    `split` (train/val; else the stable patient-key hash of the name)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"image", "mask"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: expected columns image and mask (encoded bytes), missing {sorted(missing)}")
    n = table.num_rows if not limit else min(limit, table.num_rows)
    table = table.slice(0, n)
    names = [str(v) for v in table.column("name").to_pylist()] if "name" in table.column_names else [str(i) for i in range(n)]
    images, masks = [], []
    for name, img_bytes, mask_bytes in zip(names, table.column("image").to_pylist(), table.column("mask").to_pylist()):
        img = cv2.imdecode(np.frombuffer(img_bytes or b"", np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
        mask = cv2.imdecode(np.frombuffer(mask_bytes or b"", np.uint8), cv2.IMREAD_GRAYSCALE)
        if img is None or mask is None or img.shape != mask.shape:
            raise ValueError(f"{path}: row {name!r}: image/mask missing, undecodable or of different shapes")
        images.append(img)
        masks.append(mask > 0)
    if "split" in table.column_names:
        split = [_split_name(str(v), f"{path} row {name!r}") for v, name in zip(table.column("split").to_pylist(), names)]
        how = "split column"
    else:
        split = [hash_split(name, val_fraction=val_fraction) for name in names]
        how = f"sha256 of patient key, val fraction {val_fraction}"
    return PairSet(images, masks, names, split, source=f"parquet {path} (split: {how})")


def load_pairs(source: str | Path, *, val_fraction: float = 0.2, limit: int | None = None) -> PairSet:
    """Pairs from a packed .npz, a manifest .csv, Parquet, or a folder with images/ + masks/ (see the module doc)."""
    path = Path(source)
    if path.suffix == ".npz":
        pairs = load_packed(path, limit=limit)
    elif path.suffix == ".csv":
        pairs = _load_manifest(path, limit=limit)
    elif path.suffix == ".parquet" or (path.is_dir() and not (path / "images").is_dir() and any(path.glob("*.parquet"))):
        pairs = load_parquet(path, val_fraction=val_fraction, limit=limit)
    elif path.is_dir():
        pairs = _load_folder(path, val_fraction=val_fraction, limit=limit)
    else:
        raise ValueError(f"expected a .npz, a manifest .csv, Parquet or a folder with images/ and masks/, got {path}")
    return pairs


# ---------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 10.0  # degrees, max absolute rotation
    scale: tuple[float, float] = (0.85, 1.15)  # zoom factor range
    aspect: float = 0.1  # max relative aspect change (x/y stretch), log-uniform
    shift: float = 0.08  # fraction of the side, max absolute shift in x and y
    p_border: float = 0.3  # probability of black film borders on 1-4 sides
    border_max: float = 0.08  # fraction of the side, max border width
    p_corner: float = 0.3  # probability of dark corner patches (JSRT-like)
    corner_max: float = 0.2  # fraction of the side, max corner patch radius
    p_gradient: float = 0.3  # probability of a smooth exposure gradient
    gradient_max: float = 0.4  # max relative brightness change across the image
    gamma: tuple[float, float] = (0.6, 1.6)  # gamma range, log-uniform
    contrast: tuple[float, float] = (0.3, 1.0)  # fraction of the full range kept
    p_clahe: float = 0.25  # probability of CLAHE before the normalization (an equalization variant)
    p_blur: float = 0.25  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # px at 256 px side, scaled with the image
    p_sharpen: float = 0.15  # probability of an unsharp mask (film scanners often sharpen)
    p_noise: float = 0.3  # probability of Gaussian noise
    noise_sigma: tuple[float, float] = (0.003, 0.03)  # fraction of the full range


def augment_intensity(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """uint8/uint16 (H, W) -> uint16 (H, W): source-side intensity augmentation, before `prepare_input`.

    Geometry is untouched, so the mask stays valid. Borders and corner patches are dark, as on film.
    """
    h, w = img.shape
    x = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 65535.0)
    side_scale = max(h, w) / 256.0
    if rng.random() < cfg.p_gradient:  # smooth exposure gradient (heel effect, uneven film)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (np.arange(w, dtype=np.float32) / w - 0.5))[None, :] + (
            np.sin(angle) * (np.arange(h, dtype=np.float32) / h - 0.5)
        )[:, None]
        x *= 1.0 + np.float32(rng.uniform(-cfg.gradient_max, cfg.gradient_max)) * ramp
    x = np.clip(x, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
    c = rng.uniform(*cfg.contrast)
    x = x * np.float32(c) + np.float32(rng.uniform(0.0, 1.0 - c))
    if rng.random() < cfg.p_clahe:  # on 8 bit: 16-bit CLAHE keeps 65536-bin histograms and is ~100x slower
        clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 3.0)), tileGridSize=(8, 8))
        x = clahe.apply(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)).astype(np.float32) / 255.0
    if rng.random() < cfg.p_blur:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*cfg.blur_sigma) * side_scale)
    elif rng.random() < cfg.p_sharpen:
        soft = cv2.GaussianBlur(x, (0, 0), rng.uniform(1.0, 2.0) * side_scale)
        x = x + np.float32(rng.uniform(0.3, 1.0)) * (x - soft)
    if rng.random() < cfg.p_noise:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(*cfg.noise_sigma))
    dark = rng.uniform(0.0, 0.05)
    if rng.random() < cfg.p_corner:
        for top, left in ((True, True), (True, False), (False, True), (False, False)):
            if rng.random() < 0.6:
                r = int(rng.uniform(0.05, cfg.corner_max) * max(h, w))
                rh, rw = min(r, h), min(r, w)
                yy = (np.arange(rh) if top else np.arange(rh)[::-1])[:, None]
                xx = (np.arange(rw) if left else np.arange(rw)[::-1])[None, :]
                rows = slice(0, rh) if top else slice(h - rh, h)
                cols = slice(0, rw) if left else slice(w - rw, w)
                x[rows, cols][yy * yy + xx * xx < r * r] = dark
    if rng.random() < cfg.p_border:
        for side in range(4):
            if rng.random() < 0.5:
                bw = int(rng.uniform(0.01, cfg.border_max) * (h if side < 2 else w))
                if side == 0:
                    x[:bw] = dark
                elif side == 1:
                    x[h - bw :] = dark
                elif side == 2:
                    x[:, :bw] = dark
                else:
                    x[:, w - bw :] = dark
    return np.rint(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)


def random_affines(n: int, *, cfg: AugmentConfig, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """float32 (n, 2, 3) affine_grid matrices (output -> input coords): rotation, scale, aspect, shift.

    The linear part is a rotation times a positive diagonal, so its determinant is > 0: never a mirror.
    """

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(u(-cfg.rotate_deg, cfg.rotate_deg))
    scale = u(*cfg.scale)
    aspect = torch.exp(u(-math.log1p(cfg.aspect), math.log1p(cfg.aspect)))
    sx, sy = 1.0 / (scale * aspect.sqrt()), 1.0 / (scale / aspect.sqrt())  # zoom in = sample a smaller area
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy, 2 * u(-cfg.shift, cfg.shift)], dim=1),
            torch.stack([sin * sx, cos * sy, 2 * u(-cfg.shift, cfg.shift)], dim=1),
        ],
        dim=1,
    )
    return theta.to(device)


def augment_geometry(
    images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float (N, 1, S, S) images in [0, 1] and {0, 1} masks -> the same warped by `theta` (N, 2, 3).

    Both go through ONE grid_sample (bilinear, zero padding = black border), so they stay aligned;
    the mask is re-binarised at 0.5.
    """
    both = torch.cat([images, masks.to(images.dtype)], dim=1)
    grid = F.affine_grid(theta.to(both.dtype), list(both.shape), align_corners=False)
    warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[:, :1], (warped[:, 1:] > 0.5).to(images.dtype)


class PairDataset(Dataset):
    """Item i -> (uint8 tensor (1, S, S) model input x255, uint8 tensor (1, S, S) mask {0, 1}).

    With `augment`, the source image goes through `augment_intensity` then `prepare_input`;
    without, straight through `prepare_input` (what inference does).
    """

    def __init__(self, images, masks, meta: ModelMeta, *, augment: AugmentConfig | None, seed: int = 0) -> None:
        size = meta.input_size
        self.images = images
        self.masks = [
            m if m.shape == (size, size) else cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5
            for m in masks
        ]
        self.meta, self.augment, self.seed = meta, augment, seed
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.images)

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():  # one stream per loader worker process
            info = torch.utils.data.get_worker_info()
            self._rng = np.random.default_rng([self.seed, info.seed if info else torch.initial_seed()])
            self._rng_pid = os.getpid()
        return self._rng

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.augment is not None:
            img = augment_intensity(img, self._generator(), self.augment)
        x = prepare_input(img, self.meta)
        return torch.from_numpy(x)[None], torch.from_numpy(self.masks[i].astype(np.uint8))[None]


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)


# ------------------------------------------------------------------------------------------- loss, eval


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice), Dice per image then averaged; computed in float32."""
    logits, masks = logits.float(), masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    p = torch.sigmoid(logits)
    inter = (p * masks).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3))
    dice = (2 * inter + DICE_EPS) / (denom + DICE_EPS)
    return bce + (1 - dice).mean()


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image for bool/0-1 tensors (N, ...); 1.0 where both are empty."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x_u8: torch.Tensor, masks: torch.Tensor, *, threshold: float,
             batch_size: int = 64, autocast: bool = False) -> float:
    """Mean hard Dice at the model resolution: x_u8 uint8 (N, 1, S, S), masks {0, 1} (N, 1, S, S).

    autocast: bf16 autocast and channels_last on the tensors' device (CUDA, or a CPU with `cpu_bf16`).
    """
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(x_u8), batch_size):
        x = _memory_format(x_u8[i : i + batch_size].float().div_(255), autocast or x_u8.is_cuda)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            prob = torch.sigmoid(model(x).float())
        scores.append(dice_scores(prob > threshold, masks[i : i + batch_size] > 0))
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


# ------------------------------------------------------------------------------------------ train loop


@dataclass(frozen=True)
class TrainConfig:
    data: str  # packed .npz, manifest .csv or images/+masks/ folder
    out: str  # path of the best weights file (save_model format)
    checkpoint_dir: str | None = None  # folder for last.pt (full training state); None = no checkpoints
    resume: bool = False  # continue from checkpoint_dir/last.pt if it exists
    minutes: float | None = None  # wall-clock budget in minutes; the LR schedule spans it; None = epoch count
    epochs: int = 30  # max epochs (the only limit without --minutes)
    batch_size: int = 32  # images per worker per step
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup: float = 0.03  # fraction of the schedule spent in linear warm-up
    input_size: int = 256  # px, model input side
    base_width: int = 16  # UNetConfig.base_width
    depth: int = 4  # UNetConfig.depth
    val_fraction: float = 0.2  # val share for folder sources without a split (stable hash)
    limit: int | None = None  # use only the first N pairs (tests, smoke runs)
    loader_workers: int = -1  # DataLoader worker processes; -1 = auto (cores - 2, at most 14)
    checkpoint_every: int = 1  # epochs between checkpoints
    compile: bool = False  # torch.compile the model (CUDA only)
    cpu_bf16: bool = False  # bf16 autocast + channels_last on CPU: 12 vs 4 img/s on a 2-core AVX512-BF16 EPYC
    init_weights: str | None = None  # start from this weights file (fine-tuning); its arch and input size are used
    average: bool = False  # stochastic weight averaging: one LR cycle per epoch, average of the cycle ends
    bn_images: int = 512  # augmented training images that re-estimate BatchNorm stats of the average
    seed: int = 0  # seed for init, shuffling and augmentation
    command: str = ""  # command line, recorded in the model meta


@dataclass
class Runtime:
    """Where the loop runs: rank/world size, device, and how to wrap the model and report metrics."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    report: Callable[[dict], None] = lambda metrics: None


def local_runtime() -> Runtime:
    return Runtime(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cycle_factor(fraction: float) -> float:
    """Multiplier of the peak LR at `fraction` in [0, 1) of one weight-averaging cycle: cosine from 1 to 1 %."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def lr_factor(progress: float, *, warmup: float) -> float:
    """Multiplier of the peak LR at schedule progress in [0, 1]: linear warm-up, then cosine to 1 %."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min((progress - warmup) / max(1.0 - warmup, 1e-9), 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says True (no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _prepared_val(pairs: PairSet, idx: list[int], meta: ModelMeta) -> tuple[torch.Tensor, torch.Tensor]:
    ds = PairDataset([pairs.images[i] for i in idx], [pairs.masks[i] for i in idx], meta, augment=None)
    if not len(ds):
        return torch.zeros(0, 1, meta.input_size, meta.input_size, dtype=torch.uint8), torch.zeros(0, 1, meta.input_size, meta.input_size)
    xs, ms = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ms)


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, x_u8: torch.Tensor, *, batch_size: int = 32,
                        autocast: bool = False) -> None:
    """Re-estimate BatchNorm running mean/var of `model` as the plain average over x_u8 uint8 (N, 1, S, S).

    Averaged weights need this: the running statistics of the models that were averaged do not
    describe the activations of their average.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(x_u8):
        return
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    device = next(model.parameters()).device
    for i in range(0, len(x_u8), batch_size):
        x = x_u8[i : i + batch_size].to(device).float().div_(255)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model(_memory_format(x, autocast))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def augmented_inputs(ds: PairDataset, *, n: int, augment: AugmentConfig, seed: int = 0) -> torch.Tensor:
    """uint8 (n', 1, S, S): n (at most len(ds)) evenly spaced items of `ds`, augmented as in training.

    These re-estimate BatchNorm statistics: they must come from the distribution the model was
    trained on. Measured on the shipped model (Val Dice at 256 px): 0.9734 as trained, 0.9728 with
    statistics from un-augmented training images, 0.9734 from augmented ones.
    """
    idx = list(range(0, len(ds), max(1, len(ds) // max(n, 1))))[:n]
    if not idx:
        return torch.zeros(0, 1, ds.meta.input_size, ds.meta.input_size, dtype=torch.uint8)
    xs, ms = zip(*(ds[i] for i in idx))  # intensity augmentation (with ds.augment), then geometry:
    theta = random_affines(len(idx), cfg=augment, generator=torch.Generator().manual_seed(seed))
    x, _ = augment_geometry(torch.stack(xs).float() / 255, torch.stack(ms).float(), theta)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _initial_meta(cfg: TrainConfig) -> tuple[ModelMeta, torch.nn.Module | None]:
    """The meta of the model to train, and the model to start from (None: random init)."""
    if cfg.init_weights:
        start, start_meta = load_model(cfg.init_weights)
        if start_meta.normalization != NORMALIZATION_EQUALIZE_U8:
            raise ValueError(f"{cfg.init_weights}: expected normalization {NORMALIZATION_EQUALIZE_U8!r}, "
                             f"got {start_meta.normalization!r}")
        log.info("fine-tuning %s (arch %s, input %d px)", cfg.init_weights, start_meta.arch, start_meta.input_size)
        arch, size = UNetConfig(**start_meta.arch), start_meta.input_size
        base = {k: v for k, v in start_meta.training.items() if k != "history"}
        training = {"fine_tuned_from": {"path": str(cfg.init_weights), "sha256": model_checksum(cfg.init_weights),
                                        "training": base, "metrics": start_meta.metrics}}
    else:
        start, arch, size = None, UNetConfig(base_width=cfg.base_width, depth=cfg.depth), cfg.input_size
        training = {}
    meta = ModelMeta(name=MODEL_NAME, input_size=size, normalization=NORMALIZATION_EQUALIZE_U8,
                     threshold=DEFAULT_THRESHOLD, arch=dataclasses.asdict(arch), training=training)
    return meta, start


def train(cfg: TrainConfig, runtime: Runtime | None = None, *, augment: AugmentConfig = AugmentConfig()) -> dict:
    """Train, keep the best-by-val-Dice weights at cfg.out (rank 0), return the final metrics dict."""
    rt = runtime or local_runtime()
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed + rt.rank)
    cuda = rt.device.type == "cuda"
    fast = cuda or cfg.cpu_bf16  # bf16 autocast + channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    pairs = load_pairs(cfg.data, val_fraction=cfg.val_fraction, limit=cfg.limit)
    train_idx, val_idx = pairs.indices(TRAIN), pairs.indices(VAL)
    if not train_idx:
        raise ValueError(f"no training pairs in {cfg.data} ({len(pairs.names)} pairs in all)")
    meta, start = _initial_meta(cfg)
    arch = UNetConfig(**meta.arch)
    train_ds = PairDataset([pairs.images[i] for i in train_idx], [pairs.masks[i] for i in train_idx], meta,
                           augment=augment, seed=cfg.seed + 1000 * rt.rank)
    val_x, val_m = _prepared_val(pairs, val_idx, meta)
    val_x, val_m = val_x.to(rt.device), val_m.to(rt.device)
    log.info("data: %s; %d train, %d val pairs; %.1f s to load", pairs.source, len(train_idx), len(val_idx),
             time.monotonic() - t_start)

    workers = cfg.loader_workers if cfg.loader_workers >= 0 else max(0, min(14, (os.cpu_count() or 1) - 2))
    sampler = None
    if rt.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=rt.world_size, rank=rt.rank,
                                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(train_ds) >= cfg.batch_size * rt.world_size, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, worker_init_fn=_worker_init,
                        prefetch_factor=4 if workers > 0 else None)
    steps_per_epoch = max(1, len(loader))

    model = build_unet(arch)
    if start is not None:
        model.load_state_dict(start.state_dict())
    model = model.to(rt.device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    averaged, bn_x = None, None
    if cfg.average:
        averaged = torch.optim.swa_utils.AveragedModel(model)
        bn_x = augmented_inputs(train_ds, n=cfg.bn_images, augment=augment, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log.info("model: UNet %s, %d parameters; device %s; world size %d; batch %d/worker; %d loader workers",
             arch, count_parameters(model), rt.device, rt.world_size, cfg.batch_size, workers)

    state = {"epoch": 0, "step": 0, "progress": 0.0, "best_dice": -1.0, "best_epoch": 0, "history": []}
    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME if cfg.checkpoint_dir else None
    if cfg.resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=rt.device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        if averaged is not None and "averaged" in ckpt:
            averaged.load_state_dict(ckpt["averaged"])
        log.info("resumed from %s at epoch %d (schedule progress %.3f, best val Dice %.4f)", ckpt_path,
                 state["epoch"], state["progress"], state["best_dice"])
    elif cfg.resume:
        log.warning("--resume: no checkpoint at %s, starting fresh", ckpt_path)

    train_model = rt.wrap_model(model)
    if cfg.compile and cuda:
        train_model = torch.compile(train_model)
    total_steps = cfg.epochs * steps_per_epoch
    budget_s = cfg.minutes * 60.0 if cfg.minutes else None
    progress0 = state["progress"]
    t_train = time.monotonic()

    def progress_now() -> float:
        if budget_s:  # the resumed run spends its budget on what is left of the schedule
            by_time = progress0 + (1 - progress0) * (time.monotonic() - t_start) / budget_s
            return max(by_time, state["step"] / total_steps)
        return state["step"] / total_steps

    stop = False
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"] + 1
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_model.train()
        t0, seen, loss_sum, loss_n = time.monotonic(), 0, torch.zeros((), device=rt.device), 0
        for step_in_epoch, (x_u8, m_u8) in enumerate(loader):
            x = x_u8.to(rt.device, non_blocking=True).float().div_(255)
            m = m_u8.to(rt.device, non_blocking=True).float()
            x, m = augment_geometry(x, m, random_affines(len(x), cfg=augment, device=rt.device))
            x = _memory_format(x, fast)
            progress = progress_now()
            if cfg.average:
                factor = cycle_factor((step_in_epoch + 1) / steps_per_epoch)
            else:
                factor = lr_factor(progress, warmup=cfg.warmup)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * factor
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=fast):
                logits = train_model(x)
            loss = dice_bce_loss(logits, m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            loss_n += 1
            seen += len(x)
            state["step"] += 1
            check = rt.world_size == 1 or state["step"] % 5 == 0  # a collective every step would slow DDP
            if budget_s and check and _all_agree(progress_now() >= 1.0, rt.device):
                stop = True
                break
        train_s = time.monotonic() - t0
        state["epoch"] = epoch
        state["progress"] = min(progress_now(), 1.0)
        scored = model
        if averaged is not None:
            averaged.update_parameters(model)
            scored = averaged.module
            recompute_batchnorm(scored, bn_x, autocast=fast)
        val_dice = evaluate(scored, val_x, val_m, threshold=meta.threshold, autocast=fast)
        metrics = {"epoch": epoch, "loss": float(loss_sum) / max(loss_n, 1), "val_dice": val_dice,
                   "images_per_s": seen * rt.world_size / max(train_s, 1e-9), "lr": optimizer.param_groups[0]["lr"],
                   "progress": state["progress"], "elapsed_s": time.monotonic() - t_start}
        state["history"].append({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
        log.info("epoch %3d  loss %.4f  val Dice %.4f  %7.1f img/s  lr %.2e  progress %.3f  %.0f s", epoch,
                 metrics["loss"], val_dice, metrics["images_per_s"], metrics["lr"], metrics["progress"],
                 metrics["elapsed_s"])
        improved = val_dice > state["best_dice"] or not val_idx
        if improved:
            state["best_dice"], state["best_epoch"] = val_dice, epoch
        if rt.rank == 0:
            if improved:
                save_model(cfg.out, scored, _final_meta(meta, cfg, pairs, train_idx, val_idx, state, rt))
            if ckpt_path is not None and (epoch % cfg.checkpoint_every == 0 or stop or epoch == cfg.epochs):
                _save_checkpoint(ckpt_path, model, optimizer, state, averaged)
        rt.report(metrics)
        if budget_s and not stop:
            stop = _all_agree(progress_now() >= 1.0, rt.device)

    if rt.rank == 0 and Path(cfg.out).is_file():  # refresh the meta's epoch count and history in the best file
        best, _ = load_model(cfg.out)
        save_model(cfg.out, best, _final_meta(meta, cfg, pairs, train_idx, val_idx, state, rt))
    log.info("done: %d epochs, %d steps in %.0f s; best val Dice %.4f at epoch %d -> %s", state["epoch"],
             state["step"], time.monotonic() - t_start, state["best_dice"], state["best_epoch"], cfg.out)
    return {"epochs": state["epoch"], "steps": state["step"], "best_val_dice": state["best_dice"],
            "best_epoch": state["best_epoch"], "train_s": time.monotonic() - t_train}


def _final_meta(meta: ModelMeta, cfg: TrainConfig, pairs: PairSet, train_idx, val_idx, state, rt: Runtime) -> ModelMeta:
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


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                     averaged: torch.nn.Module | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    if averaged is not None:
        payload["averaged"] = averaged.state_dict()
    torch.save(payload, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ Ray Train


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
