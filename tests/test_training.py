"""Training data, augmentation, loss and the train loop on tiny synthetic pairs."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from corpus import phantom_xray, write_dicom

from pipeline.decode import decode_image
from pipeline.model import load_model, read_weights
from pipeline.model_input import ModelMeta
from pipeline.training import (
    TRAIN,
    VAL,
    AugmentConfig,
    PairDataset,
    TrainConfig,
    augment_geometry,
    augment_intensity,
    augmented_inputs,
    cycle_factor,
    dice_bce_loss,
    dice_scores,
    hash_split,
    load_pairs,
    lr_factor,
    patient_key,
    random_affines,
    recompute_batchnorm,
    train,
)

REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = {"input_size": 32, "base_width": 4, "depth": 2, "batch_size": 4, "loader_workers": 0}


def _load_job(name: str):
    return importlib.import_module(f"pipeline.commands.{name}")


def _pair(i: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and 0/255 mask: two dark elliptic 'lungs' in a brighter body, varying per i."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    mask = np.zeros((size, size), bool)
    for cx in (0.3 + rng.uniform(-0.03, 0.03), 0.7 + rng.uniform(-0.03, 0.03)):
        mask |= ((x - cx) / 0.13) ** 2 + ((y - 0.5) / rng.uniform(0.25, 0.32)) ** 2 < 1
    img = 150 + 60 * x - 110 * mask + rng.normal(0, 6, mask.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


@pytest.fixture
def pair_folder(tmp_path) -> Path:
    """tmp_path/pairs/{images,masks}/case (i).png, 16 pairs; names with spaces and parentheses."""
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(16):
        img, mask = _pair(i)
        cv2.imwrite(str(root / "images" / f"case ({i}).png"), img)
        cv2.imwrite(str(root / "masks" / f"case ({i}).png"), mask)
    return root


# ------------------------------------------------------------------------------------------- data


def test_patient_key_and_stable_hash_split():
    assert patient_key("00000013_005") == "00000013"
    assert patient_key("CHNCXR_0001_0") == "CHNCXR_0001"
    assert patient_key("patient00042_study3_view1_frontal") == "patient00042"
    assert patient_key("Non_COVID (28)") == "Non_COVID (28)"
    assert hash_split("00000013_000", val_fraction=0.5) == hash_split("00000013_007", val_fraction=0.5)
    splits = [hash_split(f"img{i}", val_fraction=0.2) for i in range(2000)]
    assert splits == [hash_split(f"img{i}", val_fraction=0.2) for i in range(2000)]
    assert 0.15 < splits.count(VAL) / len(splits) < 0.25


def test_load_pairs_folder_and_manifest(pair_folder):
    pairs = load_pairs(pair_folder, val_fraction=0.3)
    assert len(pairs.names) == 16 and set(pairs.split) <= {TRAIN, VAL}
    assert pairs.images[0].dtype == np.uint8 and pairs.masks[0].dtype == bool
    manifest = pair_folder / "list.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "split", "class"])
        for i in range(6):
            w.writerow([f"images/case ({i}).png", f"masks/case ({i}).png", ["Train", "Val", "Test"][i % 3], "x"])
    m = load_pairs(manifest)
    assert m.names == ["case (0)", "case (1)", "case (3)", "case (4)"]
    assert m.split == [TRAIN, VAL, TRAIN, VAL]
    np.testing.assert_array_equal(m.masks[1], cv2.imread(str(pair_folder / "masks/case (1).png"), 0) > 0)


def test_image_files_are_read_with_the_jobs_decoder(tmp_path):
    """A MONOCHROME1 DICOM and a 16-bit PNG load as pipeline.decode reads them; an 8-bit image and the same
    image stored as 16 bit (x257) give identical model inputs, with and without augmentation."""
    phantom = phantom_xray(64, 64)  # uint16, lungs 12000..15000
    lungs = ((phantom >= 12000) & (phantom < 16000)).astype(np.uint8) * 255
    u8 = (phantom >> 8).astype(np.uint8)
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    write_dicom(root / "images" / "a.dcm", pixels=4095 - (phantom >> 4), photometric="MONOCHROME1", bits_stored=12)
    cv2.imwrite(str(root / "images" / "b.png"), phantom)
    cv2.imwrite(str(root / "images" / "c.png"), u8)
    cv2.imwrite(str(root / "images" / "d.png"), u8.astype(np.uint16) * 257)
    for stem in "abcd":
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), lungs)

    pairs = load_pairs(root, val_fraction=0.0)
    assert pairs.names == ["a", "b", "c", "d"] and pairs.split == [TRAIN] * 4
    for name, img in zip(pairs.names, pairs.images):
        path = next((root / "images").glob(f"{name}.*"))
        np.testing.assert_array_equal(img, decode_image(path.read_bytes(), source=str(path)).pixels)
    dicom, png16, png8, png8_as_16 = pairs.images
    assert dicom.dtype == np.uint16 and dicom[lungs > 0].mean() < dicom[32, 32]  # inverted: lungs dark again
    np.testing.assert_array_equal(png16, phantom)
    assert png8.dtype == np.uint8 and png8_as_16.dtype == np.uint16
    np.testing.assert_array_equal(png8_as_16, png8.astype(np.uint16) * 257)
    for mask in pairs.masks:
        np.testing.assert_array_equal(mask, lungs > 0)

    meta = ModelMeta(name="t", input_size=32, normalization="equalize-u8", threshold=0.5)
    for augment in (None, AugmentConfig()):
        ds8 = PairDataset([png8], [pairs.masks[2]], meta, augment=augment, seed=3)
        ds16 = PairDataset([png8_as_16], [pairs.masks[3]], meta, augment=augment, seed=3)
        for _ in range(3):  # the same random stream on both sides
            torch.testing.assert_close(ds8[0], ds16[0], rtol=0, atol=0)


def test_pack_round_trip(pair_folder, tmp_path):
    pack = _load_job("pack_pairs")
    out = tmp_path / "packed.npz"
    stats = pack.pack(str(pair_folder), out, size=48, val_fraction=0.3)
    assert stats["pairs"] == 16
    original, packed = load_pairs(pair_folder, val_fraction=0.3), load_pairs(out)
    assert packed.names == original.names and packed.split == original.split
    for a, b, ma, mb in zip(original.images, packed.images, original.masks, packed.masks):
        np.testing.assert_array_equal(ma, mb)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 6  # JPEG q85 on white noise
    raw = tmp_path / "raw.npz"
    pack.pack(str(pair_folder), raw, encoding="raw", size=48)
    np.testing.assert_array_equal(load_pairs(raw).images[3], original.images[3])


# ----------------------------------------------------------------------------------- augmentation


def test_geometry_keeps_image_and_mask_aligned():
    size = 32
    mask = torch.zeros(8, 1, size, size)
    mask[:, :, 10:22, 6:14] = 1
    theta = random_affines(8, cfg=AugmentConfig(), generator=torch.Generator().manual_seed(0))
    img, m = augment_geometry(mask.clone(), mask, theta)
    assert torch.equal(img > 0.5, m > 0.5)  # same warp, same interpolation
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}


def test_geometry_exact_shift():
    size = 32
    img = torch.zeros(1, 1, size, size)
    img[0, 0, 10:20, 6:12] = 1
    theta = torch.tensor([[[1.0, 0.0, 0.25], [0.0, 1.0, -0.125]]])  # sample 4 px right and 2 px up
    out_img, out_mask = augment_geometry(img, img.clone(), theta)
    expected = torch.zeros_like(img)
    expected[0, 0, 12:22, 2:8] = 1  # content moves 4 px left, 2 px down
    torch.testing.assert_close(out_img, expected)
    torch.testing.assert_close(out_mask, expected)


def test_geometry_never_flips():
    theta = random_affines(5000, cfg=AugmentConfig(), generator=torch.Generator().manual_seed(1))
    assert (torch.linalg.det(theta[:, :, :2]) > 0).all()
    size = 64
    img = torch.zeros(64, 1, size, size)
    img[:, :, 24:40, 4:20] = 1  # a blob in the left quarter stays on the left
    out, _ = augment_geometry(img, img, theta[:64])
    xs = torch.arange(size, dtype=torch.float32)
    centroid_x = (out[:, 0].sum(1) * xs).sum(1) / out[:, 0].sum((1, 2))
    assert (centroid_x < size / 2 - 4).all()


def test_intensity_augmentation_shapes_and_range():
    img, _ = _pair(0, size=64)
    always = AugmentConfig(p_border=1, p_corner=1, p_gradient=1, p_clahe=1, p_blur=1, p_noise=1)
    rng = np.random.default_rng(0)
    for cfg in (always, AugmentConfig()):
        for src in (img, img.astype(np.uint16) * 257):
            out = augment_intensity(src, rng, cfg)
            assert out.dtype == np.uint16 and out.shape == src.shape
    borders = augment_intensity(img, np.random.default_rng(3), AugmentConfig(p_border=0, p_corner=1, p_noise=0))
    assert borders[0, 0] < 0.06 * 65535  # a dark corner patch


# ------------------------------------------------------------------------------------------- loss


def test_loss_and_dice():
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:6, 2:6] = 1
    assert dice_bce_loss((m * 2 - 1) * 20, m) < 0.01
    assert dice_bce_loss(-(m * 2 - 1) * 20, m) > 1.5
    pred = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    pred[0, :, 2:6, 2:4] = True  # half the square
    torch.testing.assert_close(dice_scores(pred, m > 0), torch.tensor([2 * 8 / (8 + 16), 0.0]))
    torch.testing.assert_close(dice_scores(torch.zeros(1, 4), torch.zeros(1, 4)), torch.tensor([1.0]))


# ------------------------------------------------------------------------------------- train loop


def test_local_train_lowers_loss_and_saves_loadable_model(pair_folder, tmp_path):
    out = tmp_path / "w" / "lung.pt"
    cfg = TrainConfig(data=str(pair_folder), out=str(out), epochs=4, lr=1e-2, val_fraction=0.25,
                      checkpoint_dir=str(tmp_path / "ck"), command="test", **TINY_ARCH)
    result = train(cfg)
    assert result["epochs"] == 4
    meta = read_weights(out).meta
    history = meta.training["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta.input_size == 32 and meta.arch["base_width"] == 4 and meta.training["epochs"] == 4
    assert meta.metrics["val_dice"] == pytest.approx(result["best_val_dice"])
    model, _ = load_model(out)
    with torch.inference_mode():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert (tmp_path / "ck" / "last.pt").is_file()


def test_resume_continues_from_checkpoint(pair_folder, tmp_path):
    base = dict(data=str(pair_folder), out=str(tmp_path / "m.pt"), checkpoint_dir=str(tmp_path / "ck"), **TINY_ARCH)
    train(TrainConfig(epochs=1, **base))
    result = train(TrainConfig(epochs=2, resume=True, **base))
    assert result["epochs"] == 2
    assert [h["epoch"] for h in read_weights(tmp_path / "m.pt").meta.training["history"]] == [1, 2]


def test_time_budget_stops_training(pair_folder, tmp_path):
    cfg = TrainConfig(data=str(pair_folder), out=str(tmp_path / "m.pt"), epochs=10_000, minutes=0.05, **TINY_ARCH)
    result = train(cfg)
    assert 1 <= result["epochs"] < 10_000
    assert (tmp_path / "m.pt").is_file()


def test_lr_schedules():
    assert lr_factor(0.0, warmup=0.1) == 0.01 and lr_factor(0.05, warmup=0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, warmup=0.1) == pytest.approx(1.0) and lr_factor(1.0, warmup=0.1) == pytest.approx(0.01)
    assert lr_factor(0.55, warmup=0.1) == pytest.approx(0.505)
    assert cycle_factor(0.0) == pytest.approx(1.0) and cycle_factor(0.5) == pytest.approx(0.505)
    assert cycle_factor(1.0) == pytest.approx(0.01)


def test_recompute_batchnorm_gives_the_plain_mean_and_variance():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1, momentum=0.1))
    torch.nn.init.constant_(model[0].weight, 2.0)  # the BatchNorm sees 2 * x / 255
    model.eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    seen = 2.0 * x.double() / 255
    recompute_batchnorm(model, x, batch_size=6)  # one batch: exactly its mean and unbiased variance
    bn = model[1]
    assert bn.running_mean.item() == pytest.approx(seen.mean().item(), rel=1e-5)
    assert bn.running_var.item() == pytest.approx(seen.var().item(), rel=1e-5)
    assert bn.momentum == 0.1 and not model.training  # restored
    recompute_batchnorm(model, x, batch_size=2)  # equal batches: the mean of the batch means is the mean
    assert bn.running_mean.item() == pytest.approx(seen.mean().item(), rel=1e-5)


def test_batchnorm_images_are_augmented_like_training(pair_folder):
    pairs = load_pairs(pair_folder, val_fraction=0.25)
    meta = ModelMeta(name="t", input_size=32, normalization="equalize-u8", threshold=0.5,
                     arch={"base_width": 4, "depth": 2})
    plain = PairDataset(pairs.images, pairs.masks, meta, augment=None)
    ds = PairDataset(pairs.images, pairs.masks, meta, augment=AugmentConfig(), seed=0)
    x = augmented_inputs(ds, n=5, augment=AugmentConfig(), seed=0)
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.uint8
    step = len(ds) // 5
    unaugmented = torch.stack([plain[i][0] for i in range(0, 5 * step, step)])
    assert (x.float() - unaugmented.float()).abs().mean() > 5  # not the plain inputs
    assert augmented_inputs(ds, n=100, augment=AugmentConfig()).shape[0] == len(ds)


def test_fine_tuning_starts_from_the_given_weights(pair_folder, tmp_path):
    base = tmp_path / "base.pt"
    train(TrainConfig(data=str(pair_folder), out=str(base), epochs=1, **TINY_ARCH))
    start, _ = load_model(base)
    tuned_path = tmp_path / "tuned.pt"
    # base_width 8 in the config: the file's arch (4) wins; lr ~0 leaves the weights where they started
    cfg = TrainConfig(data=str(pair_folder), out=str(tuned_path), epochs=1, lr=1e-12, init_weights=str(base),
                      **{**TINY_ARCH, "base_width": 8})
    train(cfg)
    tuned, meta = load_model(tuned_path)
    assert meta.arch["base_width"] == 4
    assert meta.training["fine_tuned_from"]["sha256"] == read_weights(base).sha256
    weights = lambda m: {k: v for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    for name, value in weights(start).items():
        torch.testing.assert_close(weights(tuned)[name], value, rtol=1e-3, atol=1e-4)
    fresh_path = tmp_path / "fresh.pt"
    train(dataclasses.replace(cfg, out=str(fresh_path), init_weights=None, base_width=4))
    fresh, _ = load_model(fresh_path)
    assert not torch.allclose(weights(fresh)["head.weight"], weights(start)["head.weight"])  # so the above can fail


def test_weight_averaging_keeps_the_average_across_resume(pair_folder, tmp_path):
    base = dict(data=str(pair_folder), out=str(tmp_path / "m.pt"), checkpoint_dir=str(tmp_path / "ck"),
                average=True, bn_images=4, **TINY_ARCH)
    train(TrainConfig(epochs=2, **base))
    ckpt = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert int(ckpt["averaged"]["n_averaged"]) == 2
    train(TrainConfig(epochs=3, resume=True, **base))
    ckpt = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert int(ckpt["averaged"]["n_averaged"]) == 3
    meta = read_weights(tmp_path / "m.pt").meta
    assert meta.training["schedule"] == "one cosine cycle per epoch, weight averaging"
    assert {h["lr"] for h in meta.training["history"]} == {round(TrainConfig(data="", out="").lr * 0.01, 5)}  # cycle ends


def test_local_backend_trains_a_packed_file_without_ray_or_pydicom(pair_folder, tmp_path):
    """jobs/train.py --backend local on a packed .npz with ray and pydicom made unimportable (the GPU image)."""
    packed = tmp_path / "packed.npz"
    _load_job("pack_pairs").pack(str(pair_folder), packed, size=48, val_fraction=0.25)
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['pydicom'] = None\n"
        "import runpy; sys.argv = ['jobs/train.py'] + sys.argv[1:]\n"
        "runpy.run_path('jobs/train.py', run_name='__main__')\n"
    )
    args = ["--backend", "local", "--data", str(packed), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
            "--input-size", "32", "--base-width", "4", "--depth", "2", "--loader-workers", "0"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "m.pt").is_file()


@pytest.mark.slow
def test_ray_backend_one_cpu_worker(ray_local, pair_folder, tmp_path):
    job = _load_job("train")
    cfg = TrainConfig(data=str(pair_folder), out=str(tmp_path / "m.pt"), epochs=1, limit=8, val_fraction=0.25,
                      **TINY_ARCH)
    job.run_ray(cfg, workers=1, gpu="no")
    meta = read_weights(tmp_path / "m.pt").meta
    assert meta.training["world_size"] == 1 and meta.training["epochs"] == 1


def test_load_pairs_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [_pair(i) for i in range(5)]
    enc = lambda a: cv2.imencode(".png", a)[1].tobytes()
    pq.write_table(pa.table({
        "image": [enc(img) for img, _ in pairs],
        "mask": [enc(m) for _, m in pairs],
        "name": [f"p{i}" for i in range(5)],
        "split": ["Train", "Train", "Val", "Train", "Test"],
    }), tmp_path / "pairs.parquet")
    ps = load_pairs(tmp_path / "pairs.parquet")
    assert ps.names == ["p0", "p1", "p2", "p3", "p4"]
    assert ps.indices(TRAIN) == [0, 1, 3] and ps.indices(VAL) == [2]
    for (img, m), got_img, got_m in zip(pairs, ps.images, ps.masks):
        assert np.array_equal(got_img, img) and np.array_equal(got_m, m > 0)
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing"):
        load_pairs(tmp_path / "bad.parquet")


# ------------------------------------------------------------------- levers for the model of issue #13


def test_boundary_band_is_the_ring_around_the_outline():
    from pipeline.training.metrics import boundary_band

    m = torch.zeros(1, 1, 6, 8)
    m[0, 0, 2:4, 3:5] = 1
    band = boundary_band(m, px=1)[0, 0]
    expected = torch.zeros(6, 8)
    expected[1:5, 2:6] = 1  # the 2x2 square grown by one; nothing is eroded away inside a 2x2 square but itself
    torch.testing.assert_close(band, expected)
    big = torch.zeros(1, 1, 10, 10)
    big[0, 0, 2:8, 2:8] = 1
    assert boundary_band(big, px=1)[0, 0, 5, 5] == 0  # deep inside: not in the band


def test_boundary_weight_weighs_errors_at_the_outline_only():
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 4:12, 4:12] = 1
    at_edge, far = (m * 2 - 1) * 20, (m * 2 - 1) * 20
    at_edge[0, 0, 4, 4:12] = -20  # the top row of the square missed: on the outline
    far[0, 0, 0, 0:8] = 20  # 8 pixels of background called lung, far from it
    plain = [float(dice_bce_loss(x, m)) for x in (at_edge, far)]
    weighted = [float(dice_bce_loss(x, m, boundary_weight=4.0, boundary_px=1)) for x in (at_edge, far)]
    assert weighted[0] > plain[0] * 2  # the outline error counts 5x in the BCE
    assert weighted[1] == pytest.approx(plain[1], rel=1e-6)  # the far one not at all


def test_oversampling_by_name():
    from pipeline.training.data import sampling_weights

    names = ["covid_12", "Non_COVID (28)", "Normal (10233)", "covid_7"]
    assert sampling_weights(names, {"^covid_": 2.0, "^non_covid": 3.0}) == [2.0, 3.0, 1.0, 2.0]
    assert sampling_weights(names, {}) == [1.0] * 4
    with pytest.raises(ValueError, match="positive"):
        sampling_weights(names, {"^covid_": 0.0})


def test_strong_augmentation_inverts_some_images():
    from pipeline.training.augment import STRONG_AUGMENT

    img = np.tile(np.linspace(0, 65535, 64, dtype=np.float32), (64, 1)).astype(np.uint16)  # dark left, bright right
    plain = dataclasses.replace(STRONG_AUGMENT, p_gradient=0, p_clahe=0, p_blur=0, p_sharpen=0, p_noise=0, p_corner=0,
                                p_border=0, gamma=(1.0, 1.0), contrast=(1.0, 1.0))
    rng = np.random.default_rng(0)
    flipped = [int(out[:, :8].mean()) > int(out[:, -8:].mean()) for out in (augment_intensity(img, rng, plain) for _ in range(200))]
    assert 0.03 < np.mean(flipped) < 0.2  # p_invert = 0.1


def test_training_with_the_levers_runs_and_records_them(pair_folder, tmp_path):
    out = tmp_path / "m.pt"
    cfg = TrainConfig(data=str(pair_folder), out=str(out), epochs=2, val_fraction=0.25, boundary_weight=2.0,
                      oversample=(("case \\(1", 3.0),), augment="strong", command="levers", **TINY_ARCH)
    assert train(cfg)["epochs"] == 2
    assert read_weights(out).meta.training["command"] == "levers"
    with pytest.raises(ValueError, match="augment"):
        train(dataclasses.replace(cfg, augment="wild"))
