"""decode_image on every path: DICOM LUT pipeline, compressed and ACR-NEMA DICOM, PNG/JPEG/TIFF,
the bad-input corpus, the pixel limit, and the real DICOMs under /work/shared (skipped if absent)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from corpus import bomb_png, encode, make_bad_corpus, phantom_xray, write_dicom
from pydicom.uid import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.decode import (
    DecodeConfig,
    DecodeError,
    decode_image,
    polarity_score,
    sniff_format,
)

REAL_DICOM = Path("/work/shared/data/dicom")
REAL_DATA = Path("/work/shared/data")
needs_real_data = pytest.mark.skipif(not REAL_DICOM.is_dir(), reason="/work/shared/data not available")


def _decode(path: Path, **kw):
    return decode_image(path.read_bytes(), source=str(path), **kw)


# ----------------------------------------------------------------------------- DICOM paths

RAMP = np.array([[0, 1024], [2048, 4095]], np.uint16)  # 12-bit stored values


def _tile(a: np.ndarray, size: int = 64) -> np.ndarray:
    """Blow a 2x2 array up to size x size (nearest), so it passes min_side_px."""
    return np.kron(a, np.ones((size // 2, size // 2), a.dtype))


def test_monochrome2_12bit_stretches_min_max(tmp_path):
    d = _decode(write_dicom(tmp_path / "a.dcm", pixels=_tile(RAMP), bits_stored=12))
    assert d.format == "dicom" and d.bits_stored == 12 and d.pixels.dtype == np.uint16
    np.testing.assert_array_equal(d.pixels[::32, ::32], [[0, 16388], [32776, 65535]])


def test_monochrome1_is_inverted_exactly(tmp_path):
    # A MONOCHROME1 phantom: stored values are the negative; polarity check must not undo it.
    stored = 4095 - (phantom_xray(64, 64) >> 4)
    d = _decode(write_dicom(tmp_path / "m1.dcm", pixels=stored, photometric="MONOCHROME1"))
    expected = 65535 - np.round((stored - stored.min()) * (65535 / np.ptp(stored)))
    np.testing.assert_array_equal(d.pixels, expected.astype(np.uint16))
    assert "polarity_corrected" not in d.notes
    assert polarity_score(d.pixels) > 0


def test_monochrome1_header_on_monochrome2_pixels_is_corrected(tmp_path):
    stored = phantom_xray(64, 64) >> 4  # MONOCHROME2 pixels
    d = _decode(write_dicom(tmp_path / "fake.dcm", pixels=stored, photometric="MONOCHROME1"))
    assert d.notes == ("polarity_corrected",)
    assert polarity_score(d.pixels) > 0
    off = _decode(tmp_path / "fake.dcm", cfg=DecodeConfig(fix_polarity=False))
    np.testing.assert_array_equal(off.pixels, 65535 - d.pixels)


def test_16bit_bits_stored_and_high_bits_masked(tmp_path):
    full = _decode(write_dicom(tmp_path / "16.dcm", pixels=_tile(np.array([[0, 1], [30000, 65535]], np.uint16)), bits_stored=16))
    np.testing.assert_array_equal(full.pixels[::32, ::32], [[0, 1], [30000, 65535]])
    # 12 bits stored in 16 allocated with garbage in the top nibble: the garbage is ignored.
    dirty = _tile(np.array([[0xF000, 0x1800], [0x2FFF, 0x0FFF]], np.uint16))
    d = _decode(write_dicom(tmp_path / "12dirty.dcm", pixels=dirty, bits_stored=12))
    assert d.bits_stored == 12
    np.testing.assert_array_equal(d.pixels[::32, ::32], [[0, 32776], [65535, 65535]])


def test_rescale_slope_intercept_then_window(tmp_path):
    # Modality: v = 2 * s - 1000 (range -1000..7190). Window center 0, width 2000 -> -1000..1000.
    stored = _tile(np.array([[0, 500], [1000, 4095]], np.uint16))
    d = _decode(write_dicom(tmp_path / "w.dcm", pixels=stored, rescale=(2.0, -1000.0), window=(0.0, 2000.0)))
    # pydicom LINEAR windowing outputs the rescaled stored range -1000..7190, mapped to 0..65535:
    # -1000 is at/below the window bottom, 0 is (0.5/1999 + 0.5) of the way, 1000 is above the top.
    np.testing.assert_array_equal(d.pixels[::32, ::32], [[0, 32784], [65535, 65535]])


def test_rescale_without_window_stretches(tmp_path):
    stored = _tile(np.array([[0, 100], [200, 400]], np.uint16))
    d = _decode(write_dicom(tmp_path / "r.dcm", pixels=stored, rescale=(-1.0, 0.0)))
    # Negative slope flips the order: stored 0 -> 0 (max), 400 -> -400 (min).
    np.testing.assert_array_equal(d.pixels[::32, ::32], [[65535, 49151], [32768, 0]])


def test_voi_lut_maps_lut_output_range(tmp_path):
    lut = np.zeros(4096, np.uint16)
    lut[1024:] = 65535  # a hard threshold at stored value 1024, 16-bit LUT output
    lut[1000] = 32768
    stored = _tile(np.array([[0, 1000], [1024, 4095]], np.uint16))
    d = _decode(write_dicom(tmp_path / "lut.dcm", pixels=stored, voi_lut=lut, window=(10.0, 5.0)))
    np.testing.assert_array_equal(d.pixels[::32, ::32], [[0, 32768], [65535, 65535]])


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEG2000Lossless, JPEGLSLossless, ImplicitVRLittleEndian, ExplicitVRBigEndian],
    ids=["rle", "j2k", "jpegls", "implicit", "bigendian"],
)
def test_compressed_and_other_syntaxes_match_native(tmp_path, syntax):
    stored = phantom_xray(64, 64) >> 4
    try:
        path = write_dicom(tmp_path / "c.dcm", pixels=stored, transfer_syntax=syntax)
    except ValueError as e:  # depends on installed encoders (JPEG-LS needs pyjpegls)
        pytest.skip(f"no encoder for {syntax}: {e}")
    native = _decode(write_dicom(tmp_path / "n.dcm", pixels=stored))
    np.testing.assert_array_equal(_decode(path).pixels, native.pixels)


def test_acr_nema_without_preamble_or_meta(tmp_path):
    stored = phantom_xray(64, 64) >> 4
    path = write_dicom(tmp_path / "acr.dcm", pixels=stored, preamble=False)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    assert sniff_format(data[:132]) == "dicom"
    native = _decode(write_dicom(tmp_path / "n.dcm", pixels=stored))
    np.testing.assert_array_equal(_decode(path).pixels, native.pixels)


def test_rgb_dicom_becomes_gray_with_note(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, 32:] = (255, 255, 255)
    d = _decode(write_dicom(tmp_path / "rgb.dcm", pixels=rgb, photometric="RGB", bits_stored=8, samples_per_pixel=3))
    assert d.notes == ("rgb_to_gray",)
    assert d.pixels[0, 0] == 0 and d.pixels[0, 63] == 65535


def test_dicom_pixel_limit_checked_from_header(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", pixels=phantom_xray(64, 64) >> 4)
    with pytest.raises(DecodeError, match=r"at most 4000 pixels.*64x64 = 4096"):
        _decode(path, cfg=DecodeConfig(max_pixels=4000))


# ----------------------------------------------------------------------------- raster paths


def test_png_8bit_stays_8bit():
    img = _tile(np.array([[0, 1], [128, 255]], np.uint8))
    d = decode_image(encode(".png", img), source="a.png")
    assert (d.format, d.bits_stored, d.notes) == ("png", 8, ())
    assert d.pixels.dtype == np.uint8
    np.testing.assert_array_equal(d.pixels, img)


def test_png_16bit_kept_exactly():
    img = phantom_xray(64, 64)
    assert img.max() >= 1 << 15  # uses the top bit: nothing to rescale
    d = decode_image(encode(".png", img), source="a.png")
    assert d.bits_stored == 16
    np.testing.assert_array_equal(d.pixels, img)


def with_sbit(png: bytes, bits: int) -> bytes:
    """The PNG with an sBIT chunk (gray significant bits) inserted after IHDR."""
    import struct
    import zlib

    chunk = struct.pack(">I", 1) + b"sBIT" + bytes([bits]) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
    return png[:33] + chunk + png[33:]


def test_16bit_png_holding_12bit_data_is_spread_over_the_full_range():
    """PadChest-style exports: 12-bit values stored unscaled in a 16-bit PNG, with or without sBIT."""
    stored = _tile(np.array([[0, 1], [2048, 4095]], np.uint16))
    for data in (encode(".png", stored), with_sbit(encode(".png", stored), 12)):
        d = decode_image(data, source="a.png")
        assert d.bits_stored == 12 and d.pixels.dtype == np.uint16
        np.testing.assert_array_equal(d.pixels[::32, ::32], [[0, 16], [32776, 65535]])
    dark_12bit = _tile(np.array([[0, 10], [100, 1000]], np.uint16))  # sBIT says 12 though no value reaches 2**11
    d = decode_image(with_sbit(encode(".png", dark_12bit), 12), source="a.png")
    assert d.bits_stored == 12 and d.pixels.max() == round(1000 * 65535 / 4095)


def test_16bit_png_already_scaled_as_sbit_asks_is_kept():
    """An encoder that followed the PNG spec shifted 12-bit data up: values use the top bits, keep them."""
    scaled = _tile(np.array([[0, 16], [32768, 65520]], np.uint16))
    d = decode_image(with_sbit(encode(".png", scaled), 12), source="a.png")
    assert d.bits_stored == 12
    np.testing.assert_array_equal(d.pixels, scaled)


def test_low_bit_16bit_png_gives_8bit_variants_with_all_grey_levels():
    """The bug this guards against: keeping the high byte of 12-bit data left 16 grey levels."""
    from pipeline.variants import to_bit_depth

    ramp = np.tile(np.arange(4096, dtype=np.uint16), (32, 1))
    d = decode_image(encode(".png", ramp), source="ramp.png")
    assert len(np.unique(to_bit_depth(d.pixels, 8))) == 256


def test_jpeg_decodes_close_to_source():
    img = (phantom_xray(64, 64) >> 8).astype(np.uint8)
    d = decode_image(encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100]), source="a.jpg")
    assert d.format == "jpeg" and d.bits_stored == 8 and d.pixels.dtype == np.uint8
    assert np.abs(d.pixels.astype(int) - img).max() <= 8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_8_and_16_bit(dtype):
    values = np.array([[0, 10], [100, 200]]) * (1 if dtype == np.uint8 else 300)
    d = decode_image(encode(".tiff", _tile(values.astype(dtype))), source="a.tiff")
    assert d.format == "tiff" and d.pixels.dtype == dtype
    if dtype == np.uint8:
        assert d.bits_stored == 8
        np.testing.assert_array_equal(d.pixels[::32, ::32], values)
    else:  # 60000 needs 16 bits: kept as it is
        assert d.bits_stored == 16
        np.testing.assert_array_equal(d.pixels[::32, ::32], values)


def test_big_endian_tiff_header_is_read():
    img = _tile(np.array([[0, 10], [100, 200]], np.uint8))
    data = encode(".tiff", img)
    # Rewrite as a minimal big-endian TIFF header with width/height tags to check the parser.
    from pipeline.decode import tiff_header

    be = b"MM\x00*" + (8).to_bytes(4, "big") + (2).to_bytes(2, "big")
    be += (256).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + (640).to_bytes(2, "big") + b"\0\0"
    be += (257).to_bytes(2, "big") + (4).to_bytes(2, "big") + (1).to_bytes(4, "big") + (480).to_bytes(4, "big")
    h = tiff_header(be, source="be.tiff")
    assert (h.width, h.height) == (640, 480)
    assert data[:4] == b"II*\x00"


# ----------------------------------------------------------------------------- refusals


def test_decompression_bomb_refused_fast_from_header():
    data = bomb_png(30000, 30000)
    assert len(data) < 200
    t0 = time.perf_counter()
    with pytest.raises(DecodeError) as e:
        decode_image(data, source="bomb.png")
    assert time.perf_counter() - t0 < 0.05  # decoding 900 Mpx would take seconds and 900 MB
    msg = str(e.value)
    assert "30000x30000" in msg and "120000000" in msg and "bomb.png" in msg


def test_unrecognised_bytes_echo_only_a_few_bytes():
    secret = b"SECRET-PATIENT-NAME " * 20
    with pytest.raises(DecodeError, match="not a recognised image") as e:
        decode_image(secret, source="notes.png")
    assert "PATIENT-NAME" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x00" * 128 + b"DICM", "dicom"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "png"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, "jpeg"),
        (b"II*\x00" + b"\0" * 20, "tiff"),
        (b"MM\x00*" + b"\0" * 20, "tiff"),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", "dicom"),  # explicit VR, group 0008
        (b"\x08\x00\x00\x00\x04\x00\x00\x00\x1e\x01\x00\x00", "dicom"),  # implicit VR group length
        (b"\x08\x00\x00\x00\xff\xff\xff\x7f", None),  # implausible length
        (b"GIF89a" + b"\0" * 20, None),
        (b"", None),
    ],
)
def test_sniff_format(head, fmt):
    assert sniff_format(head) == fmt


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, make_bad_corpus(root)


def test_bad_corpus_has_enough_kinds(bad_corpus):
    _, expected = bad_corpus
    assert len(expected) >= 25
    assert sum(v == "error" for v in expected.values()) >= 15


def _corpus_items():
    # Names are fixed by make_bad_corpus; build once in a throwaway dir to parametrize over them.
    # Symlink loops and dangling links fail at reading, before decode: tests/test_job.py covers them.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return sorted((n, o) for n, o in make_bad_corpus(Path(d)).items() if (Path(d) / n).is_file())


@pytest.mark.parametrize(("name", "outcome"), _corpus_items(), ids=lambda v: ascii(v) if isinstance(v, str) else v)
def test_bad_corpus_item(bad_corpus, name, outcome):
    root, _ = bad_corpus
    path = root / name
    if outcome == "ok":
        d = decode_image(path.read_bytes(), source=name)
        assert d.pixels.dtype in (np.uint8, np.uint16) and d.pixels.ndim == 2 and d.pixels.max() > d.pixels.min()
    else:
        with pytest.raises(DecodeError) as e:
            decode_image(path.read_bytes(), source=name)
        assert name in str(e.value)


# ----------------------------------------------------------------------------- real data


@needs_real_data
@pytest.mark.parametrize("path", sorted(REAL_DICOM.glob("*/*.dcm")) if REAL_DICOM.is_dir() else [], ids=lambda p: p.name[:24])
def test_real_dicoms_decode_upright(path):
    d = _decode(path)
    assert d.pixels.dtype == np.uint16 and d.pixels.ndim == 2 and min(d.pixels.shape) >= 440
    assert polarity_score(d.pixels) > 0.2  # mediastinum brighter than the lungs
    assert ("polarity_corrected" in d.notes) == (path.name == "Fake_MONOHR1.dcm")


@needs_real_data
def test_fake_monochrome1_matches_its_true_twin():
    twin = next(p for p in (REAL_DICOM / "torchxrayvision").glob("*.dcm") if p.name != "Fake_MONOHR1.dcm")
    np.testing.assert_array_equal(_decode(REAL_DICOM / "torchxrayvision" / "Fake_MONOHR1.dcm").pixels, _decode(twin).pixels)


@needs_real_data
def test_real_pngs_and_jpegs_would_not_be_flipped():
    # The heuristic is only used on MONOCHROME1 DICOMs, but it must agree with real films.
    paths = sorted((REAL_DATA / "external").glob("*/images/*.png"))
    paths += sorted((REAL_DATA / "covid-qu-ex" / "images").glob("*.jpg"))[:200]
    assert len(paths) >= 29
    flipped = [p.name for p in paths if polarity_score(_decode(p).pixels) < -0.10]
    assert len(flipped) <= len(paths) // 50, flipped


# ----------------------------------------------------------------------------- issue #14.7, #14.8


@pytest.mark.parametrize("slope", [0.0, float("nan"), float("inf"), 1e308])
def test_a_rescale_that_leaves_no_image_is_an_error_not_a_black_row(tmp_path, slope):
    path = write_dicom(tmp_path / "a.dcm", pixels=_tile(RAMP), bits_stored=12, rescale=(slope, 0.0))
    with pytest.raises(DecodeError, match="RescaleSlope") as e:
        _decode(path)
    assert "inf" not in str(e.value) and "nan" not in str(e.value).lower()  # no header value in the message


def test_an_image_of_one_value_is_an_error(tmp_path):
    with pytest.raises(DecodeError, match="every pixel the same"):
        decode_image(encode(".png", np.full((64, 64), 7, np.uint8)), source="flat.png")


def test_burned_in_annotation_is_noted(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", pixels=_tile(RAMP), bits_stored=12, extra={"BurnedInAnnotation": "YES"})
    assert "burned_in_annotation" in _decode(path).notes
    plain = write_dicom(tmp_path / "b.dcm", pixels=_tile(RAMP), bits_stored=12, extra={"BurnedInAnnotation": "NO"})
    assert "burned_in_annotation" not in _decode(plain).notes


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding one tag: Orientation (0x0112)."""
    import struct

    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def test_a_jpeg_with_exif_orientation_6_is_decoded_upright():
    """Issue #14.8: OpenCV turned it, then the header-shape check refused it."""
    img = np.zeros((40, 64), np.uint8)
    img[:, :8] = 255  # a bright band on the left of the stored pixels
    img[5:35, 20:50] = 120
    d = decode_image(with_exif_orientation(encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100]), 6), source="r.jpg")
    assert d.pixels.shape == (64, 40) and "exif_orientation_applied" in d.notes
    assert d.pixels[:8].mean() > 200  # orientation 6 turns it 90 degrees clockwise: the band is on top


def test_the_default_install_decodes_every_jpeg_family_but_12_bit_lossy_which_fails_cleanly():
    """Licences (README): JPEG baseline, lossless and JPEG-LS go through GDCM (Apache-2.0), JPEG 2000 and RLE
    through pylibjpeg; JPEG Extended 12-bit needs the GPL extra `gpl-codecs`, and without it is an error row."""
    import importlib.util

    from pydicom.data import get_testdata_file

    cases = {"JPGExtended.dcm": "1.2.840.10008.1.2.4.51", "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",
             "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80", "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
             "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90", "SC_jpeg_no_color_transform.dcm": "1.2.840.10008.1.2.4.50"}
    for name, syntax in cases.items():
        data = Path(get_testdata_file(name, download=False)).read_bytes()
        if syntax.endswith(".51") and importlib.util.find_spec("libjpeg") is None:
            with pytest.raises(DecodeError, match="expected decodable DICOM pixel data"):
                decode_image(data, source=name)
        else:
            assert decode_image(data, source=name).pixels.max() > 0, name
