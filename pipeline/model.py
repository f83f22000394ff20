"""The lung model's weights file: format, saving, loading, and its identity (metadata + sha256).

A weights file is one `torch.save` dict that loads with `weights_only=True`:

    {"format": "xray-lung-prep/lung-unet", "version": 1,
     "state_dict": {name: tensor}  # floating tensors stored as fp16 to keep the file small
     "meta": ModelMeta as a plain dict}

A job reads the file once, in the driver (`read_weights`): the bytes, their sha256 and the metadata
travel together as `Weights`, and every segmenter loads the model from those bytes (`load_model`),
so a cluster needs the file on the driver's machine only and every actor runs the identical model.
What the model expects as input is in the torch-free `pipeline.model_input`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.model_input import NORMALIZATIONS, ModelMeta
from pipeline.unet import UNetConfig, build_unet

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "lung_unet.pt"
FILE_FORMAT = "xray-lung-prep/lung-unet"
FILE_VERSION = 1


@dataclass(frozen=True)
class Weights:
    """One weights file as read once: its bytes, their sha256, and the metadata it holds."""

    data: bytes = field(repr=False)  # the file's bytes, as torch.save wrote them
    sha256: str  # hex digest of `data`: the model's identity in every row and the manifest
    meta: ModelMeta | None  # the metadata stored in the file (None only while it is being checked)
    source: str  # where it was read from, for messages
    orientation: Weights | None = None  # the orientation classifier the job runs with this lung model

    def __repr__(self) -> str:
        return f"Weights({self.meta.name if self.meta else '?'}, sha256={self.sha256[:12]}..., from {self.source})"


def read_file(path: str | Path | None, *, default: Path, what: str) -> Weights:
    """A model file's bytes and sha256, unchecked (meta None); `default` when path is None.
    FileNotFoundError names `what` ("lung model") when the file is missing."""
    path = Path(path) if path is not None else default
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}")
    data = path.read_bytes()
    return Weights(data=data, sha256=hashlib.sha256(data).hexdigest(), meta=None, source=str(path))


def fp16_state(model: torch.nn.Module) -> dict:
    """The model's state dict on the CPU, floating tensors as fp16 (to keep files small)."""
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in model.state_dict().items()}


def write_payload(path: str | Path, payload: dict) -> None:
    """torch.save a model file's dict to `path`, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def check_payload(data: bytes, source: str, *, file_format: str, version: int, what: str) -> dict:
    """The checked dict inside a model file's bytes: loads with weights_only, of `file_format` and `version`.

    `what` names the kind of file in messages ("lung model"). Raises ValueError otherwise.
    """
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{source} is not a readable {what} file (torch.load: {type(e).__name__}: {first_line})") from e
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        article = "an" if what[:1] in "aeiou" else "a"
        raise ValueError(f"{source} is not {article} {what} file: expected format {file_format!r}, got {got!r}")
    if payload.get("version") != version:
        raise ValueError(f"{source}: expected file version {version}, got {payload.get('version')!r}")
    return payload


def save_model(path: str | Path, model: torch.nn.Module, meta: ModelMeta) -> None:
    """Write weights (floating tensors as fp16) and `meta` to `path`, atomically (temp file + rename)."""
    if meta.normalization not in NORMALIZATIONS:
        raise ValueError(f"expected normalization in {NORMALIZATIONS}, got {meta.normalization!r}")
    write_payload(path, {"format": FILE_FORMAT, "version": FILE_VERSION, "state_dict": fp16_state(model),
                         "meta": meta.to_dict()})


def _payload(data: bytes, source: str) -> dict:
    """The checked dict inside a lung model file's bytes."""
    return check_payload(data, source, file_format=FILE_FORMAT, version=FILE_VERSION, what="lung model")


def update_meta(path: str | Path, **fields) -> None:
    """Rewrite a weights file with some of its metadata fields replaced (e.g. quality=...); the tensors stay as stored."""
    path = Path(path)
    payload = _payload(path.read_bytes(), str(path))
    meta = ModelMeta.from_dict({**payload["meta"], **fields})
    payload["meta"] = meta.to_dict()
    write_payload(path, payload)


def read_weights(path: str | Path | None = None, *, orientation: str | Path | None = None) -> Weights:
    """Read a lung model file once (None -> DEFAULT_WEIGHTS), check that it loads into its architecture,
    and read the orientation classifier the job runs with it (`orientation`; None -> the packaged one).

    Raises FileNotFoundError if a file is missing, ValueError if it is not a valid model file.
    """
    from pipeline.orient_net import read_orientation_weights  # imports this module

    weights = read_file(path, default=DEFAULT_WEIGHTS, what="lung model")
    model, meta = load_model(weights)  # validates the architecture now, in the driver, not in every actor
    del model
    return dataclasses.replace(weights, meta=meta, orientation=read_orientation_weights(orientation))


def load_model(weights: Weights | str | Path | None = None, *, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, ModelMeta]:
    """The model from `Weights` or a file path (None -> DEFAULT_WEIGHTS): eval mode, fp32 parameters, on `device`.

    Raises FileNotFoundError if the file is missing, ValueError if it is not a valid lung model file.
    """
    if not isinstance(weights, Weights):
        weights = read_file(weights, default=DEFAULT_WEIGHTS, what="lung model")
    payload = _payload(weights.data, weights.source)
    meta = ModelMeta.from_dict(payload["meta"])
    try:
        model = build_unet(UNetConfig(**meta.arch))
        model.load_state_dict(payload["state_dict"])  # copy_ casts fp16 -> the fp32 parameters
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{weights.source}: weights do not match the architecture {meta.arch}: {e}") from e
    model.to(device).eval()
    return model, meta
