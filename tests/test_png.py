"""The output's PNG encoder: exact round trips through two independent decoders (OpenCV and Pillow)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.png import decode_png, encode_png


def pillow_decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (17, 23), (64, 3)])
def test_round_trip_exact_in_opencv_and_pillow(dtype, shape):
    rng = np.random.default_rng(4)
    img = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    data = encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    for back in (decode_png(data), pillow_decode(data)):
        assert back.dtype == dtype and back.shape == shape
        np.testing.assert_array_equal(back, img)


def test_a_mask_round_trips_and_is_small():
    mask = np.zeros((512, 400), np.uint8)
    cv2.ellipse(mask, (120, 250), (60, 180), 0, 0, 360, 255, -1)
    cv2.ellipse(mask, (280, 250), (60, 180), 0, 0, 360, 255, -1)
    data = encode_png(mask, mask=True)
    np.testing.assert_array_equal(pillow_decode(data), mask)
    np.testing.assert_array_equal(decode_png(data), mask)
    assert len(data) < mask.size / 50  # runs compress to almost nothing


def test_a_strided_view_is_encoded_as_its_values():
    """Variants are crops (views) of larger arrays; the encoder must not read past a row."""
    big = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50
    crop = big[5:25, 3:17]
    np.testing.assert_array_equal(pillow_decode(encode_png(crop)), crop)


def test_smaller_than_opencv_at_its_defaults_on_an_xray_like_image():
    """A smooth image with noise, masked like a variant: the Up filter + RLE beats OpenCV's default."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:500]
    img = np.clip(120 + 60 * np.sin(x / 80) * np.cos(y / 90) + rng.normal(0, 3, x.shape), 0, 255).astype(np.uint8)
    img[(x - 250) ** 2 / 200**2 + (y - 300) ** 2 / 250**2 > 1] = 0
    ours = encode_png(img)
    ok, theirs = cv2.imencode(".png", img)
    assert ok and len(ours) < len(theirs)
    np.testing.assert_array_equal(decode_png(ours), img)


@pytest.mark.parametrize(
    "img", [np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int16), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_encode_rejects_other_inputs(img):
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_png(img)


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="PNG"):
        decode_png(b"not a png")
