"""Do today's masks agree with those of an older checkout? Dice per image, on the samples and the shared sets.

    git worktree add /tmp/before ea99c35
    python benchmarks/masks_against_before.py /tmp/before [--shared ../shared/data]

Both sides decode, prepare, run the shipped model on the CPU (the same precision choice) and refine,
each with its own code; the older side runs in a subprocess with the checkout first on sys.path.
Prints the lowest and mean Dice per set and the five lowest images.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# Runs in the older checkout: its decode_image, prepare_input (pipeline.model), Segmenter.predict, refine_mask.
BEFORE = """
import sys, numpy as np
from pathlib import Path
from pipeline.decode import decode_image
from pipeline.model import prepare_input
from pipeline.refine import refine_mask
from pipeline.segment import Segmenter
seg = Segmenter(device="cpu")
out = {}
for f in Path(sys.argv[1]).read_text().splitlines():
    px = decode_image(Path(f).read_bytes(), source=f).pixels
    out[f] = np.packbits(refine_mask(seg.predict(prepare_input(px, seg.meta)[None])[0], px.shape) > 0)
np.savez(sys.argv[2], **out)
"""


def inputs(shared: Path) -> dict[str, list[Path]]:
    sets = {"samples": sorted((REPO / "samples" / "xrays").iterdir())}
    if shared.is_dir():
        sets["jsrt"] = sorted((shared / "external" / "jsrt" / "images").iterdir())
        sets["shenzhen"] = sorted((shared / "external" / "shenzhen" / "images").iterdir())
        sets["dicom"] = sorted(p for p in (shared / "dicom").rglob("*") if p.is_file())
        with (shared / "covid-qu-ex" / "manifest.csv").open(newline="") as f:
            sets["covid-qu-ex Val"] = [shared / "covid-qu-ex" / r["image"] for r in csv.DictReader(f) if r["split"] == "Val"]
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tree", help="the older checkout")
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    from pipeline.decode import decode_image
    from pipeline.evaluate import dice
    from pipeline.model_input import prepare_input
    from pipeline.refine import refine
    from pipeline.segment import Segmenter

    sets = inputs(Path(args.shared))
    files = [str(f) for paths in sets.values() for f in paths]
    with tempfile.TemporaryDirectory() as tmp:
        listing, result = Path(tmp, "files.txt"), Path(tmp, "before.npz")
        listing.write_text("\n".join(files))
        env_path = str(Path(args.tree).resolve())
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r})\n" + BEFORE,
                        str(listing), str(result)], check=True)
        before = dict(np.load(result))
    seg = Segmenter(device="cpu")
    scores: dict[str, list[tuple[float, str]]] = {}
    for name, paths in sets.items():
        for f in paths:
            px = decode_image(f.read_bytes(), source=str(f)).pixels
            mask = refine(seg({"model_input": prepare_input(px, seg.meta)[None]})["lung_prob"][0], px.shape)[0]
            old = np.unpackbits(before[str(f)])[: mask.size].reshape(mask.shape)
            scores.setdefault(name, []).append((dice(mask, old), f.name))
    for name, s in scores.items():
        values = [d for d, _ in s]
        print(f"{name:16s} {len(values):5d} images  lowest Dice {min(values):.5f}  mean {np.mean(values):.6f}")
    print("lowest:", sorted(x for s in scores.values() for x in s)[:5])


if __name__ == "__main__":
    main()
