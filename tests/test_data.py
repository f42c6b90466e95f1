"""Tests of kernel.data: stratified subsets, the synthetic dataset, image-folder and published layouts,
error messages, and the real CIFAR-10 (via the ``cifar10_root`` fixture in conftest.py)."""
from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kernel.data as data
from kernel.data import DATASETS, DataError, dataset_info, load_dataset, stratified_indices

# ---------------------------------------------------------------------------------- stratified_indices


@pytest.mark.parametrize("n", [1, 7, 10, 333, 999, 1000])
def test_stratified_exact_sorted_unique(n):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    idx = stratified_indices(labels, n, seed=3)
    assert idx.dtype == torch.int64 and len(idx) == n
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == n


def test_stratified_deterministic_and_seeded():
    labels = torch.arange(500) % 5
    a, b = stratified_indices(labels, 100, 0), stratified_indices(labels, 100, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, stratified_indices(labels, 100, 1))


def test_stratified_proportions_and_remainders():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert torch.bincount(labels[stratified_indices(labels, 10, 0)]).tolist() == [5, 3, 2]
    # 3 equal classes, n=4: one leftover, given to the smallest label on a tie.
    eq = torch.arange(9) % 3
    assert torch.bincount(eq[stratified_indices(eq, 4, 0)]).tolist() == [2, 1, 1]
    # Largest remainder wins: counts 6/3/1 of 10, n=5 -> exact 3/1.5/0.5 -> 3/2/0 (class 1 wins the tie
    # with class 2 by label order) and never more than a class holds.
    skew = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert torch.bincount(skew[stratified_indices(skew, 5, 0)], minlength=3).tolist() == [3, 2, 0]


def test_stratified_nested_and_arbitrary_labels():
    labels = torch.tensor([7, 3, 7, 3, 9, 9, 7, 3, 9, 7] * 20)  # non-contiguous label values
    small, big = set(stratified_indices(labels, 30, 5).tolist()), set(stratified_indices(labels, 90, 5).tolist())
    assert small <= big  # larger n only adds samples (per class prefix of one permutation)


@pytest.mark.parametrize("n", [0, -1, 12])
def test_stratified_rejects_bad_n(n):
    with pytest.raises(ValueError):
        stratified_indices(torch.arange(11) % 2, n, 0)


# ---------------------------------------------------------------------------------- registry / info


def test_registry_and_info_without_io():
    assert {"cifar10", "gtsrb", "mnist", "tiny_imagenet", "synthetic"} <= set(DATASETS.names())
    expect = {"cifar10": (10, (3, 32, 32), 50000, 10000), "gtsrb": (43, (3, 32, 32), 26640, 12630),
              "mnist": (10, (1, 28, 28), 60000, 10000), "tiny_imagenet": (200, (3, 64, 64), 100000, 10000),
              "synthetic": (10, (3, 32, 32), 10000, 2000)}
    for name, (k, shape, ntr, nte) in expect.items():
        info = dataset_info(name)
        assert (info.name, info.num_classes, info.shape, info.train_len, info.test_len) == (name, k, shape, ntr, nte)
        assert len(info.mean) == len(info.std) == shape[0] and info.layout
    with pytest.raises(KeyError):
        dataset_info("imagenet22k")


# ---------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic():
    t = time.perf_counter()
    ds = load_dataset("synthetic")
    return ds, time.perf_counter() - t


def test_synthetic_shapes_dtypes_balance(synthetic):
    ds, _ = synthetic
    assert ds.train.x.shape == (10000, 3, 32, 32) and ds.test.x.shape == (2000, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert torch.bincount(ds.train.y).tolist() == [1000] * 10 and torch.bincount(ds.test.y).tolist() == [200] * 10
    assert ds.num_classes == 10 and len(ds.info.classes) == 10
    x = ds.train.x.float() / 255
    assert 0.3 < x.mean() < 0.6 and x.std() > 0.1  # neither blank nor saturated
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(ds.info.mean), atol=0.01)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(ds.info.std), atol=0.01)


def test_synthetic_has_no_natural_white_corner(synthetic):
    # A 3x3 white bottom-right patch is the classic BadNets trigger; it must not occur naturally.
    ds, _ = synthetic
    corner = ds.train.x[:, :, -3:, -3:]
    assert (corner >= 250).all(dim=(1, 2, 3)).sum() == 0
    assert corner.float().mean() < 150


def test_synthetic_fast_and_deterministic(synthetic):
    ds, seconds = synthetic
    assert seconds < 3.0, f"generating synthetic took {seconds:.2f}s"
    again = load_dataset("synthetic", root="/ignored", seed=123)  # independent of root and seed
    assert torch.equal(ds.train.x, again.train.x) and torch.equal(ds.test.y, again.test.y)
    assert not torch.equal(ds.train.x[:100], ds.test.x[:100])


