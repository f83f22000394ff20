"""quality_score, the QC decisions of a row, and the deliberate damage used to fit and measure the score."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES

from pipeline.decode import decode_image
from pipeline.degrade import KINDS, degrade
from pipeline.evaluate import dice, read_mask, spearman
from pipeline.model import read_weights
from pipeline.model_input import prepare_input
from pipeline.qc import FLAGS, row_qc
from pipeline.quality import (
    FEATURES,
    MIRROR_VIEW,
    ONE_VIEW,
    QC_LOW_QUALITY,
    VIEWS,
    QualityModel,
    quality_features,
    quality_model,
    quality_score,
)
from pipeline.refine import MaskStats, RefineConfig, refine
from pipeline.segment import Segmenter

S = 32


def two_lungs(s: int = S, value: int = 255) -> np.ndarray:
    """uint8 (s, s): two upright rectangles of `value`, left one wider, on 0."""
    p = np.zeros((s, s), np.uint8)
    p[4:28, 3:14] = value
    p[4:28, 19:28] = value
    return p


def stats_of(mask: np.ndarray) -> MaskStats:
    return refine(mask, mask.shape, RefineConfig(threshold=0.5, close_frac=0.0, min_area_frac=0.0))[1]


# --- features ------------------------------------------------------------------------------------


def test_features_of_a_sure_symmetric_answer():
    prob = two_lungs()
    f = dict(zip(FEATURES, quality_features(prob, prob, stats_of(prob), 0.5)))
    assert f["flip_dice"] == 1.0
    assert f["border_share"] == 0.0  # only 0 and 255: nothing uncertain
    assert f["confidence"] == 1.0
    assert f["lung_fraction"] == pytest.approx((24 * 11 + 24 * 9) / S**2)
    assert f["balance"] == pytest.approx(9 / 11)  # the smaller lung over the larger
    assert f["solidity"] == pytest.approx(1.0, abs=0.02)  # rectangles are convex (hull of pixel centres)
    assert f["two_lungs"] == 1.0


def test_features_of_a_doubtful_answer():
    prob = two_lungs(value=160)  # p = 0.63: lung, but unsure
    flip = np.zeros_like(prob)
    flip[4:28, 3:14] = 160  # the mirrored view found only one lung
    one = np.zeros_like(prob)
    one[4:28, 3:14] = 255
    f = dict(zip(FEATURES, quality_features(prob, flip, stats_of(one), 0.5)))
    assert f["flip_dice"] == pytest.approx(2 * 24 * 11 / (24 * 11 + 24 * 20))
    assert f["border_share"] == 1.0  # every lung pixel is uncertain
    assert f["confidence"] == pytest.approx(160 / 255)
    assert f["balance"] == 0.0 and f["two_lungs"] == 0.0


def test_features_refuse_maps_of_different_shapes():
    with pytest.raises(ValueError, match="one \\(S, S\\) shape"):
        quality_features(two_lungs(), two_lungs()[:16], stats_of(two_lungs()), 0.5)


# --- the score -----------------------------------------------------------------------------------


def toy_model(threshold: float = 0.9) -> QualityModel:
    """A score that rises only with flip agreement."""
    weights = np.zeros(len(FEATURES))
    weights[0] = -1.0  # feature 0 is log(1 - flip_dice): lower is better
    return QualityModel(mean=(0.0,) * len(FEATURES), scale=(1.0,) * len(FEATURES), weights=tuple(weights),
                        bias=0.0, threshold=threshold, fitted={})


def test_score_rises_with_agreement_and_round_trips_through_the_metadata():
    model = toy_model()
    base = quality_features(two_lungs(), two_lungs(), stats_of(two_lungs()), 0.5)
    worse = base.copy()
    worse[0] = 0.7
    assert quality_score(base, model) > quality_score(worse, model)
    assert 0.0 <= quality_score(worse, model) <= 1.0
    both = quality_score(np.stack([base, worse]), model)
    assert both.shape == (2,) and both[0] == pytest.approx(quality_score(base, model))
    assert QualityModel.from_dict(model.to_dict()) == model


def test_constants_for_other_features_are_refused():
    d = toy_model().to_dict()
    d["features"] = ["flip_dice", "heart_size"]
    with pytest.raises(ValueError, match="features"):
        QualityModel.from_dict(d)
    with pytest.raises(ValueError, match="constants per feature"):
        QualityModel(mean=(0.0,), scale=(1.0,), weights=(1.0,), bias=0.0, threshold=0.5, fitted={})
    with pytest.raises(ValueError, match="in that order"):
        QualityModel(mean=(0.0,) * 2, scale=(1.0,) * 2, weights=(1.0,) * 2, bias=0.0, threshold=0.5, fitted={},
                     features=("confidence", "flip_dice"))


def test_a_one_view_score_does_without_the_mirror_image():
    """Without the mirrored view flip_dice is NaN, and constants fitted without it score all the same."""
    f = quality_features(two_lungs(), None, stats_of(two_lungs()), 0.5)
    assert np.isnan(f[0]) and not np.isnan(f[1:]).any()
    used = VIEWS[ONE_VIEW]
    one = QualityModel(mean=(0.0,) * len(used), scale=(1.0,) * len(used), weights=(0.0, -1.0, 0, 0, 0, 0),
                       bias=0.0, threshold=0.5, fitted={}, features=used)
    assert 0.0 <= quality_score(f, one) <= 1.0
    assert np.isnan(quality_score(f, toy_model()))  # constants that need the mirror image cannot score it
    meta_quality = {MIRROR_VIEW: toy_model().to_dict(), ONE_VIEW: one.to_dict()}
    assert quality_model(meta_quality, mirror_view=False) == one
    assert quality_model(meta_quality, mirror_view=True) == toy_model()
    assert quality_model({}, mirror_view=True) is None


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# --- the row's QC --------------------------------------------------------------------------------

GOOD = MaskStats(0.3, 2, (1, 1, 9, 9), 0.16, 0.14)


@pytest.mark.parametrize(("kwargs", "flags", "passes"), [
    ({}, [], True),
    ({"quality_score": 0.97, "quality_threshold": 0.9}, [], True),
    ({"quality_score": 0.80, "quality_threshold": 0.9}, [QC_LOW_QUALITY], False),
    ({"quality_score": 0.80, "quality_threshold": None}, [], True),
    ({"orientation_flags": ("mirrored", "rotated_90")}, ["rotated_90", "mirrored"], False),
    ({"orientation_flags": ("rotated_180",), "orientation_fixed": True}, ["rotated_180"], True),
    ({"view_position": "LL"}, ["not_frontal"], False),
    ({"view_position": "PA"}, [], True),
    ({"view_position": "LLD"}, [], True),  # decubitus: a frontal projection of a patient lying on the side
    ({"notes": ("polarity_corrected", "rgb_to_gray")}, ["polarity_corrected"], True),
    ({"notes": ("burned_in_annotation",)}, ["burned_in_annotation"], False),
])
def test_row_qc(kwargs, flags, passes):
    assert row_qc(GOOD, RefineConfig(), **kwargs) == (flags, passes)


def test_row_qc_lists_flags_in_the_documented_order():
    flags, passes = row_qc(MaskStats(0.05, 1, (1, 1, 2, 2), 0.05, 0.0), RefineConfig(), notes=("polarity_corrected",),
                           view_position="RL", quality_score=0.2, quality_threshold=0.9, orientation_flags=("mirrored",))
    assert flags == ["one_lung", "small_lung_area", QC_LOW_QUALITY, "mirrored", "not_frontal", "polarity_corrected"]
    assert flags == [f for f in FLAGS if f in flags] and not passes


# --- damage --------------------------------------------------------------------------------------


def test_degrade_moves_the_mask_with_the_image_and_leaves_it_for_intensity_damage():
    img = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50)
    mask = np.zeros((40, 30), np.uint8)
    mask[10:30, 5:25] = 255
    inv, same = degrade(img, mask, "invert", 0.0)
    np.testing.assert_array_equal(inv, 65535 - img)
    assert same is mask
    crop_img, crop_mask = degrade(img, mask, "crop", 1.0, rng=np.random.default_rng(3))
    assert crop_img.shape == crop_mask.shape == (18, 14)  # 45% of each side
    y0, x0 = divmod(int(crop_img[0, 0]) // 50, 30)
    np.testing.assert_array_equal(crop_mask, mask[y0:y0 + 18, x0:x0 + 14])
    moved_img, moved_mask = degrade(img, mask, "shift", 0.5, rng=np.random.default_rng(1))
    assert (moved_img == 0).any() and moved_mask.sum() < mask.sum()
    for kind in KINDS:
        a = degrade(img, mask, kind, 0.7, rng=np.random.default_rng(5))
        b = degrade(img, mask, kind, 0.7, rng=np.random.default_rng(5))
        np.testing.assert_array_equal(a[0], b[0])
        assert a[0].dtype == img.dtype
    with pytest.raises(ValueError, match="kind"):
        degrade(img, mask, "melt", 0.5)
    with pytest.raises(ValueError, match="strength"):
        degrade(img, mask, "blur", 1.5)


# --- the shipped constants on real images --------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["mirror view", "one view"])
def shipped(request):
    weights = read_weights()
    model = quality_model(weights.meta.quality, mirror_view=request.param)
    if model is None:
        pytest.fail("the shipped lung model carries no quality constants (scripts/fit_quality.py --write)")
    return Segmenter(weights, device="cpu", cpu_threads=2, mirror_view=request.param), model


def labelled_samples():
    for mask_path in sorted((SAMPLES / "masks").iterdir()):
        image_path = next(p for p in (SAMPLES / "xrays").iterdir() if p.stem == mask_path.stem)
        yield image_path, mask_path


def scored(seg: Segmenter, model: QualityModel, cases: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float]]:
    """(quality_score, true Dice) per (pixels, truth) case, through the job's steps."""
    cfg = RefineConfig(threshold=seg.meta.threshold)
    out = seg({"model_input": np.stack([prepare_input(p, seg.meta) for p, _ in cases])})
    flips = out.get("lung_prob_flip", [None] * len(cases))
    result = []
    for (pixels, truth), prob, flip in zip(cases, out["lung_prob"], flips):
        mask, stats = refine(prob, pixels.shape, cfg)
        result.append((quality_score(quality_features(prob, flip, stats, cfg.threshold), model), dice(mask, truth)))
    return result


