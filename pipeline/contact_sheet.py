"""A QC contact sheet of a finished output: a random sample and the rows of every QC flag, mask outlined.

After a run over 100k X-rays nobody looks at every mask; this draws one PNG a person can scan in a
minute. `make_contact_sheet(OUTPUT)` writes OUTPUT/qc/contact_sheet.png (or `path`):

    +--------------------------------------------------------------------------+
    | 1234 images, 57 fail QC; shown: full, lung mask outlined in red            |  title band
    | random sample: 24 of 1234 images (seed 0)                                 |  header band
    | [tile][tile][tile][tile][tile][tile][tile][tile]                           |  tile rows,
    | [tile][tile] ...                                                          |  `columns` a row
    | one_lung: 37 images (8 shown)                                             |  one section per
    | [tile] ...                                                                |  flag present
    +--------------------------------------------------------------------------+

A tile is `tile_px` square: the image, letterboxed, with the lung mask's outline in red, its group
("sample" or the flag), quality_score (q) and lung_fraction (a) at the top, the end of its source_path at
the bottom. Every section shows its tiles lowest quality_score first, and a flag's section the lowest-
scored rows carrying it: the masks most likely wrong come first. Flags come in `pipeline.qc.FLAGS`
order, then any others by name. An output without flagged rows gets a last
band saying so; an output without images gets a sheet saying so (a file is always written, and its
location returned, so a caller never has to tell "nothing to show" from "not run").

Cost does not grow with the output's bytes: choosing reads only the small columns of every shard
(`SELECT_COLUMNS`); drawing reads the mask and one image column of the row groups that hold a chosen
row, one row group at a time, and keeps only the tiles. Run it on a finished output (shards are
addressed by name and row number between the two passes).

Which image: the variant whose geometry is simplest, `full` first, then the other uncropped ones
(the mask's outline only needs the letterbox of `contract.variant`), then cropped ones, where the
mask is cut to the lung bounding box + `crop_margin_frac` as `pipeline.variants.crop_box` cuts the
image. Without a variant column the tile shows the mask itself. Variants are read from
manifest.json's `contract.variants` (else the shards' `*_png` columns); their geometry from
`contract.variant` (else `VariantConfig()` defaults; a mask that then does not fit the image is
stretched onto it, with a warning).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.evaluate import OVERLAY_COLOR_PRED, contact_sheet
from pipeline.png import decode_png
from pipeline.qc import FLAGS as QC_FLAGS
from pipeline.variants import (
    VariantConfig,
    VariantSpec,
    crop_box,
    pad_to_square,
    parse_variant,
    resize_output,
    to_bit_depth,
)
from pipeline.writer import IMAGES_DIR, list_shards, output_fs, read_manifest

log = logging.getLogger(__name__)

SHEET_DIR = "qc"  # OUTPUT/qc/ holds the sheet
SHEET_NAME = "contact_sheet.png"
TILE_PX = 192  # side of one tile
COLUMNS = 8  # tiles per row of the sheet: 8 x 192 = 1536 px wide
BAND_PX = 28  # height of the title and header bands
SAMPLE_GROUP = "sample"  # tile label of the random sample
MASK_COLUMN = "mask_png"
BBOX_COLUMNS = ("lung_bbox_x0", "lung_bbox_y0", "lung_bbox_x1", "lung_bbox_y1")
QUALITY_COLUMN = "quality_score"  # read where present (schema >= 3): sorts every section
SELECT_COLUMNS = ("source_path", "qc_flags", "qc_pass", "lung_fraction", *BBOX_COLUMNS)  # read for every row
MASK_ON = 128  # a resized mask pixel at or above this is lung
NO_VARIANT_GRAY = 2  # without a variant column the tile shows mask // this (lungs mid-gray)
BAND_BGR = (64, 64, 64)  # background of the bands
BAND_TEXT_BGR = (255, 255, 255)
LABEL_BGR = (255, 255, 0)  # tile labels (cyan, as pipeline.evaluate.overlay)
LABEL_BACK_BGR = (0, 0, 0)  # filled behind tile labels so they read on bright pixels too
FONT = cv2.FONT_HERSHEY_SIMPLEX
BAND_FONT_SCALE = 0.55
LABEL_FONT_SCALE = 0.4
LABEL_MARGIN_PX = 4  # label text inset from the tile's edge
PATH_LABEL_CHARS = 30  # the end of source_path shown at a tile's bottom
CONTRAST_ORDER = ("", "eq", "clahe")  # among variants of one region, the least processed first


def images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


@dataclass(frozen=True)
class Row:
    """One chosen image row: where it is and what its tile says."""

    index: int  # position among all image rows (shards in name order, then row order)
    shard: str  # the shard's path on the output's filesystem
    row: int  # row number within the shard
    source_path: str
    lung_fraction: float | None
    bbox: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) in source px, x1/y1 exclusive; None = no lungs
    quality_score: float | None = None  # None: not scored (an output from before schema 3)


@dataclass(frozen=True)
class Group:
    """A section of the sheet: the random sample, or the rows carrying one QC flag."""

    name: str  # SAMPLE_GROUP or the flag
    total: int  # rows of the whole output in this group (every image row for the sample)
    rows: tuple[Row, ...]  # the chosen ones, lowest quality_score first (unscored last, in output order)

    @property
    def title(self) -> str:
        """The header band's text, e.g. 'one_lung: 37 images (8 shown)'."""
        if self.name == SAMPLE_GROUP:
            return f"random sample: {len(self.rows)} of {images(self.total)}"
        return f"{self.name}: {images(self.total)} ({len(self.rows)} shown)"