def test_synthetic_subset(synthetic):
    ds, _ = synthetic
    sub = load_dataset("synthetic", train_size=500, test_size=100, seed=0)
    assert torch.bincount(sub.train.y).tolist() == [50] * 10 and len(sub.test) == 100
    idx = stratified_indices(ds.train.y, 500, 0)
    assert torch.equal(sub.train.x, ds.train.x[idx])


# ---------------------------------------------------------------------------------- image folders

CLASSES = [f"c{k}" for k in range(10)]


def make_folder(root: Path, per_class=(4, 2), size=(32, 32), ext="png") -> Path:
    """A 10-class image-folder tree; each image is one flat colour encoding (class, index)."""
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (10 * k, 10 * i, 200)).save(d / f"{i:03d}.{ext}")
    return root


def test_image_folder_basic(tmp_path):
    ds = load_dataset("cifar10", root=make_folder(tmp_path))
    assert ds.train.x.shape == (40, 3, 32, 32) and ds.test.x.shape == (20, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.info.classes == tuple(CLASSES)
    # Folders in sorted order give labels 0..9; files sorted within a class.
    assert ds.train.y.tolist() == [k for k in range(10) for _ in range(4)]
    assert ds.train.x[:, 0, 0, 0].tolist() == [10 * k for k in range(10) for _ in range(4)]
    assert ds.train.x[:, 1, 5, 5].tolist() == [10 * i for _ in range(10) for i in range(4)]


def test_image_folder_resize_and_channels(tmp_path):
    make_folder(tmp_path, size=(40, 48))  # other size, RGB
    ds = load_dataset("mnist", root=tmp_path)  # -> 1x28x28 greyscale
    assert ds.train.x.shape == (40, 1, 28, 28) and ds.info.shape == (1, 28, 28)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train.x.shape == (40, 3, 32, 32)
    assert ds.train.x[:, 2].float().mean().round() == 200  # flat colours survive resizing


def test_image_folder_subset_decodes_only_chosen(tmp_path, monkeypatch):
    make_folder(tmp_path, per_class=(6, 3))
    full = load_dataset("cifar10", root=tmp_path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: (opened.append(Path(p)), real_open(p, *a, **k))[1])
    sub = load_dataset("cifar10", root=tmp_path, train_size=20, test_size=10, seed=4)
    assert len(opened) == 30  # only the chosen files were decoded
    assert torch.bincount(sub.train.y).tolist() == [2] * 10
    # The same images as subsetting a full load: the subset depends only on the sorted file list.
    assert torch.equal(sub.train.x, full.train.subset(stratified_indices(full.train.y, 20, 4)).x)
    assert torch.equal(sub.test.y, full.test.y[stratified_indices(full.test.y, 10, 4)])


def test_image_folder_jpeg_and_ignores_non_images(tmp_path):
    make_folder(tmp_path, ext="jpg")
    (tmp_path / "train" / "c0" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("top-level files are fine")
    ds = load_dataset("cifar10", root=tmp_path)
    assert len(ds.train) == 40


# ---------------------------------------------------------------------------------- errors


def assert_layout_error(excinfo, name, root, *words):
    msg = str(excinfo.value)
    assert name in msg and str(root) in msg
    assert "image-folder layout" in msg and "published layout" in msg  # both layouts described
    for w in words:
        assert w in msg, msg


def test_error_no_root():
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=None)
    assert_layout_error(e, "cifar10", None, "no root", "cifar-10-batches-py", "<root>/train/<class>")


def test_error_missing_root_no_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("gtsrb", root=tmp_path / "nope", download=False)
    assert_layout_error(e, "gtsrb", tmp_path / "nope", "does not exist", "GTSRB/Training")


def test_error_empty_root_no_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path, download=False)
    assert_layout_error(e, "mnist", tmp_path, "not found")


def test_error_wrong_class_count(tmp_path):
    make_folder(tmp_path)
    for split in ("train", "test"):
        for f in (tmp_path / split / "c9").iterdir():
            f.unlink()
        (tmp_path / split / "c9").rmdir()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert_layout_error(e, "cifar10", tmp_path, "9 class folders, expected 10")


