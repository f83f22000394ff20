"""Training loaders over the job's output: labels, patient split, the torch Dataset and the Ray Dataset.

Fast tests run on a tiny output written here with pyarrow (5 rows in two shards, one failing QC);
the slow ones start Ray, and run the job once on samples/xrays for the end-to-end checks and the
README example.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLES
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.loaders import (
    TEST,
    TRAIN,
    VAL,
    SplitConfig,
    XrayParquetDataset,
    labels_from_csv,
    patient_split,
    ray_dataset,
)
from pipeline.png import encode_png
from pipeline.schema import images_schema

# The tiny output: (source_sha256, constant image, qc_pass, pseudo_patient_id); shard 1 holds a, b, c
# in row groups [a, b], [c]; shard 2 holds d, e. Each image's value / its dtype's max is 1.0 ... 0.8.
TINY = [
    ("a", np.full((2, 4), 255, np.uint8), True, "p1"),  # wide: letterboxed to rows 1-2 of 4
    ("b", np.full((4, 4), 13107, np.uint16), True, "p1"),  # 16-bit, 0.2
    ("c", np.full((4, 4), 102, np.uint8), False, "p2"),  # fails QC, 0.4
    ("d", np.full((4, 4), 153, np.uint8), True, None),  # no patient id, 0.6
    ("e", np.full((4, 2), 204, np.uint8), True, "p2"),  # tall: letterboxed to columns 1-2 of 4
]
VALUE = {sha: float(img.max()) / np.iinfo(img.dtype).max for sha, img, _, _ in TINY}


def write_shard(path: Path, entries: list[tuple], *, row_group_size: int) -> None:
    rows = [{"source_path": f"{sha}.png", "source_sha256": sha, "qc_pass": ok, "qc_flags": [] if ok else ["no_lungs"],
             "pseudo_patient_id": pid, "masked_png": encode_png(img), "masked_height": img.shape[0],
             "masked_width": img.shape[1]} for sha, img, ok, pid in entries]
    pq.write_table(pa.Table.from_pylist(rows, schema=images_schema(("masked",))), path, row_group_size=row_group_size)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    write_shard(tmp_path / "images" / "part-1-000.parquet", TINY[:3], row_group_size=2)
    write_shard(tmp_path / "images" / "part-2-000.parquet", TINY[3:], row_group_size=2)
    return tmp_path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def images_by_sha(ds: XrayParquetDataset) -> dict[str, tuple[torch.Tensor, int]]:
    return dict(zip(ds.rows.column("source_sha256").to_pylist(), (ds[i] for i in range(len(ds)))))


# --- labels and splits ----------------------------------------------------------------------


def test_labels_from_csv_maps_names_to_sorted_ids(tmp_path):
    path = write_csv(tmp_path / "labels.csv", ["source_sha256", "label", "fold"],
                     [["a", "pneumonia", "train"], ["b", "covid", "val"], ["c", "normal", "train"],
                      ["a", "pneumonia", "train"]])  # a repeated key with the same label is fine
    labels = labels_from_csv(path, split_column="fold")
    assert labels.classes == ("covid", "normal", "pneumonia") and labels.num_classes == 3
    assert labels.ids == {"a": 2, "b": 0, "c": 1}
    assert labels.splits == {"a": "train", "b": "val", "c": "train"}
    assert labels_from_csv(f"file://{path}").ids == labels.ids

    numbers = write_csv(tmp_path / "numbers.csv", ["source_path", "y"], [["x.png", "10"], ["y.png", "2"]])
    labels = labels_from_csv(numbers, key="source_path", label_column="y")
    assert labels.classes == ("2", "10") and labels.ids == {"x.png": 1, "y.png": 0} and labels.splits is None


@pytest.mark.parametrize("rows, kwargs, message", [
    ([["a", "covid", "train"], ["a", "normal", "train"]], {}, "a has label 'normal', but 'covid'"),
    ([["a", "covid", "train"], ["a", "covid", "val"]], {"split_column": "split"}, "a has split 'val', but 'train'"),
    ([["a", "covid", "train"]], {"label_column": "class"}, "missing ['class']"),
    ([["a", "", "train"]], {}, "line 2: expected a value"),
    ([["a", "covid", "train"]], {"key": "pseudo_patient_id"}, "key must be one of"),
])
def test_labels_from_csv_refuses_bad_tables(tmp_path, rows, kwargs, message):
    path = write_csv(tmp_path / "labels.csv", ["source_sha256", "label", "split"], rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        labels_from_csv(path, **kwargs)


def test_patient_split_keeps_patients_whole_and_is_stable():
    patients = [f"patient-{i}" for i in range(1000)]
    ids = patients + patients[:300] + [None] * 200  # 300 patients with a second image, 200 images without an id
    shas = [f"sha-{i}" for i in range(len(ids))]
    splits = patient_split(ids, val_fraction=0.2, test_fraction=0.1, source_sha256=shas)

    by_patient: dict[str, set[str]] = {}
    for pid, s in zip(ids, splits):
        if pid is not None:
            by_patient.setdefault(pid, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    shares = Counter(splits[:1000])
    assert abs(shares[VAL] / 1000 - 0.2) < 0.04 and abs(shares[TEST] / 1000 - 0.1) < 0.03
    assert set(splits[1300:]) == {TRAIN, VAL, TEST}  # images without a patient id split by their own sha256
    assert patient_split(ids, val_fraction=0.2, test_fraction=0.1, source_sha256=shas) == splits
    assert patient_split(ids, val_fraction=0.2, test_fraction=0.1, source_sha256=shas, seed=1) != splits


def test_patient_split_refuses_bad_input():
    with pytest.raises(ValueError, match="sum to <= 1"):
        patient_split(["p"], val_fraction=0.7, test_fraction=0.4)
    with pytest.raises(ValueError, match="row 1 has no patient id"):
        patient_split(["p", None], val_fraction=0.1)


# --- the torch Dataset ----------------------------------------------------------------------


def test_dataset_letterboxes_and_scales_to_0_1(tiny):
    ds = XrayParquetDataset(tiny, variant="masked", size=4)
    items = images_by_sha(ds)
    assert sorted(items) == ["a", "b", "d", "e"]  # c fails QC
    for sha, (img, label) in items.items():
        assert img.shape == (1, 4, 4) and img.dtype == torch.float32 and label == -1
        assert img[0, 2, 2].item() == pytest.approx(VALUE[sha])
    wide, tall = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    wide[1:3, :], tall[:, 1:3] = 1.0, 0.8
    np.testing.assert_allclose(items["a"][0][0].numpy(), wide)
    np.testing.assert_allclose(items["e"][0][0].numpy(), tall, rtol=1e-6)

    square = XrayParquetDataset(tiny, variant="masked", size=4, resize="square")
    assert torch.all(square[0][0] == 1.0)  # stretched, no padding
    as_bytes = images_by_sha(XrayParquetDataset(tiny, variant="masked", size=4, dtype="uint8"))
    assert as_bytes["b"][0].dtype == torch.uint8 and as_bytes["b"][0][0, 2, 2].item() == 13107 >> 8


def test_dataset_filters_qc_unless_asked_for_all(tiny):
    assert "c" not in images_by_sha(XrayParquetDataset(tiny, variant="masked", size=4))
    every = images_by_sha(XrayParquetDataset(tiny, variant="masked", size=4, qc="all"))
    assert sorted(every) == ["a", "b", "c", "d", "e"]
    assert every["c"][0][0, 2, 2].item() == pytest.approx(0.4)


def recording(method, calls: list):
    """`method` of pq.ParquetFile, appending the `columns` of each call to `calls`."""
    def wrapper(self, *args, columns=None, **kwargs):
        calls.append(columns)
        return method(self, *args, columns=columns, **kwargs)
    return wrapper


def test_dataset_reads_small_columns_then_one_row_group_at_a_time(tiny, monkeypatch):
    reads, groups = [], []
    monkeypatch.setattr(pq.ParquetFile, "read", recording(pq.ParquetFile.read, reads))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording(pq.ParquetFile.read_row_group, groups))
    ds = XrayParquetDataset(tiny, variant="masked", size=4, qc="all")
    assert reads and not any("masked_png" in columns for columns in reads)
    assert [ds[i][0][0, 2, 2].item() for i in range(len(ds))] == pytest.approx([VALUE[s] for s in "abcde"])
    assert groups == [["masked_png"]] * 3  # [a, b], [c], [d, e]: each row group read once, in order


def test_dataset_labels_drop_unlabeled_rows_and_say_so(tiny, caplog):
    path = write_csv(tiny / "labels.csv", ["source_path", "label"],
                     [["a.png", "normal"], ["b.png", "covid"], ["c.png", "covid"]])
    labels = labels_from_csv(path, key="source_path")
    with caplog.at_level("INFO", logger="pipeline.loaders"):
        ds = XrayParquetDataset(tiny, variant="masked", size=4, labels=labels)
    assert {sha: label for sha, (_, label) in images_by_sha(ds).items()} == {"a": 1, "b": 0}
    assert "2 of 5 rows kept" in caplog.text and "'unlabeled': 2" in caplog.text and "'qc_failed': 1" in caplog.text


def test_dataset_splits_by_patient(tiny):
    config = SplitConfig(val_fraction=0.5)
    parts = {s: images_by_sha(XrayParquetDataset(tiny, variant="masked", size=4, qc="all", split=s,
                                                 split_config=config)) for s in (TRAIN, VAL)}
    assert sorted([*parts[TRAIN], *parts[VAL]]) == ["a", "b", "c", "d", "e"]
    for first, second in (("a", "b"), ("c", "e")):  # patients p1 and p2
        assert (first in parts[TRAIN]) == (second in parts[TRAIN])
    assert len(XrayParquetDataset(tiny, variant="masked", size=4, split=TEST, split_config=config)) == 0


def test_dataset_split_from_the_labels_csv(tiny):
    labels = labels_from_csv(write_csv(tiny / "labels.csv", ["source_sha256", "label", "fold"],
                                       [["a", "x", "A"], ["b", "x", "B"], ["d", "y", "B"]]), split_column="fold")
    fold_b = XrayParquetDataset(tiny, variant="masked", size=4, labels=labels, split="B")
    assert sorted(images_by_sha(fold_b)) == ["b", "d"]
    with pytest.raises(ValueError, match=r"split must be one of \['A', 'B'\], got 'train'"):
        XrayParquetDataset(tiny, variant="masked", size=4, labels=labels, split=TRAIN)


def test_dataset_reads_a_file_uri(tiny):
    uri = XrayParquetDataset(f"file://{tiny}", variant="masked", size=4)
    local = XrayParquetDataset(tiny, variant="masked", size=4)
    assert len(uri) == len(local) == 4 and torch.equal(uri[3][0], local[3][0])


def test_dataset_refuses_bad_options(tiny, tmp_path_factory):
    with pytest.raises(ValueError, match=r"expected variant 'masked_crop_eq' in .*, it has \['masked'\]"):
        XrayParquetDataset(tiny)
    with pytest.raises(ValueError, match="expected image shards"):
        XrayParquetDataset(tmp_path_factory.mktemp("empty"), variant="masked")
    for bad, message in (({"qc": "fail"}, "qc must be one of"), ({"size": 0}, "size must be"),
                         ({"resize": "crop"}, "resize_mode must be"), ({"dtype": "float16"}, "dtype must be"),
                         ({"split": "holdout"}, "split must be one of")):
        with pytest.raises(ValueError, match=message):
            XrayParquetDataset(tiny, variant="masked", **bad)


# --- Ray, and the job's real output ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory) -> Path:
    """A folder with out/demo (the job on samples/xrays) and labels.csv (covid / normal / pneumonia by file name)."""
    from pipeline.config import JobConfig
    from pipeline.dataset import run_job

    root = tmp_path_factory.mktemp("demo")
    run_job(JobConfig(inputs=(str(SAMPLES / "xrays"),), output=str(root / "out" / "demo")))
    rows = pq.read_table(root / "out" / "demo" / "images", columns=["source_path", "source_sha256"]).to_pylist()
    def label(path: str) -> str:
        return "pneumonia" if "noncovid" in path else "covid" if "covid" in path else "normal"

    write_csv(root / "labels.csv", ["source_sha256", "label"],
              [[r["source_sha256"], label(r["source_path"])] for r in rows])
    return root


@pytest.mark.slow
def test_dataset_on_the_job_output(demo):
    labels = labels_from_csv(demo / "labels.csv")
    ds = XrayParquetDataset(demo / "out" / "demo", size=224, labels=labels)
    assert len(ds) == 9 and labels.classes == ("covid", "normal", "pneumonia")
    images, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=9)))
    assert images.shape == (9, 1, 224, 224) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert sorted(targets.tolist()) == sorted(labels.ids.values())


@pytest.mark.slow
def test_ray_dataset_gives_torch_batches(demo):
    labels = labels_from_csv(demo / "labels.csv")
    ds = ray_dataset(f"file://{demo}/out/demo", variant="masked_crop", size=64, labels=labels)
    batches = list(ds.iter_torch_batches(batch_size=4))
    assert [b["image"].shape for b in batches] == [(4, 1, 64, 64), (4, 1, 64, 64), (1, 1, 64, 64)]
    assert all(b["image"].dtype == torch.float32 and b["label"].dtype == torch.int64 for b in batches)
    assert sorted(torch.cat([b["label"] for b in batches]).tolist()) == sorted(labels.ids.values())


@pytest.mark.slow
def test_ray_and_torch_give_the_same_rows_and_pixels(ray_local, tiny):
    labels = labels_from_csv(write_csv(tiny / "labels.csv", ["source_sha256", "label"],
                                       [["a", "0"], ["b", "1"], ["c", "1"], ["e", "0"]]))
    rows = ray_dataset(tiny, variant="masked", size=4, labels=labels, ids=True).take_all()
    local = images_by_sha(XrayParquetDataset(tiny, variant="masked", size=4, labels=labels))
    assert sorted(r["source_sha256"] for r in rows) == sorted(local) == ["a", "b", "e"]  # c fails QC, d unlabeled
    for r in rows:
        image, label = local[r["source_sha256"]]
        assert r["label"] == label and np.array_equal(r["image"], image.numpy())


@pytest.mark.slow
def test_readme_example(demo, monkeypatch):
    """The README's "Train a classifier" lines, as they are, in a folder holding out/demo and labels.csv."""
    before, steps = [], []

    def snapshot(optimizer, args, kwargs):  # the parameters before the first step, and the number of steps
        steps.append(1)
        if not before:
            before.extend(p.detach().clone() for group in optimizer.param_groups for p in group["params"])

    monkeypatch.chdir(demo)
    handle = register_optimizer_step_pre_hook(snapshot)
    try:
        # --- README example, verbatim ---
        import torch

        from pipeline.loaders import XrayParquetDataset, labels_from_csv

        labels = labels_from_csv("labels.csv")  # columns source_sha256,label (e.g. covid, normal, pneumonia)
        train = XrayParquetDataset("out/demo", variant="masked_crop_eq", size=224, labels=labels, split="train")
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(8, labels.num_classes))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for images, targets in torch.utils.data.DataLoader(train, batch_size=4, shuffle=True):  # (4, 1, 224, 224)
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # --- end of the README example ---
    finally:
        handle.remove()
    assert len(steps) == -(-len(train) // 4) >= 2
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, a) for b, a in zip(before, model.parameters()))
