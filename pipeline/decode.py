"""Decode one chest X-ray file (DICOM, PNG, JPEG, TIFF) from bytes to a uint16 gray image.

Messages name the stage's expectation, the error kind and the tag, never a header value (a crafted
or careless header can put a patient's name anywhere), and pydicom's own warnings, which quote
values, are kept out of the logs (`_quiet_pydicom`).

Contract (docs/CONTRACTS.md): ``decode_image(data, source=...) -> Decoded`` with
``Decoded.pixels`` uint8 (H, W) 0..255 for 8-bit PNG/JPEG/TIFF, else uint16 (H, W) full range
0..65535; brighter = denser tissue (MONOCHROME2 sense). 8-bit sources stay 8-bit: half the memory
and no conversion; every later stage takes both. Every refusal raises ``DecodeError`` with one line saying what was
expected, what came, and the source name.

The format is sniffed from the content, never from the file name. Image size is read from
the header (DICOM Rows/Columns/NumberOfFrames, PNG IHDR, JPEG SOFn, TIFF IFD0) and checked
against ``DecodeConfig.max_pixels`` before any pixel buffer is allocated.

DICOM grayscale pipeline, in the order of PS3.3 C.11 (pydicom.pixels does the maths):
stored values (BitsStored honoured) -> modality LUT (Rescale Slope/Intercept or Modality
LUT Sequence) -> VOI LUT or the first window -> scale to uint16 -> MONOCHROME1 inversion ->
polarity check (see ``looks_inverted``).
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipeline.privacy import HEADER_KEYWORDS

logger = logging.getLogger(__name__)

U16_MAX = 65535
HEAD_ECHO_BYTES = 8  # at most this many bytes of unrecognised content go into a message
DICOM_PREAMBLE_BYTES = 128
DICOM_MAGIC = b"DICM"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# Raw ACR-NEMA / preamble-less DICOM: the first element belongs to one of these groups.
ACR_NEMA_GROUPS = (0x0002, 0x0008)
ACR_NEMA_MAX_FIRST_ELEMENT_LEN = 1024  # bytes; a first header element is short
DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)

# Polarity heuristic (see looks_inverted). Regions as fractions of height / width.
POLARITY_SIZE_PX = 128  # the image is resized to this square before measuring
POLARITY_ROWS = (0.25, 0.70)  # upper-middle band: lungs and mediastinum, above the diaphragm
POLARITY_CENTRE_COLS = (0.45, 0.55)  # mediastinum / spine strip
POLARITY_LEFT_COLS = (0.15, 0.35)  # right lung (image left)
POLARITY_RIGHT_COLS = (0.65, 0.85)  # left lung (image right)
# Flip only when the centre strip is darker than the lungs by this fraction of the range.
# Measured on 4,689 correctly presented real films (covid-qu-ex, JSRT, Shenzhen): 0.66 %
# score below -0.10 (would be wrongly flipped), 11 % below +0.10 (a negative of them would be
# missed). Fake_MONOHR1.dcm scores -0.34; the genuine MONOCHROME1 films +0.29 and +0.35.
POLARITY_MARGIN = 0.10
MAX_RESCALE = 1e6  # |RescaleSlope| and |RescaleIntercept| above this give no usable image (0, NaN, 1e308 ...)
NOTE_BURNED_IN = "burned_in_annotation"  # BurnedInAnnotation = YES: text in the pixels (see README)
NOTE_EXIF_ROTATED = "exif_orientation_applied"  # a JPEG/TIFF turned upright by its EXIF Orientation


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 120_000_000  # refuse above this many pixels (rows*cols*frames), from the header
    min_side_px: int = 32  # refuse images with a side shorter than this, px
    fix_polarity: bool = True  # detect a MONOCHROME1 header on MONOCHROME2 pixels and correct it


class DecodeError(ValueError):
    """An input that cannot be decoded into a single grayscale radiograph."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (H, W) 0..255 (8-bit sources) or uint16 (H, W) 0..65535; brighter = denser
    format: str  # "dicom" | "png" | "jpeg" | "tiff"
    bits_stored: int  # source bit depth: 8 for 8-bit PNG/JPEG, the significant bits of 16-bit PNG/TIFF, DICOM BitsStored
    header: dict = field(default_factory=dict, repr=False)  # raw DICOM values of privacy.HEADER_KEYWORDS only,
    #                                                         for pipeline.privacy; {} for PNG/JPEG/TIFF; never written
    notes: tuple[str, ...] = ()  # QC notes, e.g. "polarity_corrected", "rgb_to_gray", "alpha_dropped"


