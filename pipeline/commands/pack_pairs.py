"""Pack image/mask pairs into one .npz to ship to a training machine.

    xray-lung-prep pack-pairs --data /work/shared/data/covid-qu-ex/manifest.csv --out .gpu/covid_qu_ex.npz

Layout (loads with np.load(allow_pickle=False); read by pipeline.training.data.load_packed):
  jpeg_data uint8 (B,) + jpeg_offsets int64 (N+1,)  images as concatenated JPEG files (--encoding jpeg), or
  images uint8 (N, S, S)                             raw pixels (--encoding raw)
  masks_packed uint8 (N, S, ceil(S/8)), mask_width    np.packbits(mask, axis=-1)
  names, split ("train"/"val"), source                 unicode arrays / string

Measured on COVID-QU-Ex (4,660 pairs at 256 px): raw pixels deflate to ~200 MiB, PNG ~134 MiB,
JPEG q95 ~72 MiB, q90 ~55 MiB, q85 ~40 MiB; masks ~2.4 MiB. The default, JPEG quality 85, keeps the
repository plus data under 60 MiB; its artifacts are far below the augmentation's blur and noise.
Images whose side is not --size are resized (INTER_AREA; masks likewise, then re-thresholded).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import HelpFormatter
from pipeline.training import load_pairs

log = logging.getLogger("pack_pairs")

DEFAULT_QUALITY = 85  # JPEG quality; see the measurements above
DEFAULT_SIZE = 256  # px, side of the packed images


def to_u8(img: np.ndarray, size: int) -> np.ndarray:
    """uint8/uint16 (H, W) -> uint8 (size, size); uint16 is min-max stretched."""
    if img.shape != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if img.dtype == np.uint8:
        return img
    lo, hi = float(img.min()), float(img.max())
    return np.rint((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)


def pack(data: str, out: Path, *, encoding: str = "jpeg", quality: int = DEFAULT_QUALITY,
         size: int = DEFAULT_SIZE, val_fraction: float = 0.2) -> dict:
    pairs = load_pairs(data, val_fraction=val_fraction)
    images = [to_u8(img, size) for img in pairs.images]
    masks = np.stack([m if m.shape == (size, size) else
                      cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5
                      for m in pairs.masks])
    arrays = {
        "masks_packed": np.packbits(masks, axis=-1),
        "mask_width": np.int64(size),
        "names": np.array(pairs.names),
        "split": np.array(pairs.split),
        "source": np.array(pairs.source),
    }
    if encoding == "jpeg":
        blobs = []
        for name, img in zip(pairs.names, images):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"JPEG encoding failed for {name!r}")
            blobs.append(buf.ravel())
        arrays["jpeg_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays["jpeg_data"] = np.concatenate(blobs)
    else:
        arrays["images"] = np.stack(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    stats = {"pairs": len(images), "train": pairs.split.count("train"), "val": pairs.split.count("val"),
             "bytes": out.stat().st_size}
    log.info("wrote %s: %d pairs (%d train, %d val), %.1f MiB", out, stats["pairs"], stats["train"], stats["val"],
             stats["bytes"] / 2**20)
    return stats


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="manifest .csv, Parquet, or folder with images/ and masks/")
    p.add_argument("--out", required=True, type=Path, help="output .npz")
    p.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality 1-100")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="side of the packed images in px")
    p.add_argument("--val-fraction", type=float, default=0.2, help="val share when the data has no split")
    args = p.parse_args(argv)
    pack(args.data, args.out, encoding=args.encoding, quality=args.quality, size=args.size,
         val_fraction=args.val_fraction)
    return 0

