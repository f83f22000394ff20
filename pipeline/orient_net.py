"""The orientation classifier: a small CNN that tells which of the 8 orientations (`pipeline.orientation`)
turned an upright chest film into the image seen, and its weights file.

Its input is exactly the lung model's input, `pipeline.model_input.prepare_input` of the image seen:
uint8 (N, 256, 256). The net averages it down to `net_size` px (4x4 blocks, the same as cv2 INTER_AREA
at an integer factor) and runs 5 conv blocks (3x3 conv, BatchNorm, ReLU; the first conv has stride 2,
blocks 2-4 end in a 2x2 max pool: 64 -> 32 -> 16 -> 8 -> 4 px), global average pooling and a linear
layer to 8 logits.

A weights file is one `torch.save` dict that loads with `weights_only=True`, like the lung model's
(`pipeline.model`):

    {"format": "xray-lung-prep/orientation", "version": 1,
     "state_dict": {name: tensor}  # floating tensors stored as fp16
     "meta": OrientationMeta as a plain dict}

`read_orientation_weights` reads it once (bytes, sha256, meta: a `pipeline.model.Weights`, whose
`meta` here is an `OrientationMeta`); `OrientationClassifier` loads the net from those bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import Weights, check_payload, fp16_state, read_file, write_payload
from pipeline.model_input import known_fields
from pipeline.orientation import N_ORIENTATIONS

log = logging.getLogger(__name__)

DEFAULT_ORIENTATION_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "orientation.pt"
FILE_FORMAT = "xray-lung-prep/orientation"
FILE_VERSION = 1
DEFAULT_WIDTHS = (16, 24, 32, 48, 64)  # output channels of the conv blocks
U8_MAX = 255.0  # uint8 input -> [0, 1]


@dataclass(frozen=True)
class OrientationMeta:
    name: str  # model name, e.g. "orientation-cnn"
    input_size: int  # px, side of the square uint8 input the caller passes (the lung model's input, 256)
    net_size: int  # px, side the net averages its input down to; divides input_size
    threshold: float  # P(upright) below which `pipeline.orientation.decide` reports a turn
    widths: tuple[int, ...] = DEFAULT_WIDTHS  # output channels of the conv blocks
    training: dict = field(default_factory=dict)  # data, command, seed, epochs, minutes, date
    metrics: dict = field(default_factory=dict)  # e.g. {"val_accuracy": 0.99, "val_false_alarm_rate": 0.002}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OrientationMeta:
        kept = known_fields(cls, d, required=("name", "input_size", "net_size", "threshold"), what="orientation meta")
        if "widths" in kept:
            kept["widths"] = tuple(int(w) for w in kept["widths"])
        meta = cls(**kept)
        if meta.input_size % meta.net_size:
            raise ValueError(f"orientation meta: net_size {meta.net_size} must divide input_size {meta.input_size}")
        return meta


class OrientationNet(nn.Module):
    """float (N, 1, net_size, net_size) in [0, 1] -> float (N, 8) logits."""

    def __init__(self, widths: tuple[int, ...] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(widths):
            stride = 2 if i == 0 else 1  # a strided stem: the first block is the costliest at full resolution
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            if 0 < i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, N_ORIENTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def downsample(model_input: torch.Tensor | np.ndarray, net_size: int) -> torch.Tensor:
    """uint8 (N, S, S) prepared inputs -> float32 (N, 1, net_size, net_size) in [0, 1], averaged over
    (S / net_size)^2 blocks (what cv2.resize INTER_AREA does at an integer factor)."""
    x = torch.as_tensor(model_input)
    if x.ndim != 3 or x.dtype != torch.uint8 or x.shape[1] != x.shape[2] or x.shape[1] % net_size:
        raise ValueError(f"expected uint8 (N, S, S) with S a multiple of {net_size}, got {x.dtype} {tuple(x.shape)}")
    x = x[:, None].float() / U8_MAX
    factor = x.shape[-1] // net_size
    return F.avg_pool2d(x, factor) if factor > 1 else x


def save_orientation_model(path: str | Path, model: nn.Module, meta: OrientationMeta) -> None:
    """Write weights (floating tensors as fp16) and `meta` to `path`, atomically (temp file + rename)."""
    write_payload(path, {"format": FILE_FORMAT, "version": FILE_VERSION, "state_dict": fp16_state(model),
                         "meta": meta.to_dict()})


def _payload(data: bytes, source: str) -> dict:
    """The checked dict inside an orientation weights file's bytes."""
    return check_payload(data, source, file_format=FILE_FORMAT, version=FILE_VERSION, what="orientation model")


def load_orientation_model(weights: Weights | str | Path | None = None, *, device: str | torch.device = "cpu"
                           ) -> tuple[OrientationNet, OrientationMeta]:
    """The net from `Weights` or a file path (None -> DEFAULT_ORIENTATION_WEIGHTS): eval mode, fp32, on `device`.

    Raises FileNotFoundError if the file is missing, ValueError if it is not a valid orientation model file.
    """
    if not isinstance(weights, Weights):
        weights = read_orientation_weights(weights)
    payload = _payload(weights.data, weights.source)
    meta = OrientationMeta.from_dict(payload["meta"])
    try:
        model = OrientationNet(meta.widths)
        model.load_state_dict(payload["state_dict"])  # copy_ casts fp16 -> the fp32 parameters
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{weights.source}: weights do not match the architecture widths={meta.widths}: {e}") from e
    model.to(device).eval()
    return model, meta


def read_orientation_weights(path: str | Path | None = None) -> Weights:
    """Read an orientation weights file once (None -> DEFAULT_ORIENTATION_WEIGHTS) and check that it loads.

    Returns a `pipeline.model.Weights` whose `meta` is an `OrientationMeta`.
    Raises FileNotFoundError if the file is missing, ValueError if it is not a valid orientation model file.
    """
    weights = read_file(path, default=DEFAULT_ORIENTATION_WEIGHTS, what="orientation model")
    _, meta = load_orientation_model(weights)  # validates the architecture now, in the driver
    return dataclasses.replace(weights, meta=meta)


class OrientationClassifier:
    """Callable: uint8 (N, S, S) lung-model inputs (S = meta.input_size) -> float32 (N, 8) softmax
    probabilities of the orientations 0..7 (`pipeline.orientation`); feed them to `decide` with
    `self.meta.threshold`.

    The weights are loaded and the device chosen once, here (None: CUDA when available, else CPU).
    """

    def __init__(self, weights: Weights | str | Path | None = None, *, device: str | torch.device | None = None) -> None:
        if not isinstance(weights, Weights):
            weights = read_orientation_weights(weights)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_orientation_model(weights, device=self.device)
        self.sha256 = weights.sha256
        log.info("orientation classifier %s (sha256 %s...) on %s", self.meta.name, self.sha256[:12], self.device)

    def __call__(self, model_input: np.ndarray) -> np.ndarray:
        size = self.meta.input_size
        if model_input.ndim != 3 or model_input.dtype != np.uint8 or model_input.shape[1:] != (size, size):
            raise ValueError(f"expected uint8 (N, {size}, {size}) lung-model inputs, "
                             f"got {model_input.dtype} {model_input.shape}")
        if not len(model_input):
            return np.zeros((0, N_ORIENTATIONS), np.float32)
        with torch.inference_mode():
            x = downsample(torch.from_numpy(np.require(model_input, requirements=("C", "W"))), self.meta.net_size).to(self.device)
            return torch.softmax(self.model(x).float(), dim=1).cpu().numpy().astype(np.float32)