@dataclass(frozen=True)
class RasterHeader:
    """What a PNG / JPEG / TIFF header says, read without decoding pixels."""

    width: int  # px
    height: int  # px
    channels: int  # samples per pixel, alpha included
    bits: int  # bits per sample
    has_alpha: bool  # an alpha channel is present (PNG colour types 4/6, TIFF ExtraSamples)
    palette: bool = False  # PNG colour type 3


# ----------------------------------------------------------------------------- sniffing


def _looks_like_acr_nema(head: bytes) -> bool:
    """A plausible little-endian group 0002/0008 element at offset 0 (implicit or explicit VR)."""
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head, 0)
    if group not in ACR_NEMA_GROUPS or element > 0x2000:
        return False
    if head[4:6] in DICOM_VRS:
        return True
    (length,) = struct.unpack_from("<I", head, 4)
    return length % 2 == 0 and length <= ACR_NEMA_MAX_FIRST_ELEMENT_LEN


def sniff_format(head: bytes) -> str | None:
    """"dicom" | "png" | "jpeg" | "tiff" from the first bytes (>= 132 for Part 10 DICOM), else None.

    By content only: Part 10 DICOM (128-byte preamble + "DICM"), raw ACR-NEMA / preamble-less
    DICOM (a plausible group 0002 or 0008 element at offset 0, little endian), PNG signature,
    JPEG SOI + marker, TIFF "II*\\0" / "MM\\0*". BigTIFF and everything else give None.
    """
    if head[DICOM_PREAMBLE_BYTES : DICOM_PREAMBLE_BYTES + 4] == DICOM_MAGIC:
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    if _looks_like_acr_nema(head):
        return "dicom"
    return None


# ----------------------------------------------------------------------------- raster headers


def png_header(data: bytes, *, source: str) -> RasterHeader:
    """Width, height, channels and bit depth from the PNG IHDR chunk."""
    if len(data) < 29 or data[12:16] != b"IHDR":
        raise DecodeError(f"expected a PNG IHDR chunk after the signature, got {data[12:16]!r} in {source}")
    width, height, bits, colour = struct.unpack_from(">IIBB", data, 16)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None:
        raise DecodeError(f"expected a PNG colour type 0/2/3/4/6, got {colour} in {source}")
    return RasterHeader(width, height, channels, bits, has_alpha=colour in (4, 6), palette=colour == 3)


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_header(data: bytes, *, source: str) -> RasterHeader:
    """Width, height, components and precision from the first JPEG SOFn marker segment."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise DecodeError(f"expected a JPEG marker at byte {pos}, got 0x{data[pos]:02x} in {source}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 10 > len(data):
                break
            bits, height, width, channels = struct.unpack_from(">BHHB", data, pos + 4)
            if height == 0:
                raise DecodeError(f"expected a JPEG frame height in SOF, got 0 (DNL marker) in {source}")
            return RasterHeader(width, height, channels, bits, has_alpha=False)
        pos += 2 + length
    raise DecodeError(f"expected a JPEG frame header (SOFn) before the scan, found none in {source}")


_TIFF_TYPE_FORMATS = {3: "H", 4: "I"}  # SHORT, LONG


def tiff_header(data: bytes, *, source: str) -> RasterHeader:
    """Width, height, samples and bits from TIFF IFD0 (tags 256, 257, 258, 277, 338)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        tags: dict[int, int] = {}
        for i in range(count):
            tag, typ, n = struct.unpack_from(order + "HHI", data, ifd + 2 + 12 * i)
            fmt = _TIFF_TYPE_FORMATS.get(typ)
            if fmt is not None and n >= 1:
                if n * struct.calcsize(fmt) <= 4:
                    (value,) = struct.unpack_from(order + fmt, data, ifd + 2 + 12 * i + 8)
                else:  # first of several values, stored at an offset
                    (offset,) = struct.unpack_from(order + "I", data, ifd + 2 + 12 * i + 8)
                    (value,) = struct.unpack_from(order + fmt, data, offset)
                tags[tag] = value
    except struct.error as e:
        raise DecodeError(f"expected a readable TIFF IFD0, got a truncated one in {source}") from e
    if 256 not in tags or 257 not in tags:
        raise DecodeError(f"expected TIFF ImageWidth (256) and ImageLength (257) tags, got {sorted(tags)} in {source}")
    return RasterHeader(
        width=tags[256], height=tags[257], channels=tags.get(277, 1), bits=tags.get(258, 1), has_alpha=338 in tags
    )