def test_the_shipped_score_trusts_good_masks_and_flags_ruined_ones(shipped):
    seg, model = shipped
    clean, ruined = [], []
    for image_path, mask_path in labelled_samples():
        pixels = decode_image(image_path.read_bytes(), source=image_path.name).pixels
        truth = read_mask(str(mask_path))
        clean.append((pixels, truth))
        for kind, strength in (("noise", 1.0), ("shift", 1.0), ("crop", 1.0)):
            ruined.append(degrade(pixels, truth, kind, strength, rng=np.random.default_rng(len(ruined))))
    good = scored(seg, model, clean)
    assert all(d >= 0.93 for _, d in good), good  # the samples are segmented well...
    assert all(q >= model.threshold for q, _ in good), good  # ...and none is flagged
    bad = [(q, d) for q, d in scored(seg, model, ruined) if d < 0.90]
    assert len(bad) >= 6, "the damage did not ruin enough masks to test anything"
    assert np.mean([q < model.threshold for q, _ in bad]) >= 0.8, bad
    assert np.mean([q for q, _ in good]) > np.mean([q for q, _ in bad])


def test_a_worker_without_the_mirror_view_still_scores_every_image(shipped):
    """process_chunk with a one-view segmenter and the one-view constants, as --no-mirror-view runs it."""
    from pipeline.process import ProcessConfig, process_chunk
    from pipeline.schema import result_schema

    seg, model = shipped
    cfg = ProcessConfig(variants=("masked",), model=seg.meta, model_sha256="x",
                        refine=RefineConfig(threshold=seg.meta.threshold), quality=model)
    sources = [{"source_path": p.name, "location": str(p).encode()} for p, _ in labelled_samples()]
    rows = process_chunk(sources, seg, cfg, result_schema(cfg.variants))
    assert all(r["error_stage"] is None for r in rows), rows
    assert all(model.threshold <= r["quality_score"] <= 1.0 and r["qc_pass"] for r in rows)