@dataclass(frozen=True)
class SheetPlan:
    """What the sheet will show; made from the small columns only."""

    n_images: int  # image rows in the output
    n_failed: int  # ... of which qc_pass is false
    variant: str | None  # the image variant drawn; None = no variant column (the mask is shown)
    variant_cfg: VariantConfig  # its geometry (the manifest's, else the defaults)
    geometry_known: bool  # variant_cfg came from the manifest
    groups: tuple[Group, ...]  # the sample first, then one per flag present


@dataclass(frozen=True)
class Section:
    """Where a band and its tiles landed on the sheet (px, top inclusive, bottom exclusive)."""

    title: str  # the band's text
    top: int  # first row of the band
    bottom: int  # first row after the band and its tiles
    tiles: int  # tiles under the band


# --- choosing -------------------------------------------------------------------------------


def variant_rank(name: str) -> tuple:
    """Sort key, best first: full; other uncropped (unmasked before masked, plain before eq/clahe); cropped; unknown."""
    try:
        spec = parse_variant(name)
    except ValueError:
        return (2, 0, 0, name)
    return (int(spec.cropped), int(spec.masked), CONTRAST_ORDER.index(spec.contrast), name)


def choose_variant(variants: Sequence[str]) -> str | None:
    """The variant to draw (see `variant_rank`); None when there is none."""
    return min(variants, key=variant_rank) if variants else None


def output_variants(manifest: dict | None, schema: pa.Schema | None) -> list[str]:
    """The variants with a PNG column: manifest's contract.variants when given, else the schema's `*_png` columns."""
    columns = [] if schema is None else [n[:-len("_png")] for n in schema.names if n.endswith("_png") and n != MASK_COLUMN]
    listed = ((manifest or {}).get("contract") or {}).get("variants")
    if listed is None:
        return columns
    missing = [v for v in listed if schema is not None and v not in columns]
    if missing:
        log.warning("manifest lists variants %s that the shards have no column for; using %s", missing, columns)
        return columns
    return list(listed)


def manifest_variant_config(manifest: dict | None) -> VariantConfig | None:
    """contract.variant of the manifest as a VariantConfig (unknown keys ignored); None without one."""
    raw = ((manifest or {}).get("contract") or {}).get("variant")
    if raw is None:
        return None
    known = {f.name for f in dataclasses.fields(VariantConfig)}
    try:
        return VariantConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"expected manifest contract.variant to hold VariantConfig fields, got {raw}") from e


def group_seed(seed: int, name: str) -> list[int]:
    """The random state of one group: the user's seed and the group's name, so groups do not shift each other."""
    return [seed, zlib.crc32(name.encode("utf-8"))]


