"""Test-data generators shared by the decode, privacy and end-to-end tests.

Everything here is synthetic and deterministic: a chest-like phantom, DICOMs written with
pydicom in any of the decode paths, a DICOM full of distinctive PHI values, and a corpus of
bad and odd inputs with the outcome each should have.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import (
    MPEG2MPML,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
NO_CODEC_SYNTAX = MPEG2MPML  # a transfer syntax pydicom 3.0 has no pixel decoder for
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root


# ----------------------------------------------------------------------------- phantom


def phantom_xray(h: int = 256, w: int = 256) -> np.ndarray:
    """uint16 (h, w) chest-like phantom in MONOCHROME2 sense, deterministic.

    Dark background (air, 2000), bright elliptical body (40000), two dark elliptical lungs
    (12000) centred at 30 % and 70 % of the width, a bright mediastinum strip (56000) between
    them, plus a gentle vertical gradient so no two rows are identical.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full((h, w), 2000.0)
    body = ((xx - w / 2) / (0.46 * w)) ** 2 + ((yy - h / 2) / (0.48 * h)) ** 2 <= 1
    img[body] = 40000
    for cx in (0.30 * w, 0.70 * w):
        lung = ((xx - cx) / (0.13 * w)) ** 2 + ((yy - 0.45 * h) / (0.28 * h)) ** 2 <= 1
        img[lung] = 12000
    mediastinum = (np.abs(xx - w / 2) <= 0.06 * w) & (yy >= 0.15 * h) & (yy <= 0.85 * h)
    img[mediastinum] = 56000
    img += 3000 * yy / h
    return img.astype(np.uint16)


# ----------------------------------------------------------------------------- DICOM


