"""The dataset card: `datasets.load_dataset(OUTPUT)` gives PIL images, and the errors as a second config
(issue #10.2), with the real Hugging Face `datasets` library, not a mock."""

from __future__ import annotations

import shutil

import pytest
from conftest import SAMPLES

from pipeline.config import JobConfig
from pipeline.dataset import run_job

pytestmark = pytest.mark.slow
datasets = pytest.importorskip("datasets")


def test_load_dataset_reads_the_output_with_images_and_errors(ray_local, tmp_path):
    from PIL import Image

    root = tmp_path / "in"
    shutil.copytree(SAMPLES / "xrays", root)
    (root / "junk.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    manifest = run_job(JobConfig(inputs=(str(root),), output=str(out), variants=("masked", "masked_crop_eq")))
    images = datasets.load_dataset(str(out), split="train")
    assert images.num_rows == manifest["counts"]["ok"] == 9
    row = images[0]
    assert isinstance(row["masked_png"], Image.Image) and isinstance(row["mask_png"], Image.Image)
    assert row["masked_crop_eq_png"].size == (row["masked_crop_eq_width"], row["masked_crop_eq_height"])
    assert isinstance(row["qc_flags"], list)
    errors = datasets.load_dataset(str(out), "errors", split="train")
    assert errors.num_rows == 1 and errors[0]["stage"] == "decode"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "9 images" in card