def pick(indices: np.ndarray, k: int, *, seed: list[int]) -> np.ndarray:
    """Up to k of `indices` (int64 (N,)), drawn without replacement, returned in ascending order."""
    if len(indices) <= k:
        return np.sort(indices)
    return np.sort(np.random.default_rng(seed).choice(indices, size=k, replace=False))


def flag_order(flags: Sequence[str]) -> list[str]:
    """qc.FLAGS in their order, then any other flag by name."""
    return [f for f in QC_FLAGS if f in flags] + sorted(f for f in flags if f not in QC_FLAGS)


def lowest_first(indices: np.ndarray, scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """`indices` ordered by scores[indices] ascending (NaN = unscored last, ties in index order); the first k."""
    keys = np.where(np.isnan(scores[indices]), np.inf, scores[indices])
    ordered = indices[np.lexsort((indices, keys))]
    return ordered if k is None else ordered[:k]


def scan(output: str) -> tuple[pa.Table, list[str], pa.Schema | None]:
    """(SELECT_COLUMNS of every image row + `_shard` (int32 index into the list) and `_row`, shard paths, a schema).

    Reads only SELECT_COLUMNS, and QUALITY_COLUMN where the shard has it (null where not); the schema is
    the first shard's (None without shards).
    """
    fs, _ = output_fs(output)
    shards = list_shards(output)[IMAGES_DIR]
    parts, schema = [], None
    for k, path in enumerate(shards):
        try:
            shard_schema = pq.read_schema(path, filesystem=fs)
            scored = QUALITY_COLUMN in shard_schema.names
            table = pq.read_table(path, columns=[*SELECT_COLUMNS, *([QUALITY_COLUMN] if scored else [])], filesystem=fs)
            if not scored:
                table = table.append_column(QUALITY_COLUMN, pa.nulls(table.num_rows, pa.float32()))
            schema = schema or shard_schema
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"expected a readable images shard with columns {list(SELECT_COLUMNS)}, "
                             f"got {type(e).__name__} from {path}") from e
        parts.append(table.append_column("_shard", pa.array(np.full(table.num_rows, k, np.int32)))
                          .append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64))))
    if not parts:
        return pa.table({}), shards, None
    return pa.concat_tables(parts), shards, schema


