"""The segmenter on a CUDA device (bf16 autocast) agrees with the CPU (float32). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES

from pipeline.decode import decode_image
from pipeline.evaluate import iou
from pipeline.model_input import prepare_input
from pipeline.segment import Segmenter

pytestmark = pytest.mark.gpu

MAX_MEAN_ABS_DIFF = 0.01  # mean |p_gpu - p_cpu| over all pixels
MIN_MASK_IOU = 0.98  # thresholded masks, GPU vs CPU


def test_gpu_segmenter_matches_cpu_on_the_samples():
    cpu, gpu = Segmenter(device="cpu"), Segmenter(device="cuda")
    assert gpu.autocast and gpu.device.type == "cuda"
    images = [p for p in sorted((SAMPLES / "xrays").iterdir()) if p.suffix in (".png", ".jpg")]
    x = np.stack([prepare_input(decode_image(p.read_bytes(), source=p.name).pixels, cpu.meta) for p in images])
    p_cpu, p_gpu = cpu.predict(x), gpu.predict(x)
    assert p_gpu.dtype == np.float32 and p_gpu.shape == p_cpu.shape
    assert np.abs(p_gpu - p_cpu).mean() < MAX_MEAN_ABS_DIFF
    for a, b in zip(p_cpu, p_gpu):
        assert iou(a > cpu.meta.threshold, b > gpu.meta.threshold) > MIN_MASK_IOU


def test_the_whole_gpu_segmenter_call_matches_cpu_on_the_samples():
    """What the job's GPU pool runs: the orientation check and both views, on the GPU, as on the CPU."""
    cpu, gpu = Segmenter(device="cpu"), Segmenter(device="cuda")
    assert gpu.orientation.device.type == "cuda"
    images = [p for p in sorted((SAMPLES / "xrays").iterdir()) if p.suffix in (".png", ".jpg")]
    x = np.stack([prepare_input(decode_image(p.read_bytes(), source=p.name).pixels, cpu.meta) for p in images])
    a, b = cpu({"model_input": x}), gpu({"model_input": x})
    np.testing.assert_array_equal(a["orientation"], b["orientation"])
    for key in ("lung_prob", "lung_prob_flip"):
        assert np.abs(a[key].astype(np.int16) - b[key]).mean() < MAX_MEAN_ABS_DIFF * 255, key