def _dataset(pixels: np.ndarray, *, photometric: str, bits_stored: int, frames: int, samples_per_pixel: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.PixelSpacing = [0.2, 0.2]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples_per_pixel
    if samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[-2] if samples_per_pixel == 1 else pixels.shape[-3], (
        pixels.shape[-1] if samples_per_pixel == 1 else pixels.shape[-2]
    )
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    return ds


def write_dicom(
    path: str | os.PathLike,
    *,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frames: int = 1,
    samples_per_pixel: int = 1,
    extra: dict | None = None,
    preamble: bool = True,
) -> Path:
    """Write a real DICOM file with pydicom and return its path.

    pixels: stored values, (H, W) gray or (H, W, 3) RGB (samples_per_pixel=3); with frames > 1
    a 2-D array is repeated per frame. Values must fit in bits_stored (not checked).
    rescale: (slope, intercept). window: (center, width). voi_lut: 1-D uint16 LUT indexed from
    stored value 0, 16-bit output. transfer_syntax: uncompressed ones are written natively,
    compressed ones through pydicom's encoder (RLE Lossless, JPEG-LS / J2K if an encoder is
    installed); a syntax with neither encoder nor decoder (e.g. MPEG2) gets the native
    bytes as a placeholder fragment, which is what a "no codec installed" test needs.
    extra: keyword -> value, or (group, element) -> (VR, value) for private tags.
    preamble=False writes raw ACR-NEMA style: no preamble, no file meta, implicit VR LE.
    """
    path = Path(path)
    ts = UID(transfer_syntax)
    pixels = np.asarray(pixels)
    if samples_per_pixel == 1 and frames > 1 and pixels.ndim == 2:
        pixels = np.repeat(pixels[None], frames, axis=0)
    ds = _dataset(pixels, photometric=photometric, bits_stored=bits_stored, frames=frames, samples_per_pixel=samples_per_pixel)
    dtype = {(8, "u"): np.uint8, (16, "u"): np.uint16, (8, "i"): np.int8, (16, "i"): np.int16}[
        (ds.BitsAllocated, pixels.dtype.kind if pixels.dtype.kind == "i" else "u")
    ]
    stored = pixels.astype(dtype)
    if photometric == "YBR_FULL":
        stored = convert_color_space(stored, "RGB", "YBR_FULL").astype(dtype)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new("LUTData", "US", [int(v) for v in voi_lut])
        ds.VOILUTSequence = [item]
    for key, value in (extra or {}).items():
        if isinstance(key, tuple):
            vr, val = value
            ds.add_new(key, vr, val)
        else:
            setattr(ds, key, value)

    if not preamble:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return path

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    big_endian = ts == ExplicitVRBigEndian and stored.itemsize > 1
    ds.PixelData = (stored.astype(stored.dtype.newbyteorder(">")) if big_endian else stored).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    if ts in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = ts
    else:
        try:
            encoder = get_encoder(ts)
            can_encode = encoder.is_available
        except NotImplementedError:
            can_encode = False
        try:
            can_decode = get_decoder(ts).is_available
        except NotImplementedError:
            can_decode = False
        if can_encode:
            ds.compress(ts, stored)
        elif can_decode:
            raise ValueError(f"expected an installed encoder for {ts.name}, found none")
        else:
            ds.PixelData = encapsulate([stored.tobytes()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- PHI

PHI_VALUES: dict[str, str] = {
    "PatientName": "PHI^PatientName-7f3a",
    "PatientID": "PHI-PatientID-7f3a",
    "PatientBirthDate": "19230417",
    "PatientAddress": "PHI-PatientAddress-7f3a",
    "OtherPatientIDs": "PHI-OtherPatientIDs-7f3a",
    "PatientMotherBirthName": "PHI^MotherBirthName-7f3a",
    "PatientTelephoneNumbers": "PHI-Phone-7f3a",
    "AccessionNumber": "PHI-Acc-7f3a",
    "InstitutionName": "PHI-InstitutionName-7f3a",
    "InstitutionAddress": "PHI-InstitutionAddress-7f3a",
    "InstitutionalDepartmentName": "PHI-Department-7f3a",
    "ReferringPhysicianName": "PHI^ReferringPhysician-7f3a",
    "PerformingPhysicianName": "PHI^PerformingPhysician-7f3a",
    "OperatorsName": "PHI^Operators-7f3a",
    "StationName": "PHI-Station-7f3a",
    "StudyDate": "19990311",
    "StudyTime": "112233.445566",
    "SeriesDate": "19990312",
    "AcquisitionDate": "19990313",
    "ContentDate": "19990314",
    "StudyID": "PHI-StudyID-7f3a",
    "StudyDescription": "PHI-StudyDescription-7f3a",
    "DeviceSerialNumber": "PHI-DeviceSerial-7f3a",
    "StudyInstanceUID": UID_ROOT + "777.1",
    "SeriesInstanceUID": UID_ROOT + "777.2",
    "SOPInstanceUID": UID_ROOT + "777.3",
    "FrameOfReferenceUID": UID_ROOT + "777.4",
}
PRIVATE_CREATOR_TAG = (0x0011, 0x0010)
PRIVATE_VALUE_TAG = (0x0011, 0x1010)
PRIVATE_VALUE = "PHI-PrivateTag-7f3a"


def write_phi_dicom(path: str | os.PathLike) -> list[str]:
    """Write a phantom DICOM carrying every PS3.15 Annex E attribute above, each with a
    distinctive value, plus a private tag; return the values that must never be output."""
    extra: dict = dict(PHI_VALUES)
    extra[PRIVATE_CREATOR_TAG] = ("LO", "PHI-PrivateCreator-7f3a")
    extra[PRIVATE_VALUE_TAG] = ("LO", PRIVATE_VALUE)
    path = write_dicom(path, pixels=phantom_xray(64, 64) >> 4, bits_stored=12, extra=extra)
    return [*PHI_VALUES.values(), "PHI-PrivateCreator-7f3a", PRIVATE_VALUE]


# ----------------------------------------------------------------------------- raster files


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims width x height 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    """cv2.imencode bytes (ext like ".png"), raising if OpenCV refuses."""
    ok, buf = cv2.imencode(ext, img, params or [])
    if not ok:
        raise ValueError(f"expected cv2.imencode to write {ext}, it failed for {img.dtype} {img.shape}")
    return buf.tobytes()


def _u8(img16: np.ndarray) -> np.ndarray:
    return (img16 >> 8).astype(np.uint8)


# ----------------------------------------------------------------------------- bad corpus


def make_bad_corpus(root: str | os.PathLike) -> dict[str, str]:
    """Write bad, odd and good inputs under root; return {relative path: "ok" | "error"}.

    Symlink items (a loop and a dangling link) stand in for unreadable files: tests run as
    root, so chmod 000 would still be readable, and a fifo would block a reader forever.
    They fail at the read step, not in decode_image. One file name is not valid UTF-8
    (os.fsdecode with surrogateescape); one has spaces and parentheses.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    phantom = phantom_xray(64, 64)
    rgb = np.stack([_u8(phantom), _u8(phantom) // 2, _u8(phantom) // 3], axis=-1)
    out: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (root / name).write_bytes(data)
        out[name] = outcome

    good_png = encode(".png", _u8(phantom))
    good_dcm = root / "good.dcm"
    write_dicom(good_dcm, pixels=phantom >> 4, bits_stored=12)
    out["good.dcm"] = "ok"

    # Good and valid-but-odd inputs.
    put("good.png", good_png, "ok")
    put("good.jpg", encode(".jpg", _u8(phantom)), "ok")
    put("good.tiff", encode(".tiff", phantom), "ok")
    put("png16.png", encode(".png", phantom), "ok")
    put("alpha.png", encode(".png", np.dstack([rgb, np.full(phantom.shape, 128, np.uint8)])), "ok")
    put("rgb.png", encode(".png", rgb), "ok")
    put("progressive.jpg", encode(".jpg", _u8(phantom), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), "ok")
    put("cmyk.jpg", cmyk_jpeg(64, 64), "ok")
    put("name with spaces (1).png", good_png, "ok")
    odd = os.fsdecode(b"bad_name_\xff\xfe.png")
    put(odd, good_png, "ok")
    write_dicom(root / "mono1_rle.dcm", pixels=4095 - (phantom >> 4), photometric="MONOCHROME1", transfer_syntax="1.2.840.10008.1.2.5")
    out["mono1_rle.dcm"] = "ok"
    write_dicom(root / "acr_nema.dcm", pixels=phantom >> 4, preamble=False)
    out["acr_nema.dcm"] = "ok"
    write_dicom(root / "rgb.dcm", pixels=rgb, photometric="RGB", bits_stored=8, samples_per_pixel=3)
    out["rgb.dcm"] = "ok"
    write_dicom(root / "ybr_full.dcm", pixels=rgb, photometric="YBR_FULL", bits_stored=8, samples_per_pixel=3)
    out["ybr_full.dcm"] = "ok"

    # Bad inputs.
    put("empty.png", b"", "error")
    put("truncated.png", good_png[: len(good_png) // 2], "error")
    dcm_bytes = good_dcm.read_bytes()
    put("truncated.dcm", dcm_bytes[: len(dcm_bytes) - 3000], "error")
    put("text.png", b"hello, I am a text file pretending to be a PNG\n" * 4, "error")
    put("text.dcm", b"patient notes: not a DICOM at all\n" * 8, "error")
    put("bomb.png", bomb_png(), "error")
    put("tiny_1x1.png", encode(".png", np.zeros((1, 1), np.uint8)), "error")
    put("tiny_8x8.png", encode(".png", np.zeros((8, 8), np.uint8)), "error")
    put("jpeg_header_only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9", "error")
    put("dicm_garbage.dcm", b"\x00" * 128 + b"DICM" + b"\xff" * 64, "error")
    no_pixels = root / "no_pixel_data.dcm"
    write_dicom(no_pixels, pixels=phantom >> 4)
    _strip_pixel_data(no_pixels)
    out["no_pixel_data.dcm"] = "error"
    write_dicom(root / "multiframe.dcm", pixels=phantom >> 4, frames=3)
    out["multiframe.dcm"] = "error"
    write_dicom(root / "no_codec_mpeg2.dcm", pixels=phantom >> 4, transfer_syntax=NO_CODEC_SYNTAX)
    out["no_codec_mpeg2.dcm"] = "error"

    # Read-level failures (not decode_image's business).
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    out["loop_a.png"] = out["loop_b.png"] = "error"
    os.symlink("does_not_exist.png", root / "dangling.png")
    out["dangling.png"] = "error"
    return out


def _strip_pixel_data(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------- CMYK JPEG

# Standard luminance DC / AC Huffman tables (ITU T.81 K.3): code lengths per bit count, symbols.
_DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
_DC_VALS = list(range(12))
_AC_BITS = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]
_AC_VALS_HEAD = [0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12]  # EOB (0x00) is the 4th code


def _huffman_codes(bits: list[int], vals: list[int]) -> dict[int, tuple[int, int]]:
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            if k < len(vals):
                codes[vals[k]] = (code, length)
            k += 1
            code += 1
        code <<= 1
    return codes


K_STEP = 24  # black ink added per 8-px block column in cmyk_jpeg


def cmyk_jpeg(h: int = 64, w: int = 64, cmyk: tuple[int, int, int, int] = (30, 60, 90, 40)) -> bytes:
    """A baseline 4-component (Adobe CMYK, no transform) JPEG, darker to the right, by hand.

    OpenCV cannot write CMYK; this minimal encoder writes DC-only blocks (all AC = 0) with the
    standard Huffman tables, quantisation 1, no subsampling. h and w must be multiples of 8.
    """
    full_ac = _AC_VALS_HEAD + [0] * (sum(_AC_BITS) - len(_AC_VALS_HEAD))  # only EOB is used
    dc_codes, ac_codes = _huffman_codes(_DC_BITS, _DC_VALS), _huffman_codes(_AC_BITS, _AC_VALS_HEAD)
    eob = ac_codes[0x00]
    bits: list[tuple[int, int]] = []
    blocks = (h // 8) * (w // 8)
    # Level-shifted DC of a flat block = 8 * (value - 128). Adobe CMYK is stored inverted.
    # K grows by K_STEP per block column so the image is not flat.
    prev = [0, 0, 0, 0]
    for b in range(blocks):
        ink = [*cmyk[:3], min(255, cmyk[3] + K_STEP * (b % (w // 8)))]
        for c in range(4):
            dc = 8 * ((255 - ink[c]) - 128)
            diff = dc - prev[c]
            prev[c] = dc
            size = int(abs(diff)).bit_length()
            bits.append(dc_codes[size])
            if size:
                bits.append((diff if diff > 0 else diff + (1 << size) - 1, size))
            bits.append(eob)
    acc, nacc, scan = 0, 0, bytearray()
    for value, length in bits:
        acc = (acc << length) | value
        nacc += length
        while nacc >= 8:
            byte = (acc >> (nacc - 8)) & 0xFF
            scan.append(byte)
            if byte == 0xFF:
                scan.append(0)
            nacc -= 8
    if nacc:
        byte = ((acc << (8 - nacc)) | ((1 << (8 - nacc)) - 1)) & 0xFF
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0)

    def seg(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    app14 = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)  # transform 0: CMYK, not YCCK
    dqt = b"\x00" + b"\x01" * 64
    sof = struct.pack(">BHHB", 8, h, w, 4) + b"".join(struct.pack(">BBB", i + 1, 0x11, 0) for i in range(4))
    dht = b"\x00" + bytes(_DC_BITS) + bytes(_DC_VALS) + b"\x10" + bytes(_AC_BITS) + bytes(full_ac)
    sos = struct.pack(">B", 4) + b"".join(struct.pack(">BB", i + 1, 0x00) for i in range(4)) + b"\x00\x3f\x00"
    return (
        b"\xff\xd8" + seg(0xEE, app14) + seg(0xDB, dqt) + seg(0xC0, sof) + seg(0xC4, dht) + seg(0xDA, sos)
        + bytes(scan) + b"\xff\xd9"
    )


# ----------------------------------------------------------------------------- hostile corpus (issue #14)

PATIENT_FOLDER = "PHI-PatientName-7f3a"  # a folder named after a patient, as sites do
FREE_TEXT_VIEW = "SMITHJOHN1961"  # free text where ViewPosition wants a defined term
FRAMES_TEXT = "PHI-Frames-7f3a"  # text where NumberOfFrames wants a number
SECRET_SYNTAX = "1.2.3.19610417"  # an unknown TransferSyntaxUID carrying a birth date


def _exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding one tag: Orientation (0x0112)."""
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def make_hostile_corpus(root: str | os.PathLike) -> tuple[dict[bytes, str], list[str]]:
    """The bad corpus plus the cases of issue #14, under root.

    Returns ({raw relative path (bytes): "ok" | "error"}, the planted values that must appear in no
    byte of the output). Names include two distinct files whose old escaped names were equal, a
    folder whose name is not UTF-8 and a folder named after a patient.
    """
    import pydicom

    root = Path(root)
    outcome = {os.fsencode(k): v for k, v in make_bad_corpus(root).items()}
    phantom = phantom_xray(64, 64)
    good_png = encode(".png", _u8(phantom))

    def put(rel: bytes, data: bytes, result: str) -> None:
        path = Path(os.fsdecode(os.fsencode(root) + b"/" + rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        outcome[rel] = result

    def dicom(rel: bytes, result: str, **kwargs) -> Path:
        path = Path(os.fsdecode(os.fsencode(root) + b"/" + rel))
        write_dicom(path, pixels=phantom >> 4, bits_stored=12, **kwargs)
        outcome[rel] = result
        return path

    put(b"a\xff.png", good_png, "ok")
    put(b"a\\xff.png", encode(".png", cv2.add(_u8(phantom), 1)), "ok")  # was the same source_path as the one above
    put(b"dir_\xe9/x.png", encode(".png", cv2.add(_u8(phantom), 2)), "ok")
    put(PATIENT_FOLDER.encode() + b"/chest.png", encode(".png", cv2.add(_u8(phantom), 3)), "ok")
    put(b"exif6.jpg", _exif_orientation(encode(".jpg", _u8(phantom_xray(48, 64))), 6), "ok")  # not square: it turns
    put(b"flat.png", encode(".png", np.full((64, 64), 9, np.uint8)), "error")
    put(b"png12bit.png", encode(".png", phantom >> 4), "ok")
    dicom(b"rescale_zero.dcm", "error", rescale=(0.0, 0.0))
    dicom(b"rescale_nan.dcm", "error", rescale=(float("nan"), 0.0))
    dicom(b"burned_in.dcm", "ok", extra={"BurnedInAnnotation": "YES"})
    dicom(b"free_text_view.dcm", "ok", extra={"ViewPosition": FREE_TEXT_VIEW})
    frames = dicom(b"frames_text.dcm", "error")
    ds = pydicom.dcmread(frames)
    ds[0x00280008] = pydicom.DataElement(0x00280008, "LO", FRAMES_TEXT)
    ds.save_as(frames, enforce_file_format=False)
    syntax = dicom(b"syntax_secret.dcm", "error")
    ds = pydicom.dcmread(syntax)
    ds.file_meta.TransferSyntaxUID = SECRET_SYNTAX
    ds.save_as(syntax, enforce_file_format=False)
    secrets = write_phi_dicom(root / "phi.dcm")
    outcome[b"phi.dcm"] = "ok"
    return outcome, [*secrets, PATIENT_FOLDER, FREE_TEXT_VIEW, FRAMES_TEXT, SECRET_SYNTAX]