def plan_contact_sheet(output: str, *, sample: int = 24, per_flag: int = 8, seed: int = 0) -> SheetPlan:
    """Choose the rows of the sheet from the small columns of `output` (a folder or URI).

    `sample` rows at random (seeded) and, for every QC flag present, the `per_flag` rows carrying it with the
    lowest quality_score (unscored rows: at random, each flag with its own seeded draw); every group is
    shown lowest quality_score first. ValueError when `output` holds neither images shards nor a
    manifest.json, or a count is negative.
    """
    if sample < 0 or per_flag < 0:
        raise ValueError(f"expected sample >= 0 and per_flag >= 0, got sample={sample}, per_flag={per_flag}")
    manifest = read_manifest(output)
    table, shards, schema = scan(output)
    if manifest is None and not shards:
        raise ValueError(f"expected a job output (images/ shards or a manifest.json) at {output}, found neither")
    n = table.num_rows
    variants = output_variants(manifest, schema)
    cfg = manifest_variant_config(manifest)
    plan_cfg = cfg if cfg is not None else VariantConfig()
    if n == 0:
        return SheetPlan(0, 0, choose_variant(variants), plan_cfg, cfg is not None, (Group(SAMPLE_GROUP, 0, ()),))

    bboxes = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in BBOX_COLUMNS])
    has_box = np.all(np.column_stack([pc.is_valid(table.column(c)).to_numpy(zero_copy_only=False) for c in BBOX_COLUMNS]), axis=1)
    fractions = table.column("lung_fraction").to_pylist()
    scores = table.column(QUALITY_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    paths = table.column("source_path").to_pylist()
    shard_of = table.column("_shard").to_numpy()
    row_of = table.column("_row").to_numpy()

    def rows(indices: np.ndarray) -> tuple[Row, ...]:
        return tuple(Row(int(i), shards[shard_of[i]], int(row_of[i]), paths[i], fractions[i],
                         tuple(int(v) for v in bboxes[i]) if has_box[i] else None,
                         None if np.isnan(scores[i]) else float(scores[i])) for i in lowest_first(indices, scores))

    def worst(indices: np.ndarray, name: str) -> np.ndarray:
        """The per_flag lowest-scored of `indices`, the rest of the places drawn at random from the unscored."""
        scored = lowest_first(indices[~np.isnan(scores[indices])], scores, per_flag)
        return np.concatenate([scored, pick(indices[np.isnan(scores[indices])], per_flag - len(scored),
                                            seed=group_seed(seed, name))]).astype(np.int64)

    groups = [Group(SAMPLE_GROUP, n, rows(pick(np.arange(n), sample, seed=group_seed(seed, SAMPLE_GROUP))))]
    flags = table.column("qc_flags").combine_chunks()  # a null list counts as no flag
    flat, parent = pc.list_flatten(flags), pc.list_parent_indices(flags).to_numpy()
    for flag in flag_order(pc.unique(flat).drop_null().to_pylist()):
        carrying = np.unique(parent[pc.equal(flat, flag).to_numpy(zero_copy_only=False)])
        groups.append(Group(flag, len(carrying), rows(worst(carrying, flag))))
    failed = n - int(pc.sum(pc.fill_null(table.column("qc_pass"), True)).as_py())
    return SheetPlan(n, failed, choose_variant(variants), plan_cfg, cfg is not None, tuple(groups))


# --- drawing --------------------------------------------------------------------------------


def mask_in_variant(mask: np.ndarray, spec: VariantSpec | None, bbox: tuple[int, int, int, int] | None,
                    cfg: VariantConfig) -> np.ndarray:
    """uint8 (H, W) {0, 255} mask at the source resolution -> the same in a variant's frame, {0, 255}.

    Applies the variant's geometry as `pipeline.variants.make_variants` does: a cropped region cut to
    `crop_box(bbox, margin_frac=cfg.crop_margin_frac)` (the whole frame when bbox is None: no lungs),
    `pad_square`, then `resize_output`. `spec` None (an unknown variant) is taken as uncropped.
    """
    out = mask
    if spec is not None and spec.cropped:
        if bbox is not None:
            x0, y0, x1, y1 = crop_box(bbox, mask.shape, margin_frac=cfg.crop_margin_frac)
            out = out[y0:y1, x0:x1]
        if cfg.pad_square:
            out = pad_to_square(out)
    out = resize_output(np.ascontiguousarray(out), cfg)
    return np.where(out >= MASK_ON, 255, 0).astype(np.uint8)


def letterbox(img: np.ndarray, side: int, *, interpolation: int | None = None) -> np.ndarray:
    """(h, w[, 3]) uint8 -> (side, side[, 3]): scaled so the longer side fits, centred on black.

    `interpolation` None: area when shrinking, bilinear when enlarging.
    """
    h, w = img.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, min(side, round(w * scale))), max(1, min(side, round(h * scale)))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(img, (nw, nh), interpolation=interpolation)
    top, left = (side - nh) // 2, (side - nw) // 2
    return cv2.copyMakeBorder(scaled, top, side - nh - top, left, side - nw - left, cv2.BORDER_CONSTANT, value=0)


def put_label(img: np.ndarray, text: str, org: tuple[int, int], *, scale: float = LABEL_FONT_SCALE,
              color: tuple[int, int, int] = LABEL_BGR, backed: bool = True) -> None:
    """Draw ASCII `text` (other characters as '?') at `org` (x, baseline y) on a BGR uint8 image.

    `backed` first fills the text's box (+1 px) with LABEL_BACK_BGR, so it reads on bright pixels too.
    """
    text = text.encode("ascii", "replace").decode("ascii")
    if backed:
        (w, h), descent = cv2.getTextSize(text, FONT, scale, 1)
        x, y = org
        cv2.rectangle(img, (x - 1, y - h - 1), (x + w, y + descent), LABEL_BACK_BGR, cv2.FILLED)
    cv2.putText(img, text, org, FONT, scale, color, 1, cv2.LINE_AA)


