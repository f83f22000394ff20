"""Draw docs/figure.png from a job's output: source, mask overlay, and each variant, side by side.

    python docs/make_figure.py out/demo docs/figure.png covidqu_covid_1905.jpg jsrt_JPCLN013.png txv_Fake_MONOHR1.dcm
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.decode import decode_image
from pipeline.png import decode_png
from pipeline.variants import to_bit_depth

TILE_PX = 220  # side of one tile


def fit(img: np.ndarray) -> np.ndarray:
    """Any gray/BGR image -> BGR uint8 tile, aspect kept, letterboxed."""
    if img.dtype != np.uint8:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    s = TILE_PX / max(h, w)
    img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((TILE_PX, TILE_PX, 3), np.uint8)
    y, x = (TILE_PX - img.shape[0]) // 2, (TILE_PX - img.shape[1]) // 2
    tile[y:y + img.shape[0], x:x + img.shape[1]] = img
    return tile


def main(output: str, figure: str, *names: str) -> None:
    rows = {r["source_path"]: r for p in sorted(Path(output, "images").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()}
    variants = [c[:-4] for c in pq.read_schema(next(Path(output, "images").glob("part-*.parquet"))).names
                if c.endswith("_png") and c != "mask_png"]
    lines = []
    for name in names:
        r = rows[name]
        src = Path("samples/xrays", name)
        source = to_bit_depth(decode_image(src.read_bytes(), source=name).pixels, 8)
        mask = decode_png(r["mask_png"])
        over = cv2.cvtColor(source, cv2.COLOR_GRAY2BGR)
        over[mask > 0] = (0.6 * over[mask > 0] + 0.4 * np.array([0, 0, 255])).astype(np.uint8)
        lines.append(np.hstack([fit(source), fit(over)] + [fit(decode_png(r[f"{v}_png"])) for v in variants]))
    cv2.imwrite(figure, np.vstack(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
