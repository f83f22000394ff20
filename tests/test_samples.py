"""The checked-in sample images are documented, unaltered, paired with masks, and small.

An undocumented or altered file under samples/ fails here: every file must have a row in
samples/PROVENANCE.md whose sha256 matches its bytes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
PROVENANCE_MD = SAMPLES_DIR / "PROVENANCE.md"
XRAYS_DIR = SAMPLES_DIR / "xrays"
MASKS_DIR = SAMPLES_DIR / "masks"

MAX_TOTAL_BYTES = 3_500_000  # whole samples/ folder, bytes
MAX_FILE_BYTES = 1_000_000  # any one sample file, bytes
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}  # images that come with a ground-truth mask
MASK_VALUES = {0, 255}  # allowed mask pixel values

# A table row of PROVENANCE.md: "| xrays/name.ext | ... | <64 hex digits> |"
_ROW = re.compile(r"^\|\s*((?:xrays|masks)/[^|\s]+)\s*\|.*\|\s*([0-9a-f]{64})\s*\|\s*$")


def _documented() -> dict[str, str]:
    """Relative path under samples/ -> sha256 hex, from the PROVENANCE.md table."""
    rows: dict[str, str] = {}
    for line in PROVENANCE_MD.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line.strip())
        if m:
            path, digest = m.groups()
            if path in rows:
                raise ValueError(f"{path} is listed twice in {PROVENANCE_MD}")
            rows[path] = digest
    return rows


def _on_disk() -> list[str]:
    """Relative paths of every file under samples/xrays and samples/masks."""
    return sorted(
        p.relative_to(SAMPLES_DIR).as_posix()
        for d in (XRAYS_DIR, MASKS_DIR)
        for p in d.rglob("*")
        if p.is_file()
    )


def _rasters() -> list[Path]:
    return sorted(p for p in XRAYS_DIR.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_samples_exist():
    assert _rasters(), f"no PNG/JPEG samples in {XRAYS_DIR}"
    assert any(p.suffix == ".dcm" for p in XRAYS_DIR.iterdir()), f"no DICOM samples in {XRAYS_DIR}"


def test_every_file_is_documented_and_every_row_has_a_file():
    documented = set(_documented())
    on_disk = set(_on_disk())
    assert on_disk - documented == set(), "files missing from PROVENANCE.md"
    assert documented - on_disk == set(), "PROVENANCE.md lists files that are not there"


@pytest.mark.parametrize("rel_path", _on_disk())
def test_sha256_matches_provenance(rel_path: str):
    expected = _documented().get(rel_path)
    assert expected is not None, f"{rel_path} has no row in {PROVENANCE_MD.name}"
    assert _sha256(SAMPLES_DIR / rel_path) == expected, f"{rel_path} differs from its documented sha256"


@pytest.mark.parametrize("rel_path", _on_disk())
def test_file_names_are_shell_friendly(rel_path: str):
    assert re.fullmatch(r"[A-Za-z0-9_./-]+", rel_path), f"spaces or odd characters in {rel_path!r}"


@pytest.mark.parametrize("image_path", _rasters(), ids=lambda p: p.name)
def test_image_has_binary_mask_of_same_shape(image_path: Path):
    mask_path = MASKS_DIR / f"{image_path.stem}.png"
    assert mask_path.is_file(), f"no mask {mask_path.name} for {image_path.name}"

    image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"OpenCV could not decode {image_path}"
    assert mask is not None, f"OpenCV could not decode {mask_path}"

    assert mask.ndim == 2 and mask.dtype == np.uint8, (
        f"expected a uint8 (H, W) mask, got {mask.dtype} {mask.shape} in {mask_path.name}"
    )
    assert mask.shape == image.shape, f"{mask_path.name} {mask.shape} vs image {image.shape}"
    values = set(np.unique(mask).tolist())
    assert values == MASK_VALUES, f"expected mask values {MASK_VALUES}, got {sorted(values)}"


def test_every_mask_belongs_to_an_image():
    image_stems = {p.stem for p in _rasters()}
    orphans = [p.name for p in MASKS_DIR.iterdir() if p.stem not in image_stems]
    assert orphans == []


def test_samples_are_small():
    sizes = {p: p.stat().st_size for p in SAMPLES_DIR.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < MAX_TOTAL_BYTES, f"samples/ holds {sum(sizes.values())} bytes"
    too_big = [p.name for p, n in sizes.items() if n > MAX_FILE_BYTES]
    assert too_big == []