# ----------------------------------------------------------------------------- checks


def check_size(rows: int, cols: int, frames: int, *, source: str, cfg: DecodeConfig) -> None:
    """Refuse headers above cfg.max_pixels or with a side below cfg.min_side_px."""
    total = rows * cols * frames
    if total > cfg.max_pixels:
        raise DecodeError(
            f"expected at most {cfg.max_pixels} pixels, header says {rows}x{cols}"
            f"{f'x{frames}' if frames > 1 else ''} = {total} pixels in {source}"
        )
    if min(rows, cols) < cfg.min_side_px:
        raise DecodeError(f"expected both sides >= {cfg.min_side_px} px, got {rows}x{cols} in {source}")


# ----------------------------------------------------------------------------- scaling


def stretch_to_u16(values: np.ndarray) -> np.ndarray:
    """Linearly map min..max of ``values`` to uint16 0..65535 (a constant image gives zeros)."""
    v = values.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint16)
    return np.round((v - lo) * (U16_MAX / (hi - lo))).astype(np.uint16)


def range_to_u16(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map the nominal range lo..hi to uint16 0..65535, clipping outside it."""
    if hi <= lo:
        return stretch_to_u16(values)
    v = (values.astype(np.float64) - lo) * (U16_MAX / (hi - lo))
    return np.round(np.clip(v, 0, U16_MAX)).astype(np.uint16)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """float64 (H, W) luma (ITU-R BT.601 weights) from (H, W, 3) RGB."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# ----------------------------------------------------------------------------- polarity


def polarity_score(img: np.ndarray) -> float:
    """Centre-strip brightness minus mean lung-field brightness, as a fraction of the range.

    ``img``: (H, W) any numeric dtype, as presented (brighter = denser if correct). In a
    correctly presented frontal chest film the mediastinum / spine strip in the middle
    columns is brighter than the two lung fields left and right of it: score > 0. A negative
    (inverted) film scores < 0. Regions: rows POLARITY_ROWS, columns POLARITY_*_COLS, medians
    of an area-resized POLARITY_SIZE_PX square normalised to 0..1.
    """
    small = cv2.resize(img.astype(np.float32), (POLARITY_SIZE_PX, POLARITY_SIZE_PX), interpolation=cv2.INTER_AREA)
    lo, hi = float(small.min()), float(small.max())
    if hi <= lo:
        return 0.0
    small = (small - lo) / (hi - lo)
    n = POLARITY_SIZE_PX
    r0, r1 = int(n * POLARITY_ROWS[0]), int(n * POLARITY_ROWS[1])

    def strip(cols: tuple[float, float]) -> float:
        return float(np.median(small[r0:r1, int(n * cols[0]) : int(n * cols[1])]))

    lungs = (strip(POLARITY_LEFT_COLS) + strip(POLARITY_RIGHT_COLS)) / 2
    return strip(POLARITY_CENTRE_COLS) - lungs


def looks_inverted(img: np.ndarray) -> bool:
    """True when ``img`` looks like a negative: polarity_score below -POLARITY_MARGIN.

    Used only on DICOMs whose header says MONOCHROME1, after the MONOCHROME1 inversion: that
    is where mislabelling happens in practice (MONOCHROME2 pixels with a MONOCHROME1 header,
    e.g. torchxrayvision's Fake_MONOHR1.dcm). PNG/JPEG/TIFF and MONOCHROME2 DICOMs are never
    flipped. Off-centre or lateral films can fool it; the margin keeps false flips rare.
    """
    return polarity_score(img) < -POLARITY_MARGIN


# ----------------------------------------------------------------------------- DICOM


_DICOM_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError, struct.error)
_PIXEL_ERRORS = (
    ValueError,
    TypeError,
    RuntimeError,
    OSError,
    EOFError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    struct.error,
)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records quote header values: keep them out of the console and worker logs."""
    pydicom_logger = logging.getLogger("pydicom")
    disabled = pydicom_logger.disabled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom_logger.disabled = True
        try:
            yield
        finally:
            pydicom_logger.disabled = disabled


def read_dicom(data: bytes, *, source: str) -> Any:
    """A pydicom Dataset (``force=True``: ACR-NEMA files without preamble or meta are read).

    A missing Transfer Syntax UID is inferred from how pydicom read the data set
    (implicit / explicit VR, little / big endian).
    """
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
    except _DICOM_READ_ERRORS as e:
        raise DecodeError(f"expected a readable DICOM data set, got {type(e).__name__} in {source}") from e
    if len(ds) == 0:
        raise DecodeError(f"expected DICOM elements, got none in {source}")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def dicom_geometry(ds: Any, *, source: str) -> tuple[int, int, int]:
    """(rows, cols, frames) from the header; refuses missing pixel data and missing sizes."""
    if "PixelData" not in ds:
        raise DecodeError(f"expected a Pixel Data (7FE0,0010) element, got none in {source}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as e:
        raise DecodeError(f"expected integer Rows, Columns and NumberOfFrames, one is not in {source}") from e
    return rows, cols, frames


def check_codec(ds: Any, *, source: str) -> None:
    """Refuse a transfer syntax for which no installed pixel-data decoder exists."""
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    name = tsyntax.name if tsyntax.is_transfer_syntax else "a TransferSyntaxUID that is no known transfer syntax"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:  # the name is pydicom's, from its registry: never the header's text
        raise DecodeError(f"expected a transfer syntax with a pixel decoder, got {name} in {source}") from e
    if not decoder.is_available:
        raise DecodeError(
            f"expected an installed decoder for {name}, none available (missing {decoder.missing_dependencies}) in {source}"
        )


def stored_values(ds: Any, *, source: str) -> np.ndarray:
    """Stored pixel values, (H, W) or (H, W, 3), with bits above BitsStored cleared / sign-extended."""
    try:
        arr = ds.pixel_array
    except _PIXEL_ERRORS as e:
        raise DecodeError(f"expected decodable DICOM pixel data, got {type(e).__name__} in {source}") from e
    bits_stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.dtype.kind in "ui" and bits_stored < arr.dtype.itemsize * 8:
        if arr.dtype.kind == "u":
            arr = arr & np.array((1 << bits_stored) - 1, arr.dtype)
        else:
            shift = arr.dtype.itemsize * 8 - bits_stored
            arr = (arr << shift) >> shift
    return arr


def window_output_range(ds: Any) -> tuple[float, float]:
    """Output range of pydicom's apply_windowing: the modality-LUT output range (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


