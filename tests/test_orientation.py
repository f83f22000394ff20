"""The orientation transforms, flags and decision rule (exact values), and the shipped classifier on the
bundled sample X-rays (samples/xrays: 4 COVID-QU-Ex, 1 JSRT, 1 Shenzhen; provenance in samples/PROVENANCE.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.orient_net import (
    DEFAULT_ORIENTATION_WEIGHTS,
    OrientationClassifier,
    OrientationMeta,
    OrientationNet,
    read_orientation_weights,
    save_orientation_model,
)
from pipeline.orientation import (
    N_ORIENTATIONS,
    ORIENTATION_FLAGS,
    QC_MIRRORED,
    QC_ROTATED_90,
    QC_ROTATED_180,
    QC_ROTATED_270,
    decide,
    flags,
    transform,
    undo,
)
from tests.conftest import SAMPLES

SAMPLE_XRAYS = ("covidqu_covid_1905.jpg", "covidqu_covid_1907.jpg", "covidqu_noncovid_11118.jpg",
                "covidqu_normal_10235.jpg", "jsrt_JPCLN013.png", "shenzhen_CHNCXR_0611_1.png")


def test_transform_exact_values_and_round_trip():
    a = np.arange(6).reshape(2, 3)  # [[0 1 2] [3 4 5]]
    assert transform(a, 0).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert transform(a, 1).tolist() == [[2, 5], [1, 4], [0, 3]]  # one counter-clockwise turn
    assert transform(a, 2).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert transform(a, 3).tolist() == [[3, 0], [4, 1], [5, 2]]  # one clockwise turn
    assert transform(a, 4).tolist() == [[2, 1, 0], [5, 4, 3]]  # mirrored left-right
    assert transform(a, 5).tolist() == [[0, 3], [1, 4], [2, 5]]  # mirrored, then counter-clockwise
    x = np.random.default_rng(0).integers(0, 65535, (5, 7), dtype=np.uint16)
    seen = set()
    for k in range(N_ORIENTATIONS):
        t = transform(x, k)
        assert t.flags.c_contiguous and t.dtype == x.dtype
        assert t.shape == ((5, 7) if k % 2 == 0 else (7, 5))
        back = undo(t, k)
        assert back.flags.c_contiguous and np.array_equal(back, x)
        seen.add(t.tobytes() + bytes(t.shape))
    assert len(seen) == N_ORIENTATIONS  # the 8 elements are distinct
    with pytest.raises(ValueError, match="orientation k"):
        transform(x, 8)
    with pytest.raises(ValueError, match="2-D"):
        undo(np.zeros((2, 2, 3)), 1)


def test_flags_of_all_orientations():
    assert [flags(k) for k in range(N_ORIENTATIONS)] == [
        (), (QC_ROTATED_270,), (QC_ROTATED_180,), (QC_ROTATED_90,),
        (QC_MIRRORED,), (QC_ROTATED_270, QC_MIRRORED), (QC_ROTATED_180, QC_MIRRORED), (QC_ROTATED_90, QC_MIRRORED),
    ]
    assert ORIENTATION_FLAGS == ("rotated_90", "rotated_180", "rotated_270", "mirrored")
    # "rotated_90" is a clockwise quarter turn: the top row of the upright image becomes its right column
    a = np.arange(6).reshape(2, 3)
    assert transform(a, 3)[:, -1].tolist() == a[0].tolist()


def test_decide_on_hand_made_probabilities():
    probs = np.array([
        [0.90, 0.02, 0.01, 0.01, 0.03, 0.01, 0.01, 0.01],  # upright, confident
        [0.30, 0.05, 0.05, 0.05, 0.40, 0.05, 0.05, 0.05],  # argmax mirrored, but P(upright) above the threshold
        [0.10, 0.05, 0.05, 0.60, 0.05, 0.05, 0.05, 0.05],  # rotated_90
        [0.05, 0.10, 0.10, 0.10, 0.10, 0.10, 0.15, 0.30],  # rotated_90 + mirrored
    ], np.float32)
    assert decide(probs, threshold=0.2).tolist() == [0, 0, 3, 7]
    assert decide(probs, threshold=0.5).tolist() == [0, 4, 3, 7]
    assert decide(probs, threshold=0.0).tolist() == [0, 0, 0, 0]  # never reports a turn
    assert decide(np.zeros((0, 8), np.float32), threshold=0.5).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        decide(np.zeros((3, 4)), threshold=0.5)


def test_save_read_round_trip_and_bad_files(tmp_path):
    meta = OrientationMeta(name="tiny", input_size=64, net_size=32, threshold=0.3, widths=(4, 4, 4, 4, 4))
    torch.manual_seed(0)
    path = tmp_path / "o.pt"
    save_orientation_model(path, OrientationNet(meta.widths), meta)
    weights = read_orientation_weights(path)
    assert weights.meta == meta and len(weights.sha256) == 64
    probs = OrientationClassifier(weights, device="cpu")(np.zeros((3, 64, 64), np.uint8))
    assert probs.shape == (3, 8) and probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        OrientationClassifier(weights, device="cpu")(np.zeros((1, 32, 32), np.uint8))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(DEFAULT_ORIENTATION_WEIGHTS.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable orientation model file"):
        read_orientation_weights(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "xray-lung-prep/lung-unet", "version": 1, "state_dict": {}, "meta": {}}, foreign)
    with pytest.raises(ValueError, match="not an orientation model file"):
        read_orientation_weights(foreign)
    with pytest.raises(FileNotFoundError):
        read_orientation_weights(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def sample_inputs() -> dict[str, np.ndarray]:
    """name -> uint8 (8, 256, 256): the lung model's input of each sample in each orientation."""
    from pipeline.decode import decode_image
    from pipeline.model import read_weights
    from pipeline.model_input import prepare_input

    lung_meta = read_weights().meta
    out = {}
    for name in SAMPLE_XRAYS:
        path = SAMPLES / "xrays" / name
        pixels = decode_image(path.read_bytes(), source=str(path)).pixels
        out[name] = np.stack([prepare_input(transform(pixels, k), lung_meta) for k in range(N_ORIENTATIONS)])
    return out


def test_shipped_classifier_on_sample_xrays(sample_inputs):
    torch.set_num_threads(1)
    weights = read_orientation_weights()
    assert weights.meta.input_size == 256 and 0 < weights.meta.threshold < 1
    assert DEFAULT_ORIENTATION_WEIGHTS.stat().st_size < 1_000_000
    classifier = OrientationClassifier(weights, device="cpu")
    found = {}
    for name, inputs in sample_inputs.items():
        found[name] = decide(classifier(inputs), threshold=weights.meta.threshold).tolist()
    assert found == {name: list(range(N_ORIENTATIONS)) for name in SAMPLE_XRAYS}
