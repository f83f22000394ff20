"""Image/mask pairs for training, and the torch Dataset that turns them into model inputs.

Sources (`load_pairs`):
- a packed `.npz` written by `jobs/pack_pairs.py` (train/val split stored in it);
- a manifest CSV with columns image, mask, split (paths relative to the CSV; split Train/Val, any case);
- Parquet (a file or a folder of *.parquet) with encoded `image` and `mask` bytes columns (`load_parquet`);
- a folder with images/ and masks/ whose files pair by stem (any of IMAGE_EXTENSIONS); a manifest.csv in
  the folder is used if present, otherwise the split is a stable hash of the *patient* key (see
  `patient_key`), so all images of one patient land on the same side and the split never changes between runs.

Image files and Parquet bytes go through the job's decoder, `pipeline.decode.decode_image`: DICOM, PNG
(8 or 16 bit), JPEG and TIFF are recognised by content and read exactly as the job reads them. It is
imported on first use, so a packed .npz (JPEG blobs, read with OpenCV) trains where pydicom is not installed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.model_input import ModelMeta, prepare_input
from pipeline.training.augment import AugmentConfig, augment_intensity

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")  # paired in images/ + masks/
TRAIN, VAL = "train", "val"
SPLIT_NAMES = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL, "validation": VAL}
HASH_BUCKETS = 2**32  # the stable hash split compares sha256[:8] / HASH_BUCKETS with the val fraction

# Patient id patterns, tried in order on the file stem; the first group is the patient key.
PATIENT_PATTERNS = (
    re.compile(r"^(\d{8})_\d{3}$"),  # NIH ChestX-ray14: 00000001_000
    re.compile(r"^((?:CHN|MCU)CXR_\d{4})_\d$"),  # Shenzhen / Montgomery: CHNCXR_0001_0
    re.compile(r"^(patient\d+)_study\d+"),  # CheXpert: patient00001_study1_view1_frontal
)


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


def decode_gray(data: bytes, *, source: str) -> np.ndarray:
    """uint8 or uint16 (H, W) from an encoded image (DICOM, PNG, JPEG, TIFF), read as the job reads it.

    `pipeline.decode.decode_image` does the work: format by content, DICOM LUTs and MONOCHROME1, colour
    to gray. Raises DecodeError (a ValueError) naming `source` for anything the job would refuse.
    """
    # Imported here, not above: only decoding files needs pydicom (a packed .npz trains without it).
    from pipeline.decode import decode_image

    return decode_image(data, source=source).pixels


def read_gray(path: Path) -> np.ndarray:
    """uint8 or uint16 (H, W) from an image file (see `decode_gray`)."""
    return decode_gray(path.read_bytes(), source=str(path))


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
        raise ValueError(f"expected images/ and masks/ with matching file stems ({', '.join(IMAGE_EXTENSIONS)}) "
                         f"under {root}, found none")
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
    """Pairs from a jobs/pack_pairs.py .npz: JPEG bytes or raw uint8 images, bit-packed masks.

    The JPEG blobs are 8-bit gray, written by OpenCV: OpenCV reads them, without the job's decoder.
    """
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
    images (DICOM/PNG/JPEG/TIFF bytes, any size; masks nonzero = lung); optional `name` (else the row
    number) and `split` (train/val; else the stable patient-key hash of the name)."""
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
        img = decode_gray(img_bytes or b"", source=f"{path} row {name!r} image")
        mask = decode_gray(mask_bytes or b"", source=f"{path} row {name!r} mask")
        if img.shape != mask.shape:
            raise ValueError(f"{path}: row {name!r}: image {img.shape} and mask {mask.shape} differ in shape")
        images.append(img)
        masks.append(mask > 0)
    if "split" in table.column_names:
        split = [_split_name(str(v), f"{path} row {name!r}") for v, name in zip(table.column("split").to_pylist(), names)]
        how = "split column"
    else:
        split = [hash_split(name, val_fraction=val_fraction) for name in names]
        how = f"sha256 of patient key, val fraction {val_fraction}"
    return PairSet(images, masks, names, split, source=f"parquet {path} (split: {how})")


def sampling_weights(names: list[str], oversample: dict[str, float]) -> list[float]:
    """Per name, the factor of the first regular expression in `oversample` that it matches (case-insensitive,
    `re.search`), else 1: how often a weighted sampler draws it, relative to the others.

    COVID-QU-Ex names tell the class: "covid_12", "Non_COVID (28)", "Normal (10233)", so
    {"^covid_": 2, "^non_covid": 2} draws the two diseased classes twice as often as Normal.
    """
    patterns = [(re.compile(p, re.IGNORECASE), float(f)) for p, f in oversample.items()]
    for pattern, factor in patterns:
        if not factor > 0:
            raise ValueError(f"expected a positive oversampling factor, got {factor} for {pattern.pattern!r}")
    return [next((f for pattern, f in patterns if pattern.search(name)), 1.0) for name in names]


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


def prepared_pairs(pairs: PairSet, idx: list[int], meta: ModelMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs at `idx`, un-augmented: uint8 (N, 1, S, S) inputs x255 and uint8 (N, 1, S, S) masks {0, 1}."""
    ds = PairDataset([pairs.images[i] for i in idx], [pairs.masks[i] for i in idx], meta, augment=None)
    if not len(ds):
        empty = torch.zeros(0, 1, meta.input_size, meta.input_size, dtype=torch.uint8)
        return empty, empty.clone()
    xs, ms = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ms)


def worker_init(_: int) -> None:
    """DataLoader worker_init_fn: one OpenCV thread per loader process (they already run in parallel)."""
    cv2.setNumThreads(1)
