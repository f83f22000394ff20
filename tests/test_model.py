"""UNET shape and size, weights file round trip, and prepare_input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import DEFAULT_WEIGHTS, load_model, read_weights, save_model
from pipeline.model_input import NORMALIZATION_EQUALIZE_U8, ModelMeta, prepare_input
from pipeline.unet import UNetConfig, build_unet, count_parameters

SMALL = UNetConfig(base_width=4, depth=2)


def _meta(cfg: UNetConfig = SMALL, size: int = 64) -> ModelMeta:
    return ModelMeta(
        name="lung-unet-test",
        input_size=size,
        normalization=NORMALIZATION_EQUALIZE_U8,
        threshold=0.5,
        arch=cfg.__dict__.copy(),
        training={"data": "synthetic", "epochs": 0},
        metrics={"val_dice": 0.5},
    )


def _phantom(size: int = 64) -> np.ndarray:
    """uint8 (size, size): a dim body with two bright-edged dark lungs, plus a gradient."""
    y, x = np.mgrid[0:size, 0:size]
    img = 60 + (x * 100 // size)
    img[(((x - size * 0.3) / (size * 0.15)) ** 2 + ((y - size * 0.5) / (size * 0.3)) ** 2) < 1] = 20
    img[(((x - size * 0.7) / (size * 0.15)) ** 2 + ((y - size * 0.5) / (size * 0.3)) ** 2) < 1] = 25
    return img.astype(np.uint8)


def test_unet_shape_and_default_size():
    model = build_unet(UNetConfig())
    n = count_parameters(model)
    assert 1_500_000 < n < 2_500_000
    assert n * 2 < 10 * 2**20  # fp16 weights under 10 MB
    model.eval()
    with torch.inference_mode():
        y = model(torch.rand(2, 1, 64, 64))
    assert y.shape == (2, 1, 64, 64) and y.dtype == torch.float32


def test_unet_rejects_bad_side():
    model = build_unet(SMALL).eval()
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.rand(1, 1, 30, 30))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_unet(SMALL)
    model.train()
    model(torch.rand(4, 1, 32, 32))  # move BatchNorm running stats away from their init
    model.eval()
    path = tmp_path / "m.pt"
    meta = _meta()
    save_model(path, model, meta)

    loaded, meta2 = load_model(path)
    assert meta2 == meta
    assert read_weights(path).meta == meta
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=5e-2)

    payload = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())


def test_weights_are_read_once_with_their_identity(tmp_path):
    """read_weights: the file's bytes, their sha256 and its meta; a model loads from them with no file."""
    import hashlib

    model = build_unet(SMALL).eval()
    save_model(tmp_path / "a.pt", model, _meta())
    weights = read_weights(tmp_path / "a.pt")
    assert weights.sha256 == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert weights.meta == _meta() and weights.sha256 == read_weights(tmp_path / "a.pt").sha256
    (tmp_path / "a.pt").unlink()
    loaded, meta = load_model(weights)
    assert meta == _meta()
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=5e-2)
    assert "sha256=" in repr(weights) and len(repr(weights)) < 200  # the bytes are not printed


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable lung model file"):
        load_model(bad)
    truncated = tmp_path / "truncated.pt"
    save_model(truncated, build_unet(SMALL), _meta())
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError):
        load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="expected format"):
        read_weights(foreign)


def test_prepare_input_uint8_and_uint16_identical():
    meta = _meta(size=32)
    u8 = _phantom(64)
    u16 = u8.astype(np.uint16) * 257
    a, b = prepare_input(u8, meta), prepare_input(u16, meta)
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    np.testing.assert_array_equal(a, b)
    assert a.min() == 0 and a.max() == 255


def test_prepare_input_invariant_to_monotonic_change():
    meta = _meta(size=64)
    u8 = _phantom(64)
    low_contrast = (u8.astype(np.float64) / 255) ** 1.7 * 30000 + 10000  # gamma + compressed range, uint16
    np.testing.assert_array_equal(prepare_input(u8, meta), prepare_input(low_contrast.astype(np.uint16), meta))


def test_prepare_input_edge_cases():
    meta = _meta(size=32)
    np.testing.assert_array_equal(prepare_input(np.full((40, 50), 7, np.uint16), meta), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        prepare_input(np.zeros((8, 8, 3), np.uint8), meta)
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        prepare_input(np.zeros((8, 8), np.float32), meta)


def test_shipped_weights_load_and_segment_phantom():
    model, meta = load_model()
    assert DEFAULT_WEIGHTS.stat().st_size < 10 * 2**20
    x = torch.from_numpy(prepare_input(_phantom(256), meta)).float()[None, None] / 255
    with torch.inference_mode():
        prob = torch.sigmoid(model(x))
    assert prob.shape == (1, 1, meta.input_size, meta.input_size)
    assert 0.0 <= float(prob.min()) and float(prob.max()) <= 1.0


def _eval_script():
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "eval_lung_model.py"
    spec = importlib.util.spec_from_file_location("eval_lung_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_script_averages_models_and_scales():
    """scripts/eval_lung_model.py --model A B --scales ...: the mean of every model's probability at every side."""
    predict = _eval_script().predict
    torch.manual_seed(0)
    a, b = (build_unet(UNetConfig(base_width=4, depth=2)).eval() for _ in range(2))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        p_a, pb = torch.sigmoid(a(x))[:, 0].numpy(), torch.sigmoid(b(x))[:, 0].numpy()
        a48 = torch.sigmoid(torch.nn.functional.interpolate(
            a(torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)),
            size=(32, 32), mode="bilinear", align_corners=False))[:, 0].numpy()
    np.testing.assert_allclose(predict([a], x, scales=[32], bf16=False), p_a, atol=1e-6)
    np.testing.assert_allclose(predict([a, b], x, scales=[32], bf16=False), (p_a + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(predict([a], x, scales=[32, 48], bf16=False), (p_a + a48) / 2, atol=1e-6)
    assert not np.allclose(p_a, pb, atol=1e-3)  # the two models differ, so the average is informative