def outline_tile(image: np.ndarray, outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]], *,
                 tile_px: int = TILE_PX, keep_aspect: bool = True) -> np.ndarray:
    """A BGR uint8 (tile_px, tile_px, 3) tile: the image with each mask's outer outline in its colour.

    image: uint8 or uint16 (H, W) (16-bit shown by its high byte); each mask uint8 (H, W), lung = non-zero.
    keep_aspect letterboxes the image (and masks alike); else both are stretched to the square.
    A generalisation of `pipeline.evaluate.overlay` (two fixed outlines, stretched, 256 px) without the label.
    """
    for mask, _ in outlines:
        if mask.shape != image.shape:
            raise ValueError(f"expected masks of the image's shape {image.shape}, got {mask.shape}")
    gray = to_bit_depth(image, 8)

    def fit(img: np.ndarray, interpolation: int | None) -> np.ndarray:
        if keep_aspect:
            return letterbox(img, tile_px, interpolation=interpolation)
        return cv2.resize(img, (tile_px, tile_px), interpolation=interpolation or cv2.INTER_AREA)

    tile = cv2.cvtColor(fit(gray, None), cv2.COLOR_GRAY2BGR)
    for mask, color in outlines:
        small = fit((mask > 0).astype(np.uint8) * 255, cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, color, 1)
    return tile


