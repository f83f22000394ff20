"""QC contact sheet: small synthetic outputs written with pyarrow (no Ray), then one real job on the samples."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.contact_sheet import (
    BAND_BGR,
    BAND_PX,
    QUALITY_COLUMN,
    SELECT_COLUMNS,
    choose_variant,
    make_contact_sheet,
    mask_in_variant,
    outline_tile,
    plan_contact_sheet,
    render_contact_sheet,
)
from pipeline.png import decode_png, encode_png
from pipeline.schema import SCHEMA_VERSION, images_schema
from pipeline.variants import VariantConfig, make_variants, parse_variant
from pipeline.writer import shard_name
from tests.conftest import SAMPLES
from tests.corpus import phantom_xray

H, W = 96, 80  # px, source size of the phantoms (not square, so letterboxing shows)
VARIANTS = ("full", "masked_crop")
GEOMETRY = VariantConfig(size=48, crop_margin_frac=0.1)  # letterboxed to 48 px, 10 % crop margin
TILE = 64  # px, tile side in the tests
COLUMNS = 4
# (mask kind, qc_flags) per row: 20 rows, five flags, one row carrying two
ROWS = ([("two", [])] * 12 + [("one", ["one_lung"])] * 3 + [("none", ["no_lungs"])] * 2
        + [("small", ["small_lung_area", "polarity_corrected"])] * 2 + [("two", ["burned_in_annotation"])])
FLAG_COUNTS = {"no_lungs": 2, "one_lung": 3, "small_lung_area": 2, "burned_in_annotation": 1, "polarity_corrected": 2}
FLAG_SECTIONS = ["no_lungs", "one_lung", "small_lung_area", "burned_in_annotation", "polarity_corrected"]  # sheet order


def lung_mask(kind: str, h: int = H, w: int = W) -> np.ndarray:
    """uint8 (h, w) {0, 255}: the phantom's two lungs ("two"), the left one ("one"), two small ones, or none."""
    mask = np.zeros((h, w), np.uint8)
    axes = {"two": (0.13, 0.28), "one": (0.13, 0.28), "small": (0.04, 0.08), "none": None}[kind]
    if axes is None:
        return mask
    for cx in (0.30, 0.70)[: 1 if kind == "one" else 2]:
        cv2.ellipse(mask, (round(cx * w), round(0.45 * h)), (round(axes[0] * w), round(axes[1] * h)), 0, 0, 360, 255, -1)
    return mask


