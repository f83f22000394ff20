"""The shipped lung model: weights file format, loading, and the input preparation shared by training and inference.

A weights file is one `torch.save` dict that loads with `weights_only=True`:

    {"format": "xray-lung-prep/lung-unet", "version": 1,
     "state_dict": {name: tensor}  # floating tensors stored as fp16 to keep the file small
     "meta": ModelMeta as a plain dict}

`prepare_input` is the one place that turns a decoded image into the model's input; training
(`pipeline/training.py`) calls the same function, so both sides see identical pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.unet import UNetConfig, build_unet

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "lung_unet.pt"
FILE_FORMAT = "xray-lung-prep/lung-unet"
FILE_VERSION = 1

NORMALIZATION_EQUALIZE_U8 = "equalize-u8"  # resize INTER_AREA -> min-max to 8 bit -> cv2.equalizeHist
NORMALIZATIONS = (NORMALIZATION_EQUALIZE_U8,)
DEFAULT_INPUT_SIZE = 256  # px, side of the square model input
DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is lung
U8_TO_U16 = 257  # 255 * 257 == 65535: maps uint8 onto the full uint16 range exactly
FLAT_RANGE = 0.5  # uint16 levels; an image whose resized range is below this is treated as constant


@dataclass(frozen=True)
class ModelMeta:
    name: str  # model name, e.g. "lung-unet"
    input_size: int  # px, side S of the square input (S, S)
    normalization: str  # how prepare_input maps pixels to the input, one of NORMALIZATIONS
    threshold: float  # probability in [0, 1] above which a pixel counts as lung
    arch: dict = field(default_factory=dict)  # UNetConfig fields
    training: dict = field(default_factory=dict)  # data, split, epochs, command, git commit, date
    metrics: dict = field(default_factory=dict)  # e.g. {"val_dice": 0.97}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"name", "input_size", "normalization", "threshold"} - set(d)
        if missing:
            raise ValueError(f"model meta lacks fields {sorted(missing)}; got keys {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def save_model(path: str | Path, model: torch.nn.Module, meta: ModelMeta) -> None:
    """Write weights (floating tensors as fp16) and `meta` to `path`, atomically (temp file + rename)."""
    if meta.normalization not in NORMALIZATIONS:
        raise ValueError(f"expected normalization in {NORMALIZATIONS}, got {meta.normalization!r}")
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).clone()
        for k, v in model.state_dict().items()
    }
    payload = {"format": FILE_FORMAT, "version": FILE_VERSION, "state_dict": state, "meta": meta.to_dict()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_payload(path: str | Path | None) -> tuple[Path, dict]:
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"lung model weights not found at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise ValueError(f"{path} is not a readable lung model file (torch.load failed: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a lung model file: expected format {FILE_FORMAT!r}, got {got!r}")
    if payload.get("version") != FILE_VERSION:
        raise ValueError(f"{path}: expected file version {FILE_VERSION}, got {payload.get('version')!r}")
    return path, payload


def load_model(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelMeta]:
    """Load a model saved by `save_model` (None -> DEFAULT_WEIGHTS): eval mode, fp32 parameters, on `device`.

    Raises FileNotFoundError if the file is missing, ValueError if it is not a valid lung model file.
    """
    path, payload = _read_payload(path)
    meta = ModelMeta.from_dict(payload["meta"])
    try:
        model = build_unet(UNetConfig(**meta.arch))
        model.load_state_dict(payload["state_dict"])  # copy_ casts fp16 -> the fp32 parameters
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not match the architecture {meta.arch}: {e}") from e
    model.to(device).eval()
    return model, meta


def read_model_meta(path: str | Path | None = None) -> ModelMeta:
    """The ModelMeta stored in a weights file (None -> DEFAULT_WEIGHTS)."""
    _, payload = _read_payload(path)
    return ModelMeta.from_dict(payload["meta"])


def model_checksum(path: str | Path | None = None) -> str:
    """sha256 hex digest of the weights file's bytes (None -> DEFAULT_WEIGHTS)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"lung model weights not found at {path}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_input(pixels: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """uint16 (H, W) 0..65535 or uint8 (H, W) 0..255 -> uint8 (S, S), S = meta.input_size; the model input x255.

    "equalize-u8": uint8 is first spread onto uint16 (x257) so both dtypes take the same path and identical
    content gives identical output; resize to S x S with INTER_AREA in float32; min-max stretch to 0..255
    and round; cv2.equalizeHist. Global equalization is invariant to monotonic intensity changes, so
    digital radiographs and low-contrast digitised film land on the same input distribution.
    A constant image gives all zeros.
    """
    if meta.normalization != NORMALIZATION_EQUALIZE_U8:
        raise ValueError(f"expected normalization {NORMALIZATION_EQUALIZE_U8!r}, got {meta.normalization!r}")
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16) or min(pixels.shape) < 1:
        raise ValueError(f"expected a 2-D uint8 or uint16 grayscale image, got {pixels.dtype} shape {pixels.shape}")
    x = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        x *= U8_TO_U16
    size = int(meta.input_size)
    if x.shape != (size, size):
        x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < FLAT_RANGE:  # constant image, up to float resize noise
        return np.zeros((size, size), np.uint8)
    u8 = np.rint((x - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    return cv2.equalizeHist(u8)