def row_tile(mask_png: bytes, image_png: bytes | None, row: Row, plan: SheetPlan, *, tile_px: int) -> np.ndarray:
    """The unlabelled tile of one row: its variant image (or the mask) with the mask outlined."""
    mask = decode_png(mask_png)
    if image_png is None:
        return outline_tile(mask // NO_VARIANT_GRAY, [(mask, OVERLAY_COLOR_PRED)], tile_px=tile_px)
    image = decode_png(image_png)
    try:
        spec = parse_variant(plan.variant)
    except ValueError:
        spec = None
    framed = mask_in_variant(mask, spec, row.bbox, plan.variant_cfg)
    if framed.shape != image.shape:
        log.warning("mask of %s does not fit variant %s (%s vs %s%s): stretched onto it", row.source_path,
                    plan.variant, framed.shape, image.shape, "" if plan.geometry_known else ", no contract.variant")
        framed = cv2.resize(framed, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    return outline_tile(image, [(framed, OVERLAY_COLOR_PRED)], tile_px=tile_px)


def labelled(tile: np.ndarray, group: str, row: Row) -> np.ndarray:
    """A copy of `tile` with '<group> q<quality_score> a<lung_fraction>' at the top and the end of source_path
    at the bottom."""
    out = tile.copy()
    fraction = "n/a" if row.lung_fraction is None else f"{row.lung_fraction:.2f}"
    score = "n/a" if row.quality_score is None else f"{row.quality_score:.2f}"
    put_label(out, f"{group} q{score} a{fraction}", (LABEL_MARGIN_PX, 14))
    put_label(out, row.source_path[-PATH_LABEL_CHARS:], (LABEL_MARGIN_PX, out.shape[0] - LABEL_MARGIN_PX))
    return out


def read_tiles(output: str, plan: SheetPlan, *, tile_px: int) -> dict[int, np.ndarray]:
    """{row index: unlabelled tile} for every chosen row, each read once.

    Per shard, only the row groups that hold a chosen row are read, only the mask and variant
    columns, one row group at a time; the PNG bytes are dropped once its tiles are drawn.
    """
    fs, _ = output_fs(output)
    wanted: dict[str, dict[int, Row]] = {}
    for group in plan.groups:
        for row in group.rows:
            wanted.setdefault(row.shard, {})[row.row] = row
    columns = [MASK_COLUMN] + ([f"{plan.variant}_png"] if plan.variant else [])
    tiles: dict[int, np.ndarray] = {}
    for shard, rows in sorted(wanted.items()):
        with fs.open_input_file(shard) as f:
            pf = pq.ParquetFile(f)
            start = 0
            for g in range(pf.metadata.num_row_groups):
                end = start + pf.metadata.row_group(g).num_rows
                local = [r for r in sorted(rows) if start <= r < end]
                if local:
                    chosen = pf.read_row_group(g, columns=columns).take(pa.array([r - start for r in local]))
                    images = chosen.column(columns[-1]).to_pylist() if plan.variant else [None] * len(local)
                    for r, mask_png, image_png in zip(local, chosen.column(MASK_COLUMN).to_pylist(), images):
                        tiles[rows[r].index] = row_tile(mask_png, image_png, rows[r], plan, tile_px=tile_px)
                start = end
    return tiles


def band(text: str, width: int) -> np.ndarray:
    """A BGR uint8 (BAND_PX, width, 3) band: BAND_BGR with `text` in BAND_TEXT_BGR."""
    out = np.empty((BAND_PX, width, 3), np.uint8)
    out[:] = BAND_BGR
    put_label(out, text, (LABEL_MARGIN_PX * 2, BAND_PX - 9), scale=BAND_FONT_SCALE, color=BAND_TEXT_BGR, backed=False)
    return out


def title(plan: SheetPlan) -> str:
    shown = f"{plan.variant}, lung mask outlined in red" if plan.variant else "the lung mask (no image variant in the output)"
    return f"{images(plan.n_images)}, {plan.n_failed} fail QC; shown: {shown}"


def render_contact_sheet(output: str, plan: SheetPlan, *, columns: int = COLUMNS,
                         tile_px: int = TILE_PX) -> tuple[np.ndarray, list[Section]]:
    """(BGR uint8 (H, columns * tile_px, 3) sheet, its sections) for a plan of `output`.

    H = BAND_PX (title) + per section BAND_PX + ceil(tiles / columns) * tile_px, + BAND_PX when no
    row is flagged (the 'no QC flag' band; also when the output has no images, with 'no images').
    """
    if columns < 1 or tile_px < 1:
        raise ValueError(f"expected columns >= 1 and tile_px >= 1, got columns={columns}, tile_px={tile_px}")
    width = columns * tile_px
    tiles = read_tiles(output, plan, tile_px=tile_px)
    parts = [band(title(plan), width)]
    sections: list[Section] = []
    top = BAND_PX
    texts = [(g.title, g) for g in plan.groups]
    if plan.n_images == 0:
        texts = [("no images in the output", None)]
    elif len(plan.groups) == 1:
        texts.append(("no QC flag on any image", None))
    for text, group in texts:
        parts.append(band(text, width))
        shown = [] if group is None else [labelled(tiles[r.index], group.name, r) for r in group.rows]
        if shown:
            parts.append(contact_sheet(shown, columns=columns))
        bottom = top + BAND_PX + (-(-len(shown) // columns)) * tile_px
        sections.append(Section(text, top, bottom, len(shown)))
        top = bottom
    return np.vstack(parts), sections


def sheet_location(output: str, path: str | None) -> str:
    """Where the sheet goes: `path`, else OUTPUT/qc/contact_sheet.png (a URI stays a URI)."""
    return path if path is not None else f"{output.rstrip('/')}/{SHEET_DIR}/{SHEET_NAME}"


def make_contact_sheet(output: str, *, path: str | None = None, sample: int = 24, per_flag: int = 8, seed: int = 0,
                       columns: int = COLUMNS, tile_px: int = TILE_PX) -> str:
    """Write a QC contact sheet of `output` (folder or URI) as PNG and return where (`path`, or OUTPUT/qc/contact_sheet.png).

    See the module docstring for what it shows. `sample` random rows and up to `per_flag` rows per QC
    flag; the same output and seed give the same sheet. An output with no image rows gets a sheet that
    says so. ValueError when `output` is not a job output (see `plan_contact_sheet`).
    """
    plan = plan_contact_sheet(output, sample=sample, per_flag=per_flag, seed=seed)
    sheet, _ = render_contact_sheet(output, plan, columns=columns, tile_px=tile_px)
    ok, png = cv2.imencode(".png", sheet)
    if not ok:
        raise ValueError(f"expected OpenCV to encode the {sheet.shape} sheet as PNG, it could not")
    target = sheet_location(output, path)
    fs, where = output_fs(target)
    fs.create_dir(posixpath.dirname(where), recursive=True)
    with fs.open_output_stream(where) as f:
        f.write(png.tobytes())
    log.info("contact sheet of %d images (%d sections) written to %s", plan.n_images, len(plan.groups), target)
    return target