def test_error_mismatched_class_names(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test" / "c9").rename(tmp_path / "test" / "zz")
    with pytest.raises(DataError, match="different class folder names"):
        load_dataset("cifar10", root=tmp_path)


def test_error_empty_class(tmp_path):
    make_folder(tmp_path)
    for f in (tmp_path / "train" / "c3").iterdir():
        f.unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert_layout_error(e, "cifar10", tmp_path, "train/c3 holds no images")


def test_error_bad_image(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "test" / "c5" / "001.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert_layout_error(e, "cifar10", tmp_path, "cannot read image", str(bad))


def test_error_download_failure(tmp_path, monkeypatch):
    # Hermetic stand-in for "no network": the torchvision class raises what urllib raises offline.
    import torchvision.datasets as tvd

    def offline(root, train=True, download=False):
        if download:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path, download=True)
    assert_layout_error(e, "cifar10", tmp_path, "download failed", "Name or service", "place the files on disk")


def test_error_subset_too_large(tmp_path):
    with pytest.raises(ValueError):
        load_dataset("cifar10", root=make_folder(tmp_path), train_size=41)


# ---------------------------------------------------------------------------------- published layouts


def test_tiny_imagenet_published_layout(tmp_path):
    # The real zip also holds an unlabelled test/images/ folder: it must not be taken for class folders.
    wnids = [f"n{k:08d}" for k in range(200)]
    (tmp_path / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order != label order
    rows = []
    for k, w in enumerate(wnids):
        d = tmp_path / "train" / w / "images"
        d.mkdir(parents=True)
        Image.new("RGB", (8, 8), (k, 0, 0)).save(d / f"{w}_0.JPEG")
        (tmp_path / "train" / w / f"{w}_boxes.txt").write_text("")
        rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t8\t8")
    (tmp_path / "val" / "images").mkdir(parents=True)
    for k in range(200):
        Image.new("L", (8, 8), k).save(tmp_path / "val" / "images" / f"val_{k}.JPEG")  # greyscale, as some are
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "images" / "test_0.JPEG")

    ds = load_dataset("tiny_imagenet", root=tmp_path, test_size=100)
    assert ds.train.x.shape == (200, 3, 64, 64) and ds.test.x.shape == (100, 3, 64, 64)
    assert ds.train.y.tolist() == list(range(200)) and ds.info.classes == tuple(wnids)
    assert (ds.train.x[:, 0, 10, 10].long() - torch.arange(200)).abs().max() <= 2  # label k <-> red k (JPEG)
    assert (ds.test.x[:, 1, 10, 10].long() - ds.test.y).abs().max() <= 2


def test_tiny_imagenet_missing_points_to_url(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("tiny_imagenet", root=tmp_path)
    assert_layout_error(e, "tiny_imagenet", tmp_path, "cs231n.stanford.edu/tiny-imagenet-200.zip")


def test_gtsrb_published_layout(tmp_path):
    # The layout torchvision.datasets.GTSRB reads, with images of assorted sizes (as in the real data).
    base = tmp_path / "gtsrb"
    for k in range(43):
        d = base / "GTSRB" / "Training" / f"{k:05d}"
        d.mkdir(parents=True)
        Image.new("RGB", (30 + k, 35), (k * 5, 0, 0)).save(d / "00000_00000.ppm")
    (base / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(86):
        Image.new("RGB", (40, 31), (0, 0, 0)).save(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;40;31;0;0;40;31;{i % 43}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")

    ds = load_dataset("gtsrb", root=tmp_path, download=False, test_size=43)
    assert ds.train.x.shape == (43, 3, 32, 32) and ds.test.x.shape == (43, 3, 32, 32)
    assert ds.train.y.tolist() == list(range(43)) and sorted(ds.test.y.tolist()) == list(range(43))
    assert ds.train.x[:, 0, 16, 16].tolist() == [k * 5 for k in range(43)]


def test_mnist_published_layout(tmp_path):
    # The four IDX files torchvision.datasets.MNIST reads (raw/, uncompressed), written by hand.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 20)):
        imgs = (np.arange(n * 28 * 28) % 251).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], ">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())
    ds = load_dataset("mnist", root=tmp_path, download=False, train_size=10)
    assert ds.train.x.shape == (10, 1, 28, 28) and ds.test.x.shape == (20, 1, 28, 28)
    assert sorted(ds.train.y.tolist()) == list(range(10)) and ds.train.y.dtype == torch.int64


# ---------------------------------------------------------------------------------- real CIFAR-10


def test_real_cifar10_subset(cifar10_root):
    t = time.perf_counter()
    ds = load_dataset("cifar10", root=cifar10_root, train_size=1000, test_size=500)
    seconds = time.perf_counter() - t
    assert ds.train.x.shape == (1000, 3, 32, 32) and ds.test.x.shape == (500, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert torch.bincount(ds.train.y).tolist() == [100] * 10 and torch.bincount(ds.test.y).tolist() == [50] * 10
    assert ds.info.classes == data.CIFAR10_CLASSES  # folder order is the standard label order
    x = ds.train.x.float() / 255
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(ds.info.mean), atol=0.03)
    assert seconds < 10, f"loading a 1,500-image subset took {seconds:.1f}s"
    again = load_dataset("cifar10", root=cifar10_root, train_size=1000, test_size=500)
    assert torch.equal(ds.train.x, again.train.x)  # same seed, same subset


def test_error_half_image_folder(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test").rename(tmp_path / "val")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)  # download=True, yet nothing is fetched
    assert_layout_error(e, "cifar10", tmp_path, "found train/ but no test/")
