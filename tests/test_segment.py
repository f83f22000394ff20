"""The shipped model through the segmenter: batch contract, and a Dice floor on the real samples."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES

from pipeline.decode import decode_image
from pipeline.evaluate import dice, read_mask
from pipeline.model import DEFAULT_WEIGHTS, read_weights
from pipeline.model_input import prepare_input, probability_to_u8
from pipeline.refine import refine_mask
from pipeline.segment import Segmenter, cpu_has_native_bf16

# Floors for the shipped model on the bundled samples (source resolution, after refinement).
# Measured values are in docs/MODEL_CARD.md; the floors sit a little below them, so a broken or
# badly retrained model cannot land.
MEAN_DICE_FLOOR = 0.94
IMAGE_DICE_FLOOR = 0.90
BF16_AGREEMENT_FLOOR = 0.995  # Dice between the fp32 and the bf16 mask of the same image


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(device="cpu", cpu_threads=2, cpu_bf16=False)


@pytest.fixture(scope="module")
def segmenter_bf16():
    return Segmenter(device="cpu", cpu_threads=2, cpu_bf16=True)


def labelled_samples():
    for mask_path in sorted((SAMPLES / "masks").iterdir()):
        image_path = next(p for p in (SAMPLES / "xrays").iterdir() if p.stem == mask_path.stem)
        yield image_path, mask_path


def test_shipped_weights_are_in_the_package_and_small():
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 10 * 2**20
    meta = read_weights().meta
    assert meta.metrics and meta.training, "the shipped model must say how it was trained and measured"


def test_segmenter_batch_contract(segmenter):
    """{"model_input": uint8 (N, S, S)} -> orientation and turned (N,), lung_prob and lung_prob_flip uint8 (N, S, S)."""
    s = segmenter.size
    x = np.random.default_rng(0).integers(0, 256, (3, s, s), dtype=np.uint8)
    out = segmenter({"model_input": x})
    assert set(out) == {"orientation", "turned", "lung_prob", "lung_prob_flip"}
    assert out["lung_prob"].dtype == out["lung_prob_flip"].dtype == np.uint8
    assert out["lung_prob"].shape == out["lung_prob_flip"].shape == (3, s, s)
    assert out["orientation"].shape == out["turned"].shape == (3,) and not out["turned"].any()
    np.testing.assert_array_equal(out["lung_prob"], probability_to_u8(segmenter.predict(x)))
    np.testing.assert_array_equal(out["lung_prob_flip"], probability_to_u8(segmenter.predict(x[:, :, ::-1].copy()))[:, :, ::-1])
    one_view = Segmenter(device="cpu", cpu_threads=2, cpu_bf16=False, mirror_view=False)({"model_input": x})
    assert set(one_view) == {"orientation", "turned", "lung_prob"}
    np.testing.assert_array_equal(one_view["lung_prob"], out["lung_prob"])
    empty = segmenter({"model_input": x[:0]})
    assert empty["lung_prob"].shape == empty["lung_prob_flip"].shape == (0, s, s) and empty["orientation"].shape == (0,)
    with pytest.raises(ValueError, match="model_input uint8"):
        segmenter({"model_input": x[:, :10]})
    with pytest.raises(ValueError, match="model_input uint8"):
        segmenter({"model_input": x.astype(np.float32)})


def test_a_turned_image_is_segmented_upright_when_asked(segmenter):
    """With fix_orientation the model sees the input turned back: its probabilities are the upright image's."""
    from pipeline.orientation import transform

    pixels = decode_image((SAMPLES / "xrays" / "covidqu_normal_10235.jpg").read_bytes(), source="s").pixels
    upright = prepare_input(pixels, segmenter.meta)
    fixing = Segmenter(device="cpu", cpu_threads=2, cpu_bf16=False, fix_orientation=True)
    for k in (1, 2, 6):
        seen = transform(upright, k)[None]
        left, fixed = segmenter({"model_input": seen}), fixing({"model_input": seen})
        assert left["orientation"][0] == fixed["orientation"][0] == k
        assert not left["turned"][0] and fixed["turned"][0]
        np.testing.assert_array_equal(fixed["lung_prob"], segmenter({"model_input": upright[None]})["lung_prob"])


def _sample_masks(segmenter: Segmenter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (refined predicted mask, ground-truth mask) for the labelled samples."""
    out = {}
    for image_path, mask_path in labelled_samples():
        pixels = decode_image(image_path.read_bytes(), source=image_path.name).pixels
        prob = segmenter.predict(prepare_input(pixels, segmenter.meta)[None])[0]
        out[image_path.name] = refine_mask(prob, pixels.shape), read_mask(str(mask_path))
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shipped_model_finds_the_lungs_on_the_real_samples(precision, request):
    seg = request.getfixturevalue("segmenter" if precision == "fp32" else "segmenter_bf16")
    scores = {name: dice(pred, truth) for name, (pred, truth) in _sample_masks(seg).items()}
    assert len(scores) == 6
    assert min(scores.values()) >= IMAGE_DICE_FLOOR, scores
    assert np.mean(list(scores.values())) >= MEAN_DICE_FLOOR, scores


def test_bf16_on_cpu_gives_nearly_the_same_masks(segmenter, segmenter_bf16):
    assert segmenter_bf16.autocast and not segmenter.autocast
    fp32, bf16 = _sample_masks(segmenter), _sample_masks(segmenter_bf16)
    agreement = {name: dice(fp32[name][0], bf16[name][0]) for name in fp32}
    assert min(agreement.values()) >= BF16_AGREEMENT_FLOOR, agreement


def test_native_bf16_is_read_from_the_cpu_flags():
    epyc = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
    sapphire_rapids = "flags\t: avx512f amx_bf16 amx_tile\n"
    ice_lake = "flags\t: avx2 avx512f avx512bw avx512_vnni\n"
    assert cpu_has_native_bf16(epyc) and cpu_has_native_bf16(sapphire_rapids)
    assert not cpu_has_native_bf16(ice_lake)
    assert not cpu_has_native_bf16("Features\t: fp asimd bf16\n")  # no x86 flags line: fp32
    assert not cpu_has_native_bf16("")
