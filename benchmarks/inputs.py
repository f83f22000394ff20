"""Benchmark inputs made from the bundled samples (samples/xrays), so every machine makes the same ones.

    xray_mix(root, n_1k, n_2k)   16-bit PNGs of about 1k and 2k px a side, each a real sample resized,
                                 with noise so that PNG decoding and encoding cost what real films cost
    small_xrays(root, n)         8-bit PNGs of 256 px, each with distinct content
    invalid_files(root, n)       16-byte files that are no image: every one becomes an error row
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.decode import decode_image

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "xrays"
NOISE_U16 = 200  # sigma of the added Gaussian noise, uint16 levels (about 3 levels of a 12-bit film)
SIDE_JITTER = (0.92, 1.08)  # each side is the nominal side times a factor drawn from this range
SMALL_SIDE = 256  # px


def sample_pixels() -> list[np.ndarray]:
    """The bundled samples, decoded (uint8 or uint16 (H, W))."""
    return [decode_image(p.read_bytes(), source=p.name).pixels for p in sorted(SAMPLES.iterdir())]


def as_u16(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) * (257.0 if img.dtype == np.uint8 else 1.0)


def xray_mix(root: Path, n_1k: int, n_2k: int, *, seed: int = 0) -> list[Path]:
    """n_1k images of about 1024 px and n_2k of about 2048 px a side, 16-bit gray PNG, named 1k_NNNN / 2k_NNNN."""
    rng = np.random.default_rng(seed)
    bases = [as_u16(p) for p in sample_pixels()]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_1k + n_2k):
        side, tag = (1024, "1k") if i < n_1k else (2048, "2k")
        paths.append(write_xray(root / f"{tag}_{i:05d}.png", bases[i % len(bases)], side, rng))
    return paths


def write_xray(path: Path, base: np.ndarray, side: int, rng: np.random.Generator) -> Path:
    """`base` (float32 on the uint16 scale) resized to about `side` px a side (SIDE_JITTER), with noise, as a
    16-bit gray PNG at `path`."""
    h, w = (int(side * rng.uniform(*SIDE_JITTER)) for _ in range(2))
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, NOISE_U16, img.shape).astype(np.float32)
    cv2.imwrite(str(path), np.clip(img, 0, 65535).astype(np.uint16))
    return path


def small_xrays(root: Path, n: int, *, seed: int = 0) -> list[Path]:
    """n 8-bit gray PNGs of SMALL_SIDE px: the samples resized, each with its own noise (distinct sha256)."""
    rng = np.random.default_rng(seed)
    bases = [cv2.resize((as_u16(p) / 257).astype(np.uint8), (SMALL_SIDE, SMALL_SIDE), interpolation=cv2.INTER_AREA)
             for p in sample_pixels()]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = cv2.add(bases[i % len(bases)], rng.integers(0, 3, (SMALL_SIDE, SMALL_SIDE), dtype=np.uint8))
        path = root / f"{i // 1000:03d}" / f"small_{i:06d}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def invalid_files(root: Path, n: int, *, seed: int = 0) -> list[Path]:
    """n files of 16 random bytes (no image format starts like that)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"{i // 1000:03d}" / f"junk_{i:06d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"junk" + rng.bytes(12))
        paths.append(path)
    return paths
