"""Train a classifier straight from the job's output: labels, a patient-level split, and two loaders.

    labels_from_csv        CSV (key, label[, split]) -> Labels: class ids in sorted name order
    patient_split          a stable split by pseudo_patient_id, so that no patient is in two splits
    XrayParquetDataset     a map-style torch Dataset, no Ray: (float32 (1, S, S) in [0, 1], int label)
    ray_dataset            a Ray Dataset of {"image", "label"} rows for iter_torch_batches and Ray Train

Both loaders choose rows with `select_rows` and make pixels with `load_image`, so they give the same
rows and the same pixels. They read OUTPUT/images/part-*.parquet from a folder or a URI (s3://,
gs://, file://), only the small columns up front and one variant's PNG column after that.

Rows: QC-passing only by default (`qc="all"` keeps every row); with labels, rows with no label are
left out; with `split`, only that split's rows. Images: decoded, then letterboxed to size x size (the
longer side scaled to size, the other padded black, centred) or, with `resize="square"`, stretched;
the same geometry as the job's `--resize-mode`, so an output written with `--size S` passes through
unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.png import decode_png
from pipeline.variants import EIGHT_BIT_SHIFT, VariantConfig, resize_output
from pipeline.writer import IMAGES_DIR, list_shards, output_fs

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

LABEL_KEYS = ("source_sha256", "source_path")  # output columns a labels CSV can be keyed by
QC_MODES = ("pass", "all")  # "pass": rows with qc_pass true; "all": every row
DTYPES = ("float32", "uint8")  # image dtypes: float32 in [0, 1], or uint8 0..255 (4x fewer bytes to move)
TRAIN, VAL, TEST = "train", "val", "test"  # the names patient_split gives
HASH_BUCKETS = 2**32  # a group's place in [0, 1) is sha256[:8] / HASH_BUCKETS
UNLABELED = -1  # the label of a row when no labels are given
INDEX_COLUMNS = ("source_sha256", "source_path", "qc_pass", "pseudo_patient_id")  # what selecting rows reads
DECODE_BATCH = 32  # rows per Ray map_batches call: 32 x 224 x 224 float32 is 6 MB out


# --- labels and splits ----------------------------------------------------------------------


@dataclass(frozen=True)
class Labels:
    """Class labels, and optionally splits, for output rows, keyed by one of their columns."""

    key: str  # the output column the keys are values of: "source_sha256" or "source_path"
    classes: tuple[str, ...]  # class names; a class id is a position here
    ids: dict[str, int]  # key -> class id, 0..len(classes) - 1
    splits: dict[str, str] | None = None  # key -> split name, when the CSV has a split column

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def labels_from_csv(path: str | os.PathLike, *, key: str = "source_sha256", label_column: str = "label",
                    split_column: str | None = None) -> Labels:
    """Read a CSV (local path or URI) with a `key` column, a `label_column` and optionally a `split_column`.

    Labels are names (strings or integers); class ids follow their sorted order, numeric when every
    name is an integer ("covid", "normal", "pneumonia" -> 0, 1, 2; "2", "10" -> 0, 1). A key may repeat
    with the same label and split. ValueError for a missing column, an empty cell, or a key given two
    labels or two splits.
    """
    if key not in LABEL_KEYS:
        raise ValueError(f"key must be one of {LABEL_KEYS}, got {key!r}")
    fs, where = output_fs(str(path))
    with fs.open_input_stream(where) as f:
        reader = csv.DictReader(io.StringIO(f.read().decode("utf-8-sig")))
    wanted = [c for c in (key, label_column, split_column) if c]
    if missing := [c for c in wanted if c not in (reader.fieldnames or [])]:
        raise ValueError(f"{path}: expected columns {wanted}, missing {missing}; it has {reader.fieldnames}")
    names: dict[str, str] = {}
    splits: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        cells = {c: (row[c] or "").strip() for c in wanted}
        if empty := [c for c, v in cells.items() if not v]:
            raise ValueError(f"{path} line {line}: expected a value in every one of {wanted}, got none in {empty}")
        _set_once(names, cells[key], cells[label_column], what=label_column, where=f"{path} line {line}")
        if split_column:
            _set_once(splits, cells[key], cells[split_column], what=split_column, where=f"{path} line {line}")
    classes = tuple(_sorted_names(set(names.values())))
    index = {name: i for i, name in enumerate(classes)}
    return Labels(key=key, classes=classes, ids={k: index[v] for k, v in names.items()},
                  splits=splits if split_column else None)


def _set_once(table: dict[str, str], key: str, value: str, *, what: str, where: str) -> None:
    if table.setdefault(key, value) != value:
        raise ValueError(f"{where}: {key} has {what} {value!r}, but {table[key]!r} on an earlier line")


def _sorted_names(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def patient_split(patient_ids: Sequence[str | None], *, val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0, source_sha256: Sequence[str] | None = None) -> list[str]:
    """One split name per row, "train", "val" or "test", the same for every row of a patient.

    A row's group is its pseudo_patient_id or, where that is None, its own source_sha256. The group's
    place u = sha256(f"{seed}:{group}")[:8] / 2**32 in [0, 1) decides: u < test_fraction -> "test",
    then the next val_fraction -> "val", else "train". No random draw: the same ids give the same
    split on every call and machine, and a new image of a known patient joins its patient's split.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"expected fractions >= 0 that sum to <= 1, got val {val_fraction}, test {test_fraction}")
    if source_sha256 is not None and len(source_sha256) != len(patient_ids):
        raise ValueError(f"expected one source_sha256 per patient id, got {len(source_sha256)} for {len(patient_ids)}")
    out = []
    for i, pid in enumerate(patient_ids):
        if pid is None and source_sha256 is None:
            raise ValueError(f"row {i} has no patient id; pass source_sha256 to split such rows by image")
        group = pid if pid is not None else source_sha256[i]
        u = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) / HASH_BUCKETS
        out.append(TEST if u < test_fraction else VAL if u < test_fraction + val_fraction else TRAIN)
    return out


