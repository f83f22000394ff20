"""Measure the lung model through the real pipeline on labelled sets (images/ + masks/).

    xray-lung-prep evaluate --set val=../shared/data/covid-qu-ex:Val \
        --set jsrt=../shared/data/external/jsrt --set shenzhen=../shared/data/external/shenzhen \
        --output out/eval [--model PATH]

Each image goes through decode, segment and refine on Ray exactly as in jobs/preprocess.py; the
refined mask is compared with the ground truth at the source resolution. Writes report.json,
report.md (with how well quality_score ranks the masks: Spearman against Dice), per_image.csv and
worst_<set>.png (contact sheet of the lowest quality_score, lowest first: green truth, red prediction).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from pathlib import Path

import cv2
import pyarrow as pa

from pipeline.cli import HelpFormatter
from pipeline.config import JobConfig, SegmentConfig
from pipeline.dataset import build_dataset
from pipeline.decode import decode_image
from pipeline.discover import SourceFile
from pipeline.evaluate import (
    LabelledSet,
    contact_sheet,
    image_mask_pairs,
    overlay,
    read_mask,
    relative_name,
    score,
    spearman,
    summarize,
)
from pipeline.model import read_weights
from pipeline.png import decode_png
from pipeline.quality import QC_LOW_QUALITY

log = logging.getLogger("evaluate")

SCORE_SCHEMA = pa.schema([
    pa.field("source_path", pa.string()),
    pa.field("dice", pa.float64()),
    pa.field("iou", pa.float64()),
    pa.field("quality_score", pa.float64()),
    pa.field("qc_flags", pa.list_(pa.string())),
    pa.field("mask_png", pa.binary()),
    pa.field("error", pa.string()),
])


def parse_set(text: str) -> LabelledSet:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=ROOT[:SPLIT], got {text!r}")
    root, _, split = rest.partition(":")
    return LabelledSet(name=name, root=root, split=split or None)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--set", dest="sets", type=parse_set, action="append", required=True,
                   help="NAME=ROOT[:SPLIT]: ROOT holds images/ and masks/ (and optionally manifest.csv with a split column)")
    p.add_argument("--output", required=True, help="folder for the report")
    p.add_argument("--model", default=None, help="weights file (default: the shipped model)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or "local",
                   help="Ray to run on: $RAY_ADDRESS when set, else a new local Ray; 'auto' joins a `ray start` cluster")
    p.add_argument("--worst", type=int, default=8, help="worst cases per set in the contact sheet")
    return p.parse_args(argv)


def score_batch(table: pa.Table, *, truth: dict[str, str]) -> pa.Table:
    rows = []
    for r in table.select(["source_path", "quality_score", "qc_flags", "mask_png", "error_message"]).to_pylist():
        out = {"source_path": r["source_path"], "dice": None, "iou": None, "quality_score": r["quality_score"],
               "qc_flags": r["qc_flags"], "mask_png": r["mask_png"], "error": r["error_message"]}
        if r["error_message"] is None:
            try:
                out["dice"], out["iou"] = score(r["mask_png"], truth[r["source_path"]])
            except ValueError as e:
                out["error"] = str(e)
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def by_quality(rows: list[dict]) -> list[dict]:
    """Rows lowest quality_score first (unscored last), ties by Dice."""
    return sorted(rows, key=lambda r: (r["quality_score"] is None, r["quality_score"] or 0.0, r["dice"]))


def worst_sheet(rows: list[dict], files: dict[str, SourceFile], truth: dict[str, str], k: int):
    """The k rows of lowest quality_score, lowest first: each tile says its score (q) and its true Dice (d)."""
    tiles = []
    for r in by_quality(rows)[:k]:
        src = files[r["source_path"]]
        pixels = decode_image(Path(src.location).read_bytes(), source=src.location).pixels
        q = "n/a" if r["quality_score"] is None else f"{r['quality_score']:.2f}"
        label = f"q{q} d{r['dice']:.3f} {Path(src.location).name[:22]}"
        tiles.append(overlay(pixels, decode_png(r["mask_png"]), read_mask(truth[r["source_path"]]), label=label))
    return contact_sheet(tiles) if tiles else None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, prog)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, SourceFile] = {}
    truth: dict[str, str] = {}
    for s in args.sets:
        for image, mask in image_mask_pairs(s):
            rel = f"{s.name}/{relative_name(image, s.root)}"
            files[rel] = SourceFile(rel_path=rel, location=image, root=s.root, size=os.path.getsize(image))
            truth[rel] = mask

    import ray

    weights = read_weights(args.model)
    meta = weights.meta
    ray.init(address=args.ray_address, logging_level=logging.WARNING)
    started = time.time()
    cfg = JobConfig(inputs=tuple(s.root for s in args.sets), output=str(out), variants=(),
                    segment=SegmentConfig(weights=args.model))
    ds = build_dataset(sorted(files.values()), cfg, weights=weights).map_batches(
        score_batch, batch_format="pyarrow", fn_kwargs={"truth": truth}, num_cpus=0)  # the workers hold every CPU
    rows = ds.take_all()
    seconds = time.time() - started

    report = {"model": {"name": meta.name, "sha256": weights.sha256, "meta": meta.to_dict()},
              "wall_time_s": round(seconds, 1), "sets": {}}
    for s in args.sets:
        mine = [r for r in rows if r["source_path"].startswith(s.name + "/")]
        ok = [r for r in mine if r["error"] is None]
        summary = summarize([r["dice"] for r in ok])
        summary["mean_iou"] = sum(r["iou"] for r in ok) / len(ok) if ok else None
        scored = [r for r in ok if r["quality_score"] is not None]
        summary["quality_spearman"] = spearman([r["quality_score"] for r in scored], [r["dice"] for r in scored])
        summary["low_quality"] = sum(QC_LOW_QUALITY in (r["qc_flags"] or []) for r in ok)
        summary["errors"] = [{"source_path": r["source_path"], "error": r["error"]} for r in mine if r["error"]]
        summary["worst"] = [{"source_path": r["source_path"], "dice": round(r["dice"], 4)}
                            for r in sorted(ok, key=lambda r: r["dice"])[:args.worst]]
        report["sets"][s.name] = {"root": s.root, "split": s.split, **summary}
        sheet = worst_sheet(ok, files, truth, args.worst)
        if sheet is not None:
            cv2.imwrite(str(out / f"worst_{s.name}.png"), sheet)

    (out / "report.json").write_text(json.dumps(report, indent=2))
    with (out / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_path", "dice", "iou", "quality_score", "qc_flags", "error"])
        for r in sorted(rows, key=lambda r: r["source_path"]):
            w.writerow([r["source_path"], r["dice"], r["iou"], r["quality_score"], " ".join(r["qc_flags"] or []),
                        r["error"] or ""])
    lines = [f"# Evaluation of {meta.name} ({report['model']['sha256'][:12]})", "",
             "| set | n | mean Dice | median | p10 | worst | mean IoU | quality vs Dice (Spearman) | low_quality | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["sets"].items():
        if r["n"]:
            rho = "n/a" if r["quality_spearman"] is None else f"{r['quality_spearman']:.2f}"
            lines.append(f"| {name} | {r['n']} | {r['mean_dice']:.4f} | {r['median_dice']:.4f} | {r['p10_dice']:.4f} | "
                         f"{r['worst_dice']:.4f} | {r['mean_iou']:.4f} | {rho} | {r['low_quality']} | {len(r['errors'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{len(rows)} images in {seconds:.1f} s -> {out}")
    return 0