def check_rescale(ds: Any, *, source: str) -> None:
    """Refuse RescaleSlope / RescaleIntercept that would make every pixel the same or not a number."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword not in ds:
            continue
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError) as e:
            raise DecodeError(f"expected a number in {keyword}, got none in {source}") from e
        if not math.isfinite(value) or abs(value) > MAX_RESCALE or (keyword == "RescaleSlope" and value == 0):
            raise DecodeError(f"expected a finite{' non-zero' if keyword == 'RescaleSlope' else ''} {keyword} "
                              f"of at most {MAX_RESCALE:g} in size, got another in {source}")


def dicom_gray_to_u16(ds: Any, arr: np.ndarray, *, source: str) -> tuple[np.ndarray, list[str]]:
    """Modality LUT, then VOI LUT or first window, then uint16 full range (before inversion)."""
    notes: list[str] = []
    check_rescale(ds, source=source)
    try:
        values = apply_modality_lut(arr, ds)
    except _PIXEL_ERRORS as e:
        raise DecodeError(f"expected a usable modality LUT / rescale, got {type(e).__name__} in {source}") from e
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DecodeError(f"expected finite values after the modality LUT / rescale, got some that are not in {source}")
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_lut or has_window):
        return stretch_to_u16(values), notes
    if has_lut:
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        lo, hi = window_output_range(ds)
    try:
        voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except _PIXEL_ERRORS as e:
        logger.warning("ignoring unusable VOI LUT / window (%s) in %s", type(e).__name__, source)
        notes.append("voi_ignored")
        return stretch_to_u16(values), notes
    return range_to_u16(voi, lo, hi), notes


def decode_dicom(data: bytes, *, source: str, cfg: DecodeConfig) -> Decoded:
    """DICOM bytes -> Decoded. See the module docstring for the order of operations."""
    with _quiet_pydicom():
        return _decode_dicom(data, source=source, cfg=cfg)


def _decode_dicom(data: bytes, *, source: str, cfg: DecodeConfig) -> Decoded:
    ds = read_dicom(data, source=source)
    rows, cols, frames = dicom_geometry(ds, source=source)
    if frames > 1:
        raise DecodeError(f"expected a single radiograph, got a multi-frame DICOM (NumberOfFrames above 1) in {source}")
    check_size(rows, cols, frames, source=source, cfg=cfg)
    check_codec(ds, source=source)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = stored_values(ds, source=source)
    notes: list[str] = []
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except _PIXEL_ERRORS as e:
            raise DecodeError(f"expected a usable palette colour LUT, got {type(e).__name__} in {source}") from e
    if arr.ndim == 3 and arr.shape[-1] == 3:
        # pydicom returns RGB for YBR_* by default; modality / VOI LUTs apply to grayscale only.
        pixels, notes = stretch_to_u16(rgb_to_gray(arr)), ["rgb_to_gray"]
    elif arr.ndim == 2:
        pixels, notes = dicom_gray_to_u16(ds, arr, source=source)
    else:
        raise DecodeError(f"expected a 2-D grayscale or RGB pixel array, got shape {arr.shape} in {source}")
    if photometric == "MONOCHROME1":
        pixels = U16_MAX - pixels
        if cfg.fix_polarity and looks_inverted(pixels):
            logger.info("MONOCHROME1 header on MONOCHROME2-looking pixels, not inverting: %s", source)
            pixels = U16_MAX - pixels
            notes.append("polarity_corrected")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        notes.append(NOTE_BURNED_IN)
    return Decoded(
        pixels=np.ascontiguousarray(pixels, dtype=np.uint16),
        format="dicom",
        bits_stored=int(ds.get("BitsStored") or 8),
        header={keyword: ds.get(keyword) for keyword in HEADER_KEYWORDS},
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF

_RASTER_HEADERS = {"png": png_header, "jpeg": jpeg_header, "tiff": tiff_header}
_IMREAD_CONVERT = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH  # colour, palette or alpha -> one gray channel
_IMREAD_AS_IS = cv2.IMREAD_UNCHANGED  # a plain gray PNG: no conversion pass (20% faster at 2k x 2k, 16 bit)
PNG_SBIT = b"sBIT"
PNG_IDAT = b"IDAT"


def png_significant_bits(data: bytes) -> int | None:
    """The gray significant bits from a PNG's sBIT chunk (PNG 1.2, 11.3.3.4), or None without one.

    Chunks are walked from the signature to the first IDAT (sBIT must come before it).
    """
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == PNG_IDAT:
            return None
        if kind == PNG_SBIT and length >= 1 and pos + 9 <= len(data):
            return data[pos + 8]
        pos += 12 + length
    return None


def to_full_range(img: np.ndarray, bits: int) -> np.ndarray:
    """uint16 (H, W) holding ``bits``-bit values (0 .. 2**bits - 1) -> uint16 round(v * 65535 / (2**bits - 1))."""
    return cv2.multiply(img, U16_MAX / ((1 << bits) - 1), dtype=cv2.CV_16U)  # rounds and saturates; 3x a LUT's speed


def significant_bits(img: np.ndarray, sbit: int | None) -> tuple[np.ndarray, int]:
    """A 16-bit gray image with fewer significant bits -> (the image over the full uint16 range, its bits).

    Many exports store 10-, 12- or 14-bit data unscaled in a 16-bit PNG (values 0..4095 for 12 bits);
    keeping the high byte of those for an 8-bit output would leave 16 grey levels. The bits come from
    sBIT when the values fit in it; without sBIT, from the largest value (at least 8 bits). Values
    that already use the top bits (an encoder that scaled them, as the PNG spec asks) are kept.
    """
    top = int(img.max()) if img.size else 0
    if sbit is not None and 0 < sbit < 16 and top < (1 << sbit):
        bits = sbit
    elif sbit is None:
        bits = max(8, top.bit_length())
    else:
        return img, sbit if 0 < sbit < 16 else 16
    return (to_full_range(img, bits), bits) if bits < 16 else (img, 16)


def raster_notes(fmt: str, header: RasterHeader) -> list[str]:
    """QC notes for the colour conversion OpenCV's IMREAD_GRAYSCALE does for us."""
    notes: list[str] = []
    if header.palette:
        notes.append("palette_to_gray")
    colour_channels = header.channels - (1 if header.has_alpha else 0)
    if fmt == "jpeg" and header.channels == 4:
        notes.append("cmyk_to_gray")
    elif colour_channels >= 3:
        notes.append("rgb_to_gray")
    if header.has_alpha or (fmt == "tiff" and header.channels in (2, 4)):
        notes.append("alpha_dropped")
    return notes