@dataclass(frozen=True)
class SplitConfig:
    """How the loaders split rows when the labels carry no split column (see patient_split)."""

    val_fraction: float = 0.1  # share of patients in "val"
    test_fraction: float = 0.0  # share of patients in "test"
    seed: int = 0  # another seed, another split of the same patients


# --- choosing rows and making pixels (shared by both loaders) -------------------------------


def select_rows(index: pa.Table, *, qc: str, labels: Labels | None, split: str | None,
                split_config: SplitConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The rows of `index` (a table with INDEX_COLUMNS) that a loader keeps.

    Returns (positions: int64 (n,) into index, labels: int64 (n,), class ids or -1 without labels,
    dropped: {"qc_failed", "unlabeled", "other_split": rows left out}, each row counted for its first reason).
    """
    passed = index.column("qc_pass").fill_null(False).to_numpy()
    keep = passed if qc == "pass" else np.ones(index.num_rows, bool)
    dropped = {"qc_failed": int((~keep).sum())}
    targets = np.full(index.num_rows, UNLABELED, np.int64)
    if labels is not None:
        keys = index.column(labels.key).to_pylist()
        targets = np.array([labels.ids.get(k, UNLABELED) for k in keys], np.int64)
        dropped["unlabeled"] = int((keep & (targets == UNLABELED)).sum())
        keep = keep & (targets != UNLABELED)
    if split is not None:
        in_split = np.array(row_splits(index, labels, split_config), dtype=object) == split
        dropped["other_split"] = int((keep & ~in_split).sum())
        keep = keep & in_split
    positions = np.flatnonzero(keep)
    return positions, targets[positions], dropped


def row_splits(index: pa.Table, labels: Labels | None, split_config: SplitConfig) -> list[str | None]:
    """Each row's split: from the labels' split column when they have one, else patient_split."""
    if labels is not None and labels.splits is not None:
        return [labels.splits.get(k) for k in index.column(labels.key).to_pylist()]
    return patient_split(index.column("pseudo_patient_id").to_pylist(), val_fraction=split_config.val_fraction,
                         test_fraction=split_config.test_fraction, seed=split_config.seed,
                         source_sha256=index.column("source_sha256").to_pylist())


def load_image(png: bytes, *, size: int, resize: str = "letterbox", dtype: str = "float32") -> np.ndarray:
    """PNG bytes (8- or 16-bit gray) -> (1, size, size) float32 in [0, 1] (value / 255 or / 65535), or uint8
    (a 16-bit image's high byte). Letterboxed (black padding) or stretched as in the module docstring."""
    img = resize_output(decode_png(png), VariantConfig(size=size, resize_mode=resize))
    if dtype == "uint8":
        return (img if img.dtype == np.uint8 else (img >> EIGHT_BIT_SHIFT).astype(np.uint8))[None]
    return (img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max))[None]


def check_options(*, size: int, resize: str, qc: str, dtype: str, labels: Labels | None, split: str | None) -> None:
    """ValueError, before any reading, for an option no loader accepts."""
    VariantConfig(size=size, resize_mode=resize)  # checks size >= 1 and the resize mode
    if qc not in QC_MODES:
        raise ValueError(f"qc must be one of {QC_MODES}, got {qc!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    named = set(labels.splits.values()) if labels is not None and labels.splits is not None else {TRAIN, VAL, TEST}
    if split is not None and split not in named:
        raise ValueError(f"split must be one of {sorted(named)}, got {split!r}")


def image_shards(output: str | os.PathLike, variant: str) -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, finished OUTPUT/images shard paths, the variant's PNG column); ValueError when either is missing."""
    fs, _ = output_fs(str(output))
    shards = list_shards(str(output))[IMAGES_DIR]
    if not shards:
        raise ValueError(f"expected image shards ({IMAGES_DIR}/part-*.parquet) in {output}, found none")
    names = pq.read_schema(shards[0], filesystem=fs).names
    if f"{variant}_png" not in names:
        have = [n.removesuffix("_png") for n in names if n.endswith("_png") and n != "mask_png"]
        raise ValueError(f"expected variant {variant!r} in {output}, it has {have}")
    return fs, shards, f"{variant}_png"


# --- the torch Dataset ----------------------------------------------------------------------


class XrayParquetDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over an output: item i is (image, label).

    image: torch float32 (1, size, size) in [0, 1] (uint8 0..255 with dtype="uint8"), letterboxed by
    default; label: int class id of `labels`, -1 without labels. Building it reads only INDEX_COLUMNS
    and the row-group sizes; an item reads its row group's PNG column alone and keeps the last one,
    so reading in order (or in row-group order) reads every row group once; a shuffling DataLoader
    reads a row group per item. `rows` holds the kept rows' INDEX_COLUMNS and PNG positions (read_index)
    in item order, e.g. to attribute predictions to source_sha256.
    """

    def __init__(self, output: str | os.PathLike, *, variant: str = "masked_crop_eq", size: int = 224,
                 resize: str = "letterbox", qc: str = "pass", labels: Labels | None = None, split: str | None = None,
                 split_config: SplitConfig = SplitConfig(), dtype: str = "float32") -> None:
        check_options(size=size, resize=resize, qc=qc, dtype=dtype, labels=labels, split=split)
        self.fs, self.shards, self.column = image_shards(output, variant)
        self.size, self.resize, self.dtype = size, resize, dtype
        index = read_index(self.fs, self.shards)
        positions, self.targets, dropped = select_rows(index, qc=qc, labels=labels, split=split,
                                                       split_config=split_config)
        self.rows = index.take(positions)
        self._where = np.stack([self.rows.column(c).to_numpy() for c in ("shard", "row_group", "row")], axis=1)
        self._cached: tuple[tuple[int, int] | None, pa.ChunkedArray | None] = (None, None)
        log.info("%s: %d of %d rows kept (left out: %s)", output, len(self), index.num_rows, dropped)

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        shard, group, row = (int(v) for v in self._where[i])
        image = load_image(self._row_group(shard, group)[row].as_py(), size=self.size, resize=self.resize,
                           dtype=self.dtype)
        return torch.from_numpy(image), int(self.targets[i])

    def _row_group(self, shard: int, group: int) -> pa.ChunkedArray:
        """The PNG column of one row group, read once and kept until another is asked for."""
        if self._cached[0] != (shard, group):
            pngs = pq.ParquetFile(self.shards[shard], filesystem=self.fs).read_row_group(group, columns=[self.column])
            self._cached = ((shard, group), pngs.column(0))
        return self._cached[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": (None, None)}  # DataLoader workers need not get the cached row group


def read_index(fs: pafs.FileSystem, shards: list[str]) -> pa.Table:
    """INDEX_COLUMNS of every row of `shards`, plus where its PNG is: shard (position in `shards`),
    row_group, row (position in its row group); all int32."""
    parts = []
    for s, path in enumerate(shards):
        f = pq.ParquetFile(path, filesystem=fs)
        sizes = np.array([f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)], np.int64)
        table = f.read(columns=list(INDEX_COLUMNS))
        where = {
            "shard": np.full(table.num_rows, s),
            "row_group": np.repeat(np.arange(len(sizes)), sizes),
            "row": np.arange(table.num_rows) - np.repeat(np.cumsum(sizes) - sizes, sizes),
        }
        for name, values in where.items():
            table = table.append_column(name, pa.array(values.astype(np.int32)))
        parts.append(table)
    return pa.concat_tables(parts)


# --- the Ray Dataset ------------------------------------------------------------------------


def ray_dataset(output: str | os.PathLike, *, variant: str = "masked_crop_eq", size: int = 224,
                resize: str = "letterbox", qc: str = "pass", labels: Labels | None = None, split: str | None = None,
                split_config: SplitConfig = SplitConfig(), dtype: str = "float32",
                ids: bool = False) -> ray.data.Dataset:
    """A lazy Ray Dataset of rows {"image": float32 (1, size, size) in [0, 1] (or uint8), "label": int64
    (-1 without labels)}, plus "source_sha256": str with `ids=True` (leave it out for iter_torch_batches,
    which turns only numbers into tensors). The same rows and pixels as XrayParquetDataset.

    Reads INDEX_COLUMNS and the variant's PNG column; `labels` travel to the workers with the function
    (put in the object store once), so they join without a shuffle. Rows with no label are left out.
    """
    import ray.data  # here, not above: the torch Dataset works without Ray

    check_options(size=size, resize=resize, qc=qc, dtype=dtype, labels=labels, split=split)
    fs, shards, column = image_shards(output, variant)
    ds = ray.data.read_parquet(shards, filesystem=fs).select_columns([*INDEX_COLUMNS, column])  # pushed into the read
    return ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=DECODE_BATCH,
        fn_kwargs={"column": column, "size": size, "resize": resize, "dtype": dtype, "ids": ids, "qc": qc,
                   "labels": labels, "split": split, "split_config": split_config})


def decode_batch(batch: pa.Table, *, column: str, size: int, resize: str, dtype: str, ids: bool,
                 **select: object) -> dict[str, np.ndarray]:
    """Ray adapter: the kept rows of `batch` (select_rows with `select`) -> {"image": (n, 1, size, size),
    "label": int64 (n,)[, "source_sha256": str (n,)]}."""
    positions, targets, dropped = select_rows(batch, **select)
    log.debug("batch of %d rows: %d kept (left out: %s)", batch.num_rows, len(positions), dropped)
    images = np.zeros((len(positions), 1, size, size), dtype)
    for i, png in enumerate(batch.column(column).take(positions).to_pylist()):
        images[i] = load_image(png, size=size, resize=resize, dtype=dtype)
    out = {"image": images, "label": targets}
    if ids:
        out["source_sha256"] = np.array(batch.column("source_sha256").take(positions).to_pylist(), dtype=object)
    return out