def image_values(i: int, kind: str, flags: list[str], variants: tuple[str, ...], cfg: VariantConfig) -> dict:
    """Every column of images_schema(variants) for one synthetic row."""
    img = phantom_xray(H, W) + np.uint16(100 * i)  # rows differ a little
    mask = lung_mask(kind)
    x, y, w, h = cv2.boundingRect(mask)
    box = (x, y, x + w, y + h) if w and h else (None,) * 4
    values = {
        "source_path": f"site/{kind}/img_{i:03d}.dcm",
        "source_sha256": hashlib.sha256(img.tobytes()).hexdigest(),
        "format": "dicom", "source_height": H, "source_width": W, "source_bits_stored": 16,
        "mask_png": encode_png(mask, mask=True),
        "lung_bbox_x0": box[0], "lung_bbox_y0": box[1], "lung_bbox_x1": box[2], "lung_bbox_y1": box[3],
        "lung_fraction": float((mask > 0).mean()),
        "right_lung_fraction": float((mask[:, : W // 2] > 0).mean()) / 2,
        "left_lung_fraction": float((mask[:, W // 2 :] > 0).mean()) / 2,
        "n_components": {"two": 2, "one": 1, "small": 2, "none": 0}[kind],
        "quality_score": quality_of(i),
        "qc_flags": flags,
        "qc_pass": not flags,
        "decode_notes": [f for f in flags if f in ("polarity_corrected", "burned_in_annotation")],
        "model_name": "test-unet", "model_sha256": "0" * 64,
        "dicom_modality": "DX", "dicom_view_position": "PA", "dicom_photometric_interpretation": "MONOCHROME2",
        "dicom_bits_stored": 16, "dicom_pixel_spacing": [0.2, 0.2], "dicom_rows": H, "dicom_columns": W,
        "pseudo_patient_id": f"p{i}", "pseudo_study_id": f"s{i}", "pseudo_image_id": f"i{i}",
    }
    for name, pixels in make_variants(img, mask, variants, cfg).items():
        values[f"{name}_png"] = encode_png(pixels)
        values[f"{name}_height"], values[f"{name}_width"] = pixels.shape
    return values


def quality_of(i: int) -> float:
    """The synthetic rows' quality_score: not in output order, so sorting by it shows."""
    return round(0.5 + ((7 * i) % 11) / 22, 4)


def write_output(root, rows=ROWS, *, variants: tuple[str, ...] = VARIANTS, cfg: VariantConfig = GEOMETRY,
                 shards: int = 3, row_group: int = 3, manifest: bool = True) -> str:
    """A job output under root: `shards` images shards (row groups of `row_group` rows), an errors folder, manifest.json."""
    schema = images_schema(variants)
    values = [image_values(i, kind, flags, variants, cfg) for i, (kind, flags) in enumerate(rows)]
    for v in values:
        assert set(v) == set(schema.names)  # every column filled
    (root / "images").mkdir(parents=True)
    (root / "errors").mkdir()
    names = []
    for k in range(shards):
        part = values[k::shards]
        name = f"{shard_name([v['source_path'] for v in part])}-000.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / "images" / name, row_group_size=row_group)
        names.append(name)
    if manifest:
        (root / "manifest.json").write_text(json.dumps({
            "complete": True, "schema_version": SCHEMA_VERSION,
            "contract": {"schema_version": SCHEMA_VERSION, "variants": list(variants), "variant": dataclasses.asdict(cfg)},
            "counts": {"images_in": len(rows), "ok": len(rows), "errors": 0},
            "shards": {"images": sorted(names), "errors": []},
        }))
    return str(root)


def expected_height(tiles_per_section: list[int]) -> int:
    return BAND_PX + sum(BAND_PX + math.ceil(n / COLUMNS) * TILE for n in tiles_per_section)


@pytest.fixture
def output(tmp_path) -> str:
    return write_output(tmp_path / "out")


def test_the_sheet_is_written_where_promised_with_one_section_per_flag(output):
    path = make_contact_sheet(output, sample=5, per_flag=2, columns=COLUMNS, tile_px=TILE)
    assert path == f"{output}/qc/contact_sheet.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        size = im.size
    plan = plan_contact_sheet(output, sample=5, per_flag=2)
    assert [g.name for g in plan.groups] == ["sample", *FLAG_SECTIONS]
    assert {g.name: g.total for g in plan.groups[1:]} == FLAG_COUNTS
    sheet, sections = render_contact_sheet(output, plan, columns=COLUMNS, tile_px=TILE)
    assert [s.title for s in sections] == [
        "random sample: 5 of 20 images",
        "no_lungs: 2 images (2 shown)",
        "one_lung: 3 images (2 shown)",
        "small_lung_area: 2 images (2 shown)",
        "burned_in_annotation: 1 image (1 shown)",
        "polarity_corrected: 2 images (2 shown)",
    ]
    assert [s.tiles for s in sections] == [5, 2, 2, 2, 1, 2]
    assert size == (COLUMNS * TILE, expected_height([5, 2, 2, 2, 1, 2])) == (sheet.shape[1], sheet.shape[0])
    written = cv2.imread(path, cv2.IMREAD_COLOR)
    assert np.array_equal(written, sheet)
    for s in sections:  # each band starts where the layout says, and tiles follow it
        assert tuple(written[s.top + 1, -2]) == BAND_BGR
        assert tuple(written[s.top + BAND_PX + TILE // 2, TILE // 2]) != BAND_BGR
    flagged = {g.name: {r.source_path for r in g.rows} for g in plan.groups[1:]}
    assert all(p.startswith("site/one/") for p in flagged["one_lung"])
    assert all(p.startswith("site/none/") for p in flagged["no_lungs"])


def test_tiles_show_the_image_with_a_red_outline(tmp_path):
    out = write_output(tmp_path / "clean", rows=[("two", [])] * 2, shards=1)
    plan = plan_contact_sheet(out, sample=1)
    sheet, sections = render_contact_sheet(out, plan, columns=COLUMNS, tile_px=TILE)
    tile = sheet[sections[0].top + BAND_PX:, :TILE]
    red = (tile[..., 2] == 255) & (tile[..., 1] == 0) & (tile[..., 0] == 0)
    assert red.sum() > 20  # the outline of two lungs
    assert tile[TILE // 2, TILE // 2].any()  # the image under it


def test_the_same_seed_gives_the_same_sheet(output, tmp_path):
    a = make_contact_sheet(output, path=str(tmp_path / "a.png"), sample=5, seed=7)
    b = make_contact_sheet(output, path=str(tmp_path / "b.png"), sample=5, seed=7)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    picked = {seed: [r.index for r in plan_contact_sheet(output, sample=5, seed=seed).groups[0].rows] for seed in (7, 8)}
    assert picked[7] == [r.index for r in plan_contact_sheet(output, sample=5, seed=7).groups[0].rows]
    assert picked[7] != picked[8]
    assert len(set(picked[7])) == 5


def test_an_output_with_no_images_gets_a_sheet_saying_so(tmp_path):
    out = write_output(tmp_path / "empty", rows=[], shards=1)
    path = make_contact_sheet(out, columns=COLUMNS, tile_px=TILE)
    with Image.open(path) as im:
        assert im.size == (COLUMNS * TILE, 2 * BAND_PX)
    plan = plan_contact_sheet(out)
    assert plan.n_images == 0
    _, sections = render_contact_sheet(out, plan, columns=COLUMNS, tile_px=TILE)
    assert [(s.title, s.tiles) for s in sections] == [("no images in the output", 0)]


def test_a_folder_that_is_not_an_output_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected a job output"):
        make_contact_sheet(str(tmp_path / "nothing"))


def test_an_output_without_flags_says_so(tmp_path):
    out = write_output(tmp_path / "clean", rows=[("two", [])] * 6, shards=2)
    make_contact_sheet(out, columns=COLUMNS, tile_px=TILE)
    plan = plan_contact_sheet(out)
    _, sections = render_contact_sheet(out, plan, columns=COLUMNS, tile_px=TILE)
    assert [(s.title, s.tiles) for s in sections] == [("random sample: 6 of 6 images", 6), ("no QC flag on any image", 0)]


def test_a_16_bit_output_is_shown_8_bit(tmp_path):
    out = write_output(tmp_path / "deep", rows=ROWS[:14], cfg=dataclasses.replace(GEOMETRY, bit_depth=16))
    first = pq.read_table(next((tmp_path / "deep" / "images").glob("*.parquet")), columns=["full_png"])
    assert decode_png(first.column("full_png")[0].as_py()).dtype == np.uint16
    path = make_contact_sheet(out, columns=COLUMNS, tile_px=TILE)
    plan = plan_contact_sheet(out)
    sheet, sections = render_contact_sheet(out, plan, columns=COLUMNS, tile_px=TILE)
    assert cv2.imread(path).shape == sheet.shape
    assert sheet[sections[0].top + BAND_PX:].mean() > 10  # not the black a 16-bit array cast to uint8 would give
    img16 = phantom_xray(H, W)
    mask = lung_mask("two")
    assert np.array_equal(outline_tile(img16, [(mask, (0, 0, 255))], tile_px=TILE),
                          outline_tile((img16 >> 8).astype(np.uint8), [(mask, (0, 0, 255))], tile_px=TILE))


def test_the_best_variant_is_uncropped():
    assert choose_variant(["masked_crop", "masked", "full"]) == "full"
    assert choose_variant(["masked_crop_eq", "masked_crop", "masked_eq"]) == "masked_eq"
    assert choose_variant(["masked_eq", "full_clahe"]) == "full_clahe"
    assert choose_variant(["masked_crop_eq", "crop"]) == "crop"
    assert choose_variant([]) is None


@pytest.mark.parametrize("kind", ["two", "one", "none"])
@pytest.mark.parametrize("cfg", [VariantConfig(crop_margin_frac=0.1), VariantConfig(crop_margin_frac=0.1, pad_square=True)])
def test_the_mask_lands_on_a_cropped_variant_where_its_lungs_are(kind, cfg):
    img, mask = phantom_xray(H, W), lung_mask(kind)
    x, y, w, h = cv2.boundingRect(mask)
    bbox = (x, y, x + w, y + h) if w and h else None
    crop = make_variants(img, mask, ("masked_crop",), cfg)["masked_crop"]
    framed = mask_in_variant(mask, parse_variant("masked_crop"), bbox, cfg)
    if bbox is None:  # no lungs: the variant is the whole, unmasked frame
        assert framed.shape == crop.shape and not framed.any()
    else:  # the masked crop is non-zero exactly on lung pixels (the phantom has no 0)
        assert np.array_equal(framed > 0, crop > 0)


def test_the_mask_lands_on_a_letterboxed_crop():
    img, mask = phantom_xray(H, W), lung_mask("two")
    x, y, w, h = cv2.boundingRect(mask)
    crop = make_variants(img, mask, ("masked_crop",), GEOMETRY)["masked_crop"]
    framed = mask_in_variant(mask, parse_variant("masked_crop"), (x, y, x + w, y + h), GEOMETRY) > 0
    assert framed.shape == crop.shape == (48, 48)
    assert (framed & (crop > 0)).sum() / (framed | (crop > 0)).sum() > 0.9


def test_only_a_cropped_variant_and_no_manifest(tmp_path):
    out = write_output(tmp_path / "crop", variants=("masked_crop",), cfg=VariantConfig(crop_margin_frac=0.1),
                       manifest=False)
    plan = plan_contact_sheet(out, sample=3, per_flag=1)
    assert plan.variant == "masked_crop" and not plan.geometry_known
    path = make_contact_sheet(out, columns=COLUMNS, tile_px=TILE)
    assert cv2.imread(path) is not None


def test_only_the_small_columns_and_the_chosen_row_groups_are_read(output, monkeypatch):
    read_columns, row_groups = [], []
    real_read_table, real_read_row_group = pq.read_table, pq.ParquetFile.read_row_group

    def read_table(source, *args, columns=None, **kwargs):
        read_columns.append(tuple(columns))
        return real_read_table(source, *args, columns=columns, **kwargs)

    def read_row_group(self, i, columns=None, **kwargs):
        row_groups.append((i, tuple(columns)))
        return real_read_row_group(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_table)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    make_contact_sheet(output, sample=1, per_flag=0)
    assert read_columns == [(*SELECT_COLUMNS, QUALITY_COLUMN)] * 3  # one read of the small columns per shard
    assert len(row_groups) == 1 and row_groups[0][1] == ("mask_png", "full_png")


def test_a_uri_output(output):
    uri = f"file://{output}"
    assert make_contact_sheet(uri, sample=2, per_flag=1) == f"{uri}/qc/contact_sheet.png"
    assert cv2.imread(f"{output}/qc/contact_sheet.png") is not None


@pytest.mark.slow
def test_a_sheet_of_the_real_job_on_the_samples(ray_local, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.dataset import run_job

    out = str(tmp_path / "out")
    manifest = run_job(JobConfig(inputs=(str(SAMPLES / "xrays"),), output=out))
    path = make_contact_sheet(out)
    plan = plan_contact_sheet(out)
    assert plan.n_images == manifest["counts"]["ok"] > 0
    assert plan.variant == "masked"  # the default variants hold no "full": the best uncropped one
    assert {g.name: g.total for g in plan.groups[1:]} == manifest["counts"]["qc_flags"]
    sheet, _ = render_contact_sheet(out, plan)
    assert cv2.imread(path).shape == sheet.shape


def test_every_section_shows_the_lowest_quality_first_and_a_flag_its_worst_rows(output):
    plan = plan_contact_sheet(output, sample=5, per_flag=2)
    for g in plan.groups:
        scores = [r.quality_score for r in g.rows]
        assert scores == sorted(scores), g.name
    one_lung = next(g for g in plan.groups if g.name == "one_lung")  # 3 rows carry it, 2 are shown: the 2 lowest
    carrying = sorted(quality_of(i) for i, (_, flags) in enumerate(ROWS) if "one_lung" in flags)
    assert [r.quality_score for r in one_lung.rows] == pytest.approx(carrying[:2])


def test_an_output_without_quality_scores_still_gets_a_sheet(tmp_path):
    out = write_output(tmp_path / "old", rows=[("two", []), ("one", ["one_lung"])], shards=1)
    shard = next((tmp_path / "old" / "images").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["quality_score"]), shard)  # as schema 2 wrote it
    plan = plan_contact_sheet(out, sample=2)
    assert all(r.quality_score is None for g in plan.groups for r in g.rows)
    assert [g.total for g in plan.groups] == [2, 1]
