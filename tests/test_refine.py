"""Mask refinement: each morphology step on a tiny grid with exact values, then the whole stage."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.refine import (
    LEFT_LUNG,
    RIGHT_LUNG,
    MaskStats,
    RefineConfig,
    close_horizontal,
    close_vertical,
    drop_small_components,
    fill_holes,
    keep_largest_components,
    line_length_px,
    lung_sides,
    mask_bbox,
    mask_stats,
    qc_flags,
    refine_mask,
    threshold_mask,
    upsample_probability,
)

PHANTOM_SIDE = 64  # px, the fixture's design resolution
LUNG_P = 0.9  # phantom probability inside a lung
BACKGROUND_P = 0.1  # phantom probability elsewhere


def grid(text: str) -> np.ndarray:
    """'#' -> 255, '.' -> 0; one row per line, spaces ignored."""
    rows = [line.replace(" ", "") for line in text.strip().splitlines()]
    return np.array([[255 if c == "#" else 0 for c in row] for row in rows], dtype=np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / (a | b).sum())


def phantom_design() -> np.ndarray:
    """float32 (64, 64) lung probability with the defects refinement must repair.

    Left lung: rows 8-55, cols 6-27, with a 3x3 hole and a 1-row vertical gap (a horizontal cut).
    Right lung: rows 8-55, cols 36-57, with a 1-col horizontal gap (a vertical slit not reaching
    the edge). A 4x2 speck (8 px < 1.2% of 4096) sits between them.
    """
    p = np.full((PHANTOM_SIDE, PHANTOM_SIDE), BACKGROUND_P, dtype=np.float32)
    p[8:56, 6:28] = LUNG_P
    p[30:33, 15:18] = BACKGROUND_P  # hole
    p[20, 6:28] = BACKGROUND_P  # cut across the whole left lung: two pieces without closing
    p[8:56, 36:58] = LUNG_P
    p[12:50, 46] = BACKGROUND_P  # slit inside the right lung
    p[40:44, 31:33] = LUNG_P  # speck, 3 px clear of both lungs
    return p


def upscale(p: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(p, np.ones((factor, factor), dtype=p.dtype))


@pytest.fixture
def phantom() -> np.ndarray:
    return phantom_design()


@pytest.fixture
def phantom_truth() -> np.ndarray:
    """What refinement of the phantom should give: two solid rectangles, no speck."""
    m = np.zeros((PHANTOM_SIDE, PHANTOM_SIDE), dtype=np.uint8)
    m[8:56, 6:28] = 255
    m[8:56, 36:58] = 255
    return m


# --- config -------------------------------------------------------------------------------------


def test_default_config_matches_seed_at_256():
    cfg = RefineConfig()
    assert 5 <= line_length_px(cfg.close_frac, 256) <= 10
    assert cfg.min_area_frac * 256 * 256 == pytest.approx(800, rel=0.02)
    assert cfg.max_components == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"close_frac": -0.1},
        {"min_area_frac": 1.0},
        {"max_components": 0},
        {"small_area_frac": 0.6, "large_area_frac": 0.5},
    ],
)
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RefineConfig(**kwargs)


@pytest.mark.parametrize(
    ("frac", "side", "expected"),
    [(0.025, 256, 7), (0.025, 3000, 75), (0.025, 64, 3), (0.03, 256, 9), (0.0, 256, 1), (0.001, 64, 1)],
)
def test_line_length_is_smallest_odd_at_least_frac_of_side(frac, side, expected):
    assert line_length_px(frac, side) == expected


# --- threshold / upsample -----------------------------------------------------------------------


def test_threshold_is_inclusive_and_binary():
    prob = np.array([[0.0, 0.49, 0.5], [0.51, 1.0, np.nan]], dtype=np.float32)
    out = threshold_mask(prob, 0.5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 255], [255, 255, 0]])


def test_threshold_rejects_3d():
    with pytest.raises(ValueError, match="2-D"):
        threshold_mask(np.zeros((1, 4, 4), np.float32), 0.5)


def test_upsample_shape_dtype_range():
    prob = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float64)
    out = upsample_probability(prob, (30, 20))
    assert out.shape == (30, 20)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_upsample_is_smooth_not_blocky():
    # A step 0 | 1 at 4 px becomes a ramp at 64 px: bilinear, not nearest.
    prob = np.array([[0.0, 0.0, 1.0, 1.0]] * 4, dtype=np.float32)
    out = upsample_probability(prob, (64, 64))
    row = out[32]
    assert np.all(np.diff(row) >= 0)  # monotonic across the edge
    assert np.all(np.abs(np.diff(row)) <= 1 / 16 + 1e-6)  # no jump: at most one source step per 16 px
    assert len(np.unique(row)) > 10  # many intermediate values
    assert row[0] == 0.0 and row[-1] == 1.0


def test_upsample_same_shape_is_a_copy():
    prob = np.random.default_rng(0).random((8, 8), dtype=np.float32)
    out = upsample_probability(prob, (8, 8))
    np.testing.assert_array_equal(out, prob)
    assert out is not prob


@pytest.mark.parametrize("shape", [(0, 5), (5,), "ab"])
def test_upsample_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        upsample_probability(np.zeros((4, 4), np.float32), shape)


# --- fill holes ---------------------------------------------------------------------------------


def test_fill_holes_fills_enclosed():
    before = grid("""
        # # # # #
        # . . . #
        # . . . #
        # # # # #
    """)
    after = grid("""
        # # # # #
        # # # # #
        # # # # #
        # # # # #
    """)
    np.testing.assert_array_equal(fill_holes(before), after)


def test_fill_holes_leaves_gap_open_to_border():
    before = grid("""
        # # # # #
        # . . . .
        # . . . #
        # # # # #
    """)
    np.testing.assert_array_equal(fill_holes(before), before)


def test_fill_holes_diagonal_enclosure_counts_as_hole():
    # 8-connected ring: the centre reaches outside only diagonally, which background may not do.
    before = grid("""
        . # .
        # . #
        . # .
    """)
    after = grid("""
        . # .
        # # #
        . # .
    """)
    np.testing.assert_array_equal(fill_holes(before), after)


def test_fill_holes_does_not_modify_input():
    before = grid("""
        # # #
        # . #
        # # #
    """)
    copy = before.copy()
    fill_holes(before)
    np.testing.assert_array_equal(before, copy)


def test_fill_holes_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        fill_holes(np.zeros((4, 4), np.float32))


# --- closing ------------------------------------------------------------------------------------


def test_close_vertical_bridges_gap_shorter_than_line():
    before = grid("""
        . # . . # .
        . . . . . .
        . . . . . .
        . # . . . .
        . . . . . .
        . . . . # .
    """)
    after = grid("""
        . # . . # .
        . # . . . .
        . # . . . .
        . # . . . .
        . . . . . .
        . . . . # .
    """)
    # length 3 bridges the 2-px gap, not the 4-px one, and nothing grows to the bottom edge.
    np.testing.assert_array_equal(close_vertical(before, length_px=3), after)


def test_close_vertical_ignores_horizontal_gaps():
    before = grid("""
        . . . . .
        # . # . .
        . . . . .
    """)
    np.testing.assert_array_equal(close_vertical(before, length_px=5), before)


def test_close_horizontal_bridges_gap_shorter_than_line():
    before = grid("""
        # . . # . . . #
        . . . . . . . .
    """)
    after = grid("""
        # # # # . . . #
        . . . . . . . .
    """)
    np.testing.assert_array_equal(close_horizontal(before, length_px=3), after)
    np.testing.assert_array_equal(
        close_horizontal(before, length_px=5), grid("""
        # # # # # # # #
        . . . . . . . .
    """)
    )


def test_closing_does_not_grow_from_border_or_remove_pixels():
    before = grid("""
        . . # . .
        . . . . .
        # . # . #
    """)
    for out in (close_vertical(before, length_px=7), close_horizontal(before, length_px=7)):
        assert np.all(out[before > 0] == 255)  # extensive
    np.testing.assert_array_equal(close_vertical(before, length_px=7)[:, 2], [255, 255, 255])
    np.testing.assert_array_equal(close_horizontal(before, length_px=7)[2], [255] * 5)
    np.testing.assert_array_equal(close_horizontal(before, length_px=7)[0], [0, 0, 255, 0, 0])


@pytest.mark.parametrize("length", [0, 2, -3])
def test_closing_rejects_even_or_nonpositive_length(length):
    with pytest.raises(ValueError, match="odd"):
        close_vertical(np.zeros((4, 4), np.uint8), length_px=length)


def test_closing_length_one_is_identity():
    before = grid("""
        # . #
        . . .
        # . #
    """)
    np.testing.assert_array_equal(close_vertical(before, length_px=1), before)
    np.testing.assert_array_equal(close_horizontal(before, length_px=1), before)


# --- components ---------------------------------------------------------------------------------


def test_drop_small_components():
    before = grid("""
        # # . . #
        # . . . .
        . . . # .
        . . # . .
    """)
    after = grid("""
        # # . . .
        # . . . .
        . . . . .
        . . . . .
    """)
    np.testing.assert_array_equal(drop_small_components(before, min_area_px=3), after)
    # The 2-px diagonal pair is one 8-connected component: kept at min_area_px=2.
    kept = drop_small_components(before, min_area_px=2)
    assert kept[2, 3] == 255 and kept[3, 2] == 255 and kept[0, 4] == 0


def test_drop_small_components_zero_keeps_everything():
    before = grid("""
        # . #
        . . .
        # . .
    """)
    np.testing.assert_array_equal(drop_small_components(before, min_area_px=0), before)


def test_keep_largest_components():
    before = grid("""
        # # . # .
        # # . . .
        . . . # #
    """)
    after = grid("""
        # # . . .
        # # . . .
        . . . # #
    """)
    np.testing.assert_array_equal(keep_largest_components(before, n=2), after)
    np.testing.assert_array_equal(
        keep_largest_components(before, n=1), grid("""
        # # . . .
        # # . . .
        . . . . .
    """)
    )
    np.testing.assert_array_equal(keep_largest_components(before, n=3), before)


def test_keep_largest_tie_goes_to_topmost_then_leftmost():
    before = grid("""
        . . # .
        # . . .
        . . . #
    """)
    np.testing.assert_array_equal(
        keep_largest_components(before, n=1), grid("""
        . . # .
        . . . .
        . . . .
    """)
    )


def test_components_of_empty_mask_stay_empty():
    empty = np.zeros((5, 5), np.uint8)
    np.testing.assert_array_equal(keep_largest_components(empty, n=2), empty)
    np.testing.assert_array_equal(drop_small_components(empty, min_area_px=3), empty)


def test_component_args_validated():
    m = np.zeros((3, 3), np.uint8)
    with pytest.raises(ValueError):
        keep_largest_components(m, n=0)
    with pytest.raises(ValueError):
        drop_small_components(m, min_area_px=-1)


# --- refine_mask --------------------------------------------------------------------------------


def test_refine_mask_repairs_phantom(phantom, phantom_truth):
    out = refine_mask(phantom, (PHANTOM_SIDE, PHANTOM_SIDE))
    assert out.dtype == np.uint8 and out.shape == (PHANTOM_SIDE, PHANTOM_SIDE)
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out, phantom_truth)


def test_refine_mask_raw_threshold_is_not_enough(phantom, phantom_truth):
    # Guards the test above: the phantom's defects are real.
    raw = threshold_mask(phantom, 0.5)
    assert not np.array_equal(raw, phantom_truth)
    assert mask_stats(raw).n_components == 4  # two halves of the left lung, right lung, speck


@pytest.mark.parametrize("factor", [1, 4])
def test_refine_mask_at_design_scale_matches_truth(phantom, phantom_truth, factor):
    side = PHANTOM_SIDE * factor
    out = refine_mask(upscale(phantom, factor), (side, side))
    np.testing.assert_array_equal(out, upscale(phantom_truth, factor))


def test_refine_mask_resolution_independent(phantom):
    """The same phantom at 64 and at 256 px gives the same mask, up to resizing."""
    small = refine_mask(phantom, (64, 64))
    large = refine_mask(upscale(phantom, 4), (256, 256))
    large_at_64 = cv2.resize(large, (64, 64), interpolation=cv2.INTER_AREA)
    assert iou(small, large_at_64 >= 128) > 0.98
    # Model output at 64 upsampled to a 256 source agrees with a 256 model output.
    from_64 = refine_mask(phantom, (256, 256))
    assert iou(from_64, large) > 0.98


def test_refine_mask_scales_areas_with_image_size():
    """A blob at 1.6% of the frame survives at any size, one at 0.8% never does."""
    cfg = RefineConfig(max_components=10)
    p = np.zeros((50, 50), np.float32)
    p[5:45, 5:20] = 1.0  # lung
    p[5:14, 30:39] = 1.0  # 81 px = 3.2%
    p[30:37, 30:37] = 1.0  # 49 px = 2.0%  (kept)
    p[40:46, 40:46] = 1.0  # 36 px = 1.4%  (kept)
    p[20:25, 44:49] = 1.0  # 25 px = 1.0%  (dropped)
    for factor in (1, 2, 8):
        side = 50 * factor
        out = refine_mask(upscale(p, factor), (side, side), cfg)
        assert mask_stats(out).n_components == 4, factor
        assert out[22 * factor, 46 * factor] == 0


def test_refine_mask_scales_closing_with_image_size():
    """A cut of 1/64 of the height is bridged at 64 and at 512 px; one of 1/8 is not."""
    cfg = RefineConfig(min_area_frac=0.0, max_components=10)
    p = np.zeros((64, 64), np.float32)
    p[4:60, 4:20] = 1.0
    p[30, 4:20] = 0.0  # 1-row cut
    p[4:60, 40:56] = 1.0
    p[28:36, 40:56] = 0.0  # 8-row cut
    for factor in (1, 8):
        side = 64 * factor
        stats = mask_stats(refine_mask(upscale(p, factor), (side, side), cfg))
        assert stats.n_components == 3, factor


@pytest.mark.parametrize("seed", range(5))
def test_fill_before_closing_would_change_nothing(seed):
    """refine_mask fills holes once, after closing; filling before as well gives the same mask."""
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((40, 40)) < 0.4, 255, 0).astype(np.uint8)

    def close_then_fill(m):
        return fill_holes(close_horizontal(close_vertical(m, length_px=3), length_px=3))

    once = close_then_fill(mask)
    assert not np.array_equal(once, close_horizontal(close_vertical(mask, length_px=3), length_px=3))
    np.testing.assert_array_equal(close_then_fill(fill_holes(mask)), once)


def test_refine_mask_keeps_two_largest(phantom):
    p = phantom.copy()
    p[59:64, 2:62] = LUNG_P  # a third, large-enough component (300 px > 1.2%), 3 px below the lungs
    out = refine_mask(p, (64, 64))
    assert mask_stats(out).n_components == 2
    assert out[60, 30] == 0


def test_refine_mask_threshold_from_config(phantom):
    assert refine_mask(phantom, (64, 64), RefineConfig(threshold=0.95)).max() == 0


def test_refine_mask_non_square_source(phantom):
    out = refine_mask(phantom, (300, 200))
    assert out.shape == (300, 200)
    assert mask_stats(out).n_components == 2


def test_refine_mask_empty_probability():
    out = refine_mask(np.zeros((32, 32), np.float32), (100, 80))
    assert out.shape == (100, 80) and out.max() == 0


# --- stats and QC -------------------------------------------------------------------------------


def test_mask_stats_phantom(phantom_truth):
    stats = mask_stats(phantom_truth)
    assert stats.n_components == 2
    assert stats.lung_fraction == pytest.approx(2 * 48 * 22 / 64**2)
    assert stats.bbox == (6, 8, 58, 56)


def test_mask_bbox_exclusive_end_and_empty():
    m = np.zeros((6, 7), np.uint8)
    m[2, 3] = 255
    assert mask_bbox(m) == (3, 2, 4, 3)
    m[5, 6] = 255
    assert mask_bbox(m) == (3, 2, 7, 6)
    assert mask_bbox(np.zeros((6, 7), np.uint8)) is None


def test_mask_stats_empty():
    assert mask_stats(np.zeros((4, 4), np.uint8)) == MaskStats(0.0, 0, None)


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        (MaskStats(0.0, 0, None), ("no_lungs",)),
        (MaskStats(0.30, 2, (0, 0, 1, 1)), ()),
        (MaskStats(0.20, 1, (0, 0, 1, 1)), ("one_lung",)),
        (MaskStats(0.05, 2, (0, 0, 1, 1)), ("small_lung_area",)),
        (MaskStats(0.05, 1, (0, 0, 1, 1)), ("one_lung", "small_lung_area")),
        (MaskStats(0.70, 2, (0, 0, 1, 1)), ("large_lung_area",)),
        (MaskStats(0.10, 2, (0, 0, 1, 1)), ()),  # boundaries are not flagged
        (MaskStats(0.55, 2, (0, 0, 1, 1)), ()),
    ],
)
def test_qc_flags(stats, expected):
    assert qc_flags(stats, RefineConfig()) == expected


def test_qc_flags_use_config_thresholds():
    stats = MaskStats(0.30, 2, (0, 0, 1, 1))
    assert qc_flags(stats, RefineConfig(small_area_frac=0.35, large_area_frac=0.9)) == ("small_lung_area",)
    assert qc_flags(stats, RefineConfig(small_area_frac=0.1, large_area_frac=0.25)) == ("large_lung_area",)


def test_the_patients_right_lung_is_the_component_on_the_images_left():
    mask = np.zeros((20, 40), np.uint8)
    mask[2:18, 2:12] = 255  # image's left: the patient's right lung, 160 px
    mask[4:16, 26:36] = 255  # image's right: the left lung, 120 px
    sides = lung_sides(mask)
    assert set(np.unique(sides[mask == 0])) == {0}
    assert set(np.unique(sides[:, :20][mask[:, :20] > 0])) == {RIGHT_LUNG}
    assert set(np.unique(sides[:, 20:][mask[:, 20:] > 0])) == {LEFT_LUNG}
    stats = mask_stats(mask)
    assert stats.right_lung_fraction == 160 / 800 and stats.left_lung_fraction == 120 / 800
    assert stats.right_lung_fraction + stats.left_lung_fraction == stats.lung_fraction

    only_left = mask.copy()
    only_left[:, :20] = 0
    stats = mask_stats(only_left)
    assert (stats.right_lung_fraction, stats.left_lung_fraction) == (0.0, 120 / 800)
    assert mask_stats(np.zeros((4, 4), np.uint8)) == MaskStats(0.0, 0, None, 0.0, 0.0)
