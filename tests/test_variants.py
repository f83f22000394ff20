"""Image variants: exact values on tiny arrays for every step, then every region x contrast."""

from __future__ import annotations

from itertools import product

import cv2
import numpy as np
import pytest

from pipeline.variants import (
    DEFAULT_VARIANTS,
    VARIANT_CONTRASTS,
    VARIANT_REGIONS,
    VariantConfig,
    VariantSpec,
    apply_mask,
    clahe,
    crop_box,
    equalize,
    make_variant,
    make_variants,
    pad_to_square,
    parse_variant,
    resize_output,
)

SIDE = 64  # px, phantom side
LUNG_BOXES = ((slice(8, 56), slice(6, 28)), (slice(8, 56), slice(36, 58)))  # (rows, cols) of the two lungs
LUNG_BBOX = (6, 8, 58, 56)  # (x0, y0, x1, y1) of both lungs
CROP_BOX = (3, 6, 61, 58)  # LUNG_BBOX + 5%: 52 px wide -> 3 px, 48 px high -> 2 px


@pytest.fixture
def img16() -> np.ndarray:
    """uint16 (64, 64), every pixel a different value, none 0."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    return (1000 + 900 * x + 10 * y).astype(np.uint16)


@pytest.fixture
def mask() -> np.ndarray:
    m = np.zeros((SIDE, SIDE), np.uint8)
    for rows, cols in LUNG_BOXES:
        m[rows, cols] = 255
    return m


ALL_NAMES = [VariantSpec(r, c).name for r, c in product(VARIANT_REGIONS, VARIANT_CONTRASTS)]


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "region", "contrast"),
    [
        ("full", "full", ""),
        ("masked_eq", "masked", "eq"),
        ("crop_clahe", "crop", "clahe"),
        ("masked_crop", "masked_crop", ""),
        ("masked_crop_eq", "masked_crop", "eq"),
    ],
)
def test_parse_variant(name, region, contrast):
    spec = parse_variant(name)
    assert (spec.region, spec.contrast) == (region, contrast)
    assert spec.name == name


def test_all_twelve_names_round_trip():
    assert len(set(ALL_NAMES)) == 12
    for name in ALL_NAMES:
        assert parse_variant(name).name == name


def test_default_variants_are_the_seeds_four():
    assert DEFAULT_VARIANTS == ("masked", "masked_eq", "masked_crop", "masked_crop_eq")
    for name in DEFAULT_VARIANTS:
        parse_variant(name)


@pytest.mark.parametrize("name", ["masked_eqq", "crop_masked", "", "eq", "masked_", "MASKED", None])
def test_parse_variant_unknown_lists_choices(name):
    with pytest.raises(ValueError, match="masked_crop_eq") as e:
        parse_variant(name)
    assert repr(name) in str(e.value)


def test_variant_spec_validates():
    with pytest.raises(ValueError, match="region"):
        VariantSpec("lungs", "")
    with pytest.raises(ValueError, match="contrast"):
        VariantSpec("full", "gamma")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"resize_mode": "fit"},
        {"bit_depth": 12},
        {"crop_margin_frac": -0.1},
        {"clahe_clip": 0.0},
        {"clahe_tiles": 0},
    ],
)
def test_variant_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        VariantConfig(**kwargs)


# --- mask and crop ------------------------------------------------------------------------------


def test_apply_mask_exact():
    img = np.array([[1, 2, 3], [4, 5, 6]], np.uint16)
    m = np.array([[0, 255, 0], [255, 255, 0]], np.uint8)
    out = apply_mask(img, m)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 2, 0], [4, 5, 0]])


def test_apply_mask_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        apply_mask(np.zeros((3, 3), np.uint8), np.zeros((3, 4), np.uint8))


def test_crop_box_margin_per_axis():
    # 20 wide -> 1 px, 40 high -> 2 px
    assert crop_box((10, 20, 30, 60), (100, 100), margin_frac=0.05) == (9, 18, 31, 62)
    assert crop_box((10, 20, 30, 60), (100, 100), margin_frac=0.0) == (10, 20, 30, 60)
    assert crop_box(LUNG_BBOX, (SIDE, SIDE), margin_frac=0.05) == CROP_BOX


def test_crop_box_rounds_half_up():
    assert crop_box((10, 10, 20, 20), (50, 50), margin_frac=0.05) == (9, 9, 21, 21)  # 0.5 px -> 1
    assert crop_box((10, 10, 20, 20), (50, 50), margin_frac=0.04) == (10, 10, 20, 20)  # 0.4 px -> 0


def test_crop_box_clipped_at_borders():
    assert crop_box((0, 2, 10, 12), (12, 11), margin_frac=0.5) == (0, 0, 11, 12)


@pytest.mark.parametrize("bbox", [(5, 5, 5, 8), (0, 0, 13, 5), (-1, 0, 4, 4)])
def test_crop_box_rejects_bad_box(bbox):
    with pytest.raises(ValueError, match="box"):
        crop_box(bbox, (12, 12), margin_frac=0.1)


# --- equalization -------------------------------------------------------------------------------


def test_equalize_uint8_exact():
    img = np.array([[10, 10], [20, 30]], np.uint8)
    out = equalize(img)
    assert out.dtype == np.uint8
    # CDF 2, 3, 4 of 4; min -> 0, (3-2)/(4-2) * 255 = 127.5 -> 128, max -> 255
    np.testing.assert_array_equal(out, [[0, 0], [128, 255]])


def test_equalize_uint16_exact():
    img = np.array([[1000, 2000], [3000, 4000]], np.uint16)
    out = equalize(img)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 21845], [43690, 65535]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_equalize_monotonic_and_full_range(dtype):
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    img = (rng.beta(2, 5, (40, 40)) * top * 0.3 + top * 0.2).astype(dtype)  # squeezed into 20-50%
    out = equalize(img)
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(np.int64)) >= 0)
    assert out.min() == 0 and out.max() == top
    # Roughly uniform: the median lands near the middle of the range.
    assert abs(float(np.median(out)) / top - 0.5) < 0.05


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_equalize_roi_ignores_background(dtype, mask):
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(2)
    img = (rng.random((SIDE, SIDE)) * top * 0.2 + top * 0.4).astype(dtype)  # lungs at 40-60%
    img[mask == 0] = int(top * 0.9)  # bright non-lung pixels (soft tissue, labels)
    out = equalize(img, roi=mask)
    assert np.all(out[mask == 0] == 0)
    inside = out[mask > 0]
    assert inside.min() == 0 and inside.max() == top
    order = np.argsort(img[mask > 0], kind="stable")
    assert np.all(np.diff(inside[order].astype(np.int64)) >= 0)
    # Without the roi the non-lung half of the frame takes the top of the range.
    no_roi = equalize(img)
    assert no_roi[mask > 0].max() < 0.6 * top


def test_equalize_constant_and_empty_roi():
    img = np.full((4, 4), 77, np.uint8)
    np.testing.assert_array_equal(equalize(img), img)
    roi = np.zeros((4, 4), np.uint8)
    np.testing.assert_array_equal(equalize(img, roi=roi), np.zeros((4, 4), np.uint8))
    roi[1:3, 1:3] = 255
    np.testing.assert_array_equal(equalize(img, roi=roi), apply_mask(img, roi))


def test_equalize_rejects_float():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        equalize(np.zeros((4, 4), np.float32))


# --- CLAHE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_clahe_matches_opencv_and_raises_contrast(dtype):
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    img = (top * (0.45 + 0.1 * (x + y) / (2 * SIDE))).astype(dtype)  # a faint ramp
    out = clahe(img, clip=4.0, tiles=4)
    assert out.dtype == dtype and out.shape == img.shape
    np.testing.assert_array_equal(out, cv2.createCLAHE(clipLimit=4.0, tileGridSize=(4, 4)).apply(img))
    assert np.ptp(out.astype(np.int64)) > 1.5 * np.ptp(img.astype(np.int64))


def test_clahe_parameters_matter():
    rng = np.random.default_rng(3)
    img = (rng.normal(128, 10, (SIDE, SIDE))).clip(0, 255).astype(np.uint8)
    assert not np.array_equal(clahe(img, clip=1.0, tiles=8), clahe(img, clip=8.0, tiles=8))
    assert not np.array_equal(clahe(img, clip=2.0, tiles=2), clahe(img, clip=2.0, tiles=8))


def test_clahe_roi_zeroes_outside(img16, mask):
    out = clahe(img16, clip=2.0, tiles=8, roi=mask)
    assert np.all(out[mask == 0] == 0)
    assert np.all(out[mask > 0] > 0)


# --- geometry -----------------------------------------------------------------------------------


def test_pad_to_square_exact():
    img = np.full((2, 5), 7, np.uint8)
    out = pad_to_square(img)
    assert out.shape == (5, 5)
    np.testing.assert_array_equal(out[:, 0], [0, 7, 7, 0, 0])  # 1 above, 2 below
    np.testing.assert_array_equal(pad_to_square(np.full((3, 1), 7, np.uint8))[1], [0, 7, 0])


def test_letterbox_wide_exact():
    img = np.full((10, 20), 100, np.uint8)
    out = resize_output(img, VariantConfig(size=8, resize_mode="letterbox"))
    assert out.shape == (8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 3], [0, 0, 100, 100, 100, 100, 0, 0])  # 8x4, 2 + 2 px pad
    np.testing.assert_array_equal(out[4], [100] * 8)


def test_letterbox_odd_remainder_goes_bottom_right():
    img = np.full((10, 30), 100, np.uint16)
    out = resize_output(img, VariantConfig(size=8))  # 8 x round(2.67) = 3 rows; pad 2 above, 3 below
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[:, 0], [0, 0, 100, 100, 100, 0, 0, 0])
    tall = resize_output(img.T.copy(), VariantConfig(size=8))
    np.testing.assert_array_equal(tall[0], [0, 0, 100, 100, 100, 0, 0, 0])


def test_letterbox_enlarges():
    img = np.full((4, 2), 9, np.uint8)
    out = resize_output(img, VariantConfig(size=8))
    np.testing.assert_array_equal(out[0], [0, 0, 9, 9, 9, 9, 0, 0])


def test_letterbox_extreme_aspect_keeps_one_px():
    out = resize_output(np.full((1, 100), 5, np.uint8), VariantConfig(size=10))
    np.testing.assert_array_equal(out[:, 0], [0, 0, 0, 0, 5, 0, 0, 0, 0, 0])


def test_square_resize_stretches():
    img = np.full((10, 20), 100, np.uint8)
    out = resize_output(img, VariantConfig(size=8, resize_mode="square"))
    np.testing.assert_array_equal(out, np.full((8, 8), 100, np.uint8))


def test_resize_none_keeps_image():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(resize_output(img, VariantConfig(size=None)), img)


# --- make_variant(s) ----------------------------------------------------------------------------


def test_bit_depth_8_is_high_byte(img16, mask):
    out8 = make_variant(img16, mask, parse_variant("full"), VariantConfig(bit_depth=8))
    out16 = make_variant(img16, mask, parse_variant("full"), VariantConfig(bit_depth=16))
    assert out8.dtype == np.uint8 and out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, img16)
    np.testing.assert_array_equal(out8, (img16 >> 8).astype(np.uint8))


def test_regions_exact(img16, mask):
    out = make_variants(img16, mask, ["full", "masked", "crop", "masked_crop"], VariantConfig(bit_depth=16))
    x0, y0, x1, y1 = CROP_BOX
    np.testing.assert_array_equal(out["full"], img16)
    np.testing.assert_array_equal(out["masked"], np.where(mask > 0, img16, 0))
    np.testing.assert_array_equal(out["crop"], img16[y0:y1, x0:x1])
    np.testing.assert_array_equal(out["masked_crop"], np.where(mask > 0, img16, 0)[y0:y1, x0:x1])


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_masked_eq_uses_lungs_only(img16, mask, bit_depth):
    out = make_variant(img16, mask, parse_variant("masked_crop_eq"), VariantConfig(bit_depth=bit_depth))
    x0, y0, x1, y1 = CROP_BOX
    roi = mask[y0:y1, x0:x1]
    top = (1 << bit_depth) - 1
    assert np.all(out[roi == 0] == 0)
    assert out[roi > 0].min() == 0 and out[roi > 0].max() == top


@pytest.mark.parametrize(("name", "bit_depth"), list(product(ALL_NAMES, [8, 16])))
def test_every_variant_shape_and_dtype(img16, mask, name, bit_depth):
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    cropped_shape = (CROP_BOX[3] - CROP_BOX[1], CROP_BOX[2] - CROP_BOX[0])  # (52, 58)
    native = make_variant(img16, mask, parse_variant(name), VariantConfig(bit_depth=bit_depth))
    assert native.dtype == dtype
    assert native.shape == (cropped_shape if "crop" in name else (SIDE, SIDE))
    sized = make_variant(img16, mask, parse_variant(name), VariantConfig(bit_depth=bit_depth, size=32))
    assert sized.dtype == dtype and sized.shape == (32, 32)
    if name.startswith("masked") and "crop" not in name:
        assert np.all(native[mask == 0] == 0)


def test_pad_square_applies_to_crops_only(img16, mask):
    out = make_variants(img16, mask, ["crop", "masked_crop", "full", "masked"], VariantConfig(pad_square=True))
    assert out["crop"].shape == (58, 58)  # 52 x 58 padded 3 above, 3 below
    assert np.all(out["crop"][:3] == 0) and np.all(out["crop"][-3:] == 0) and np.all(out["crop"][3:-3] > 0)
    assert out["masked_crop"].shape == (58, 58)
    wide_img, wide_mask = img16[:40], mask[:40]  # 40 x 64: a full frame stays as it is
    wide = make_variants(wide_img, wide_mask, ["full", "masked"], VariantConfig(pad_square=True, bit_depth=16))
    np.testing.assert_array_equal(wide["full"], wide_img)
    assert wide["masked"].shape == (40, 64)


def test_letterboxed_crop_keeps_aspect(img16, mask):
    out = make_variant(img16, mask, parse_variant("crop"), VariantConfig(size=29))  # 58 -> 29, 52 -> 26
    assert out.shape == (29, 29)
    assert np.all(out[0] == 0) and np.all(out[-2:] == 0)  # 3 rows pad: 1 above, 2 below
    assert np.all(out[1:27] > 0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_empty_mask_falls_back_to_whole_image(img16, name):
    empty = np.zeros((SIDE, SIDE), np.uint8)
    out = make_variant(img16, empty, parse_variant(name), VariantConfig(bit_depth=16))
    assert out.shape == (SIDE, SIDE)
    full = make_variant(img16, empty, VariantSpec("full", parse_variant(name).contrast), VariantConfig(bit_depth=16))
    np.testing.assert_array_equal(out, full)
    if parse_variant(name).contrast == "":
        np.testing.assert_array_equal(out, img16)


def test_make_variants_matches_make_variant(img16, mask):
    cfg = VariantConfig(size=40, bit_depth=8)
    together = make_variants(img16, mask, ALL_NAMES, cfg)
    assert list(together) == ALL_NAMES
    for name in ALL_NAMES:
        np.testing.assert_array_equal(together[name], make_variant(img16, mask, parse_variant(name), cfg))


def test_make_variants_rejects_unknown_name_and_wrong_dtype(img16, mask):
    with pytest.raises(ValueError, match="unknown variant 'lungs'"):
        make_variants(img16, mask, ["masked", "lungs"], VariantConfig())
    with pytest.raises(ValueError, match="uint8 or uint16"):
        make_variants(img16.astype(np.float32), mask, ["full"], VariantConfig())
    with pytest.raises(ValueError, match="shape"):
        make_variants(img16, mask[:10], ["full"], VariantConfig())


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_an_8_bit_source_gives_the_variants_of_its_16_bit_twin(img16, mask, bit_depth):
    """Decoding keeps 8-bit sources as uint8; the variants are those of the same image spread x257."""
    img8 = (img16 >> 8).astype(np.uint8)
    cfg = VariantConfig(bit_depth=bit_depth)
    from8, from16 = make_variants(img8, mask, ALL_NAMES, cfg), make_variants(img8.astype(np.uint16) * 257, mask, ALL_NAMES, cfg)
    for name in ALL_NAMES:
        np.testing.assert_array_equal(from8[name], from16[name], err_msg=name)


def test_masked_crop_eq_is_the_crop_of_masked_eq(img16, mask):
    """The crop holds every lung pixel, so the two share one equalization mapping."""
    out = make_variants(img16, mask, ["masked_eq", "masked_crop_eq", "masked_crop"], VariantConfig(crop_margin_frac=0.0))
    ys, xs = np.nonzero(mask)
    crop = out["masked_eq"][ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    np.testing.assert_array_equal(out["masked_crop_eq"], crop)
    assert out["masked_crop_eq"].shape == out["masked_crop"].shape


def test_make_variants_does_not_modify_inputs(img16, mask):
    img_copy, mask_copy = img16.copy(), mask.copy()
    make_variants(img16, mask, ALL_NAMES, VariantConfig(bit_depth=16))
    np.testing.assert_array_equal(img16, img_copy)
    np.testing.assert_array_equal(mask, mask_copy)
