"""The lung segmenter: a callable class that Ray Data runs as an actor pool.

The model is loaded and the device chosen once per actor, in `__init__`. On a GPU the batch
runs under bf16 autocast. On a CPU it runs in bf16 too (autocast, channels_last) where the CPU
has native bf16 arithmetic (AVX512-BF16 or AMX), else in float32: `cpu_bf16=None` decides per
actor, on the node it runs on. Measured with the shipped model on this project's 2-core EPYC
(AVX512-BF16): 24 vs 84 ms per image, and mean Dice on COVID-QU-Ex Val, JSRT and Shenzhen equal to
fp32 to 4 decimals (benchmarks/bench_segment.py, scripts/eval_lung_model.py --cpu-bf16).
The same class serves both, with no code change.

Contract: ``__call__({"model_input": uint8 (N, S, S)}) -> {"orientation", "turned", "lung_prob",
"lung_prob_flip"}`` (see `Segmenter.__call__`): the orientation check (`pipeline.orient_net`), then the
lung probability times 255 (`pipeline.model_input.probability_to_u8`) of the image and of its mirrored
view (for `pipeline.quality`): 64 KB in and 128 KB out per image at 256 px, whatever the source's size. The wiring runs it inside the CPU workers, or as a GPU actor
pool that the CPU workers call (`pipeline.dataset`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.model import Weights, load_model
from pipeline.model_input import probability_to_u8
from pipeline.orient_net import OrientationClassifier
from pipeline.orientation import UPRIGHT, decide, undo

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 matrix arithmetic
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True if the CPU's flags (Linux /proc/cpuinfo, or the given text) include native bf16 arithmetic.

    False where it cannot tell (no /proc/cpuinfo): without native support bf16 is emulated and
    can be slower than float32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(flag in value.split() for flag in NATIVE_BF16_CPU_FLAGS)
    return False


class Segmenter:
    """uint8 (N, S, S) model inputs -> lung probabilities (see the module docstring)."""

    def __init__(self, weights: Weights | str | None = None, *, device: str | None = None,
                 cpu_threads: int | None = None, cpu_bf16: bool | None = None,
                 orientation: Weights | str | None = None, fix_orientation: bool = False, mirror_view: bool = True):
        self.device = pick_device(device)
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model, self.meta = load_model(weights, device=str(self.device))
        self.size = self.meta.input_size
        if orientation is None and isinstance(weights, Weights):
            orientation = weights.orientation
        self.orientation = OrientationClassifier(orientation, device=self.device)
        if self.orientation.meta.input_size != self.size:
            raise ValueError(f"the orientation model expects {self.orientation.meta.input_size} px inputs, "
                             f"the lung model {self.size} px")
        self.fix_orientation = fix_orientation
        self.mirror_view = mirror_view
        if cpu_bf16 is None:
            cpu_bf16 = cpu_has_native_bf16()
        self.channels_last = cpu_bf16 and self.device.type == "cpu"
        self.autocast = self.device.type == "cuda" or self.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        log.info("segmenter %s on %s%s", self.meta.name, self.device, " (bf16)" if self.autocast else "")

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) -> float32 (N, S, S) probabilities."""
        x = torch.from_numpy(np.require(inputs, requirements=("C", "W"))).to(self.device)
        x = x.unsqueeze(1).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
        return torch.sigmoid(logits.float())[:, 0].cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"model_input": uint8 (N, S, S)} -> {"orientation", "turned": (N,), "lung_prob", "lung_prob_flip": (N, S, S)}.

        orientation: uint8, how each image arrived (`pipeline.orientation`; 0 = upright); turned: bool, the
        input was turned upright before segmenting (fix_orientation and orientation != 0), so the
        probabilities are in the upright frame; lung_prob: uint8 round(p * 255); lung_prob_flip: the same
        for the input mirrored left-right, mirrored back, the second view `pipeline.quality` compares with
        the first (left out with mirror_view=False). Both views run in one model call.
        """
        inputs = batch["model_input"]
        if inputs.ndim != 3 or inputs.dtype != np.uint8 or inputs.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected model_input uint8 (N, {self.size}, {self.size}), got {inputs.dtype} {inputs.shape}")
        n = len(inputs)
        orientation = decide(self.orientation(inputs), threshold=self.orientation.meta.threshold).astype(np.uint8)
        turned = (orientation != UPRIGHT) & self.fix_orientation
        if turned.any():
            inputs = np.stack([undo(x, k) if t else x for x, k, t in zip(inputs, orientation, turned)])
        views = [inputs, inputs[:, :, ::-1]] if self.mirror_view else [inputs]
        if n == 0:
            probs = np.zeros((0, self.size, self.size), np.uint8)
        else:
            probs = probability_to_u8(self.predict(np.concatenate(views)))
        out = {"orientation": orientation, "turned": turned, "lung_prob": probs[:n]}
        if self.mirror_view:
            out["lung_prob_flip"] = np.ascontiguousarray(probs[n:, :, ::-1])
        return out