def decode_raster(data: bytes, fmt: str, *, source: str, cfg: DecodeConfig) -> Decoded:
    """PNG / JPEG / TIFF bytes -> Decoded via cv2.imdecode (gray, 8 or 16 bit kept).

    8-bit images stay uint8; 16-bit images are uint16 over the full range (see ``significant_bits``).
    Colour is converted to gray by OpenCV (BT.601 weights); alpha is dropped, not composited.
    """
    header = _RASTER_HEADERS[fmt](data, source=source)
    check_size(header.height, header.width, 1, source=source, cfg=cfg)
    plain_gray = fmt == "png" and header.channels == 1 and not header.palette
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_AS_IS if plain_gray else _IMREAD_CONVERT)
    if img is None:
        raise DecodeError(f"expected a complete {fmt.upper()} image, OpenCV could not decode it (truncated or corrupt) in {source}")
    notes = raster_notes(fmt, header)
    if img.ndim == 2 and img.shape == (header.width, header.height) != (header.height, header.width):
        notes.append(NOTE_EXIF_ROTATED)  # OpenCV applied an EXIF Orientation of 90 or 270 degrees
    elif img.ndim != 2 or img.shape != (header.height, header.width):
        raise DecodeError(
            f"expected a {header.height}x{header.width} gray image as the header says, got shape {img.shape} in {source}"
        )
    if img.dtype == np.uint8:
        pixels, bits = img, min(header.bits, 8)
    elif img.dtype == np.uint16:
        pixels, bits = significant_bits(img, png_significant_bits(data) if fmt == "png" else None)
    else:
        raise DecodeError(f"expected 8- or 16-bit unsigned samples, got {img.dtype} in {source}")
    return Decoded(pixels=pixels, format=fmt, bits_stored=bits, notes=tuple(notes))


# ----------------------------------------------------------------------------- entry point


def decode_image(data: bytes, *, source: str, cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Decode one image file's bytes; ``source`` names it in error messages (path or URI).

    Returns uint8 (8-bit PNG/JPEG/TIFF) or uint16 (H, W), brighter = denser. Raises DecodeError on
    anything that is not a single, decodable, reasonably sized radiograph.
    """
    if not data:
        raise DecodeError(f"expected image bytes, got an empty file: {source}")
    fmt = sniff_format(data[: DICOM_PREAMBLE_BYTES + 4])
    if fmt is None:
        raise DecodeError(
            f"not a recognised image (DICOM/PNG/JPEG/TIFF): starts with {data[:HEAD_ECHO_BYTES]!r} in {source}"
        )
    decoded = decode_dicom(data, source=source, cfg=cfg) if fmt == "dicom" else decode_raster(data, fmt, source=source, cfg=cfg)
    lo, hi, _, _ = cv2.minMaxLoc(decoded.pixels)
    if lo == hi:
        raise DecodeError(f"expected an image, got every pixel the same value in {source}")
    return decoded
