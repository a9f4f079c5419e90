"""Data set loaders: tiny files in each real on-disk format, read through torchvision's code path."""

from __future__ import annotations

import bz2
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fuse_tune.workloads.datasets import DATASETS, DataBundle, DatasetNotFound, load_dataset

# ------------------------------------------------------------------------------------------------------------
# Writers for the real formats


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An idx-ubyte file (big-endian header: magic 0x0000 08 <ndim>, then one uint32 per dimension)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def fake_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, size=(count, height, width), dtype=np.uint8)
    images[:, 0, 0] = 255  # a known pixel: scales to exactly 1.0
    images[:, 0, 1] = 0
    return images


def balanced_labels(count: int) -> np.ndarray:
    return (np.arange(count) % 10).astype(np.uint8)


def write_mnist_family(
    root: Path, class_name: str, compress: str, n_train: int = 20, n_test: int = 10
) -> dict:
    """The four idx files in ``<root>/<class_name>/raw``; ``compress`` is 'gz', 'plain' or 'mixed'."""
    raw = root / class_name / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": fake_images(n_train, 28, 28, seed=1),
        "train-labels-idx1-ubyte": balanced_labels(n_train),
        "t10k-images-idx3-ubyte": fake_images(n_test, 28, 28, seed=2),
        "t10k-labels-idx1-ubyte": balanced_labels(n_test)[::-1].copy(),
    }
    for index, (name, array) in enumerate(arrays.items()):
        gz = compress == "gz" or (compress == "mixed" and index % 2 == 0)
        write_idx(raw / name, array, compress=gz)
    return arrays


def write_usps(root: Path, n_train: int = 30, n_test: int = 12) -> dict:
    """LIBSVM lines ``label index:value ...`` (labels 1..10, values in [-1, 1]) compressed with bz2."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    written = {}
    for filename, count in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        values = rng.uniform(-1.0, 1.0, size=(count, 256))
        values[:, 0], values[:, 1], values[:, 2] = -1.0, 1.0, 0.0
        labels = np.arange(count) % 10 + 1
        lines = [
            f"{label} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(row))
            for label, row in zip(labels, values, strict=True)
        ]
        with bz2.open(root / filename, "wt") as handle:
            handle.write("\n".join(lines) + "\n")
        written[filename] = (labels, values)
    return written


def write_cifar10(root: Path, per_batch: int = 4) -> None:
    """``cifar-10-batches-py``: pickled dicts, 'data' (N, 3072) uint8 rows of R, G, B planes, 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    planes = np.concatenate([np.full(1024, 255), np.zeros(1024), np.full(1024, 128)]).astype(np.uint8)
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {
            "batch_label": name,
            "labels": [(index + j) % 10 for j in range(per_batch)],
            "data": np.tile(planes, (per_batch, 1)),
            "filenames": [f"{name}_{j}.png" for j in range(per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    meta = {
        "label_names": [f"class{i}" for i in range(10)],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)


def assert_well_formed(bundle: DataBundle, input_shape: tuple[int, int, int], num_classes: int = 10) -> None:
    assert bundle.input_shape == input_shape
    assert bundle.num_classes == num_classes
    for inputs, labels in ((bundle.train_x, bundle.train_y), (bundle.test_x, bundle.test_y)):
        assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
        assert inputs.shape[1:] == input_shape and inputs.shape[0] == labels.shape[0]
        assert 0.0 <= inputs.min().item() and inputs.max().item() <= 1.0
        assert 0 <= labels.min().item() and labels.max().item() < num_classes
    assert bundle.note


# ------------------------------------------------------------------------------------------------------------
# MNIST family


@pytest.mark.parametrize(
    ("name", "class_name", "compress"),
    [("mnist", "MNIST", "gz"), ("fashionmnist", "FashionMNIST", "plain"), ("kmnist", "KMNIST", "mixed")],
)
def test_mnist_family_reads_idx_files(tmp_path: Path, name: str, class_name: str, compress: str) -> None:
    arrays = write_mnist_family(tmp_path, class_name, compress)
    before = sorted(p.name for p in (tmp_path / class_name / "raw").iterdir())
    bundle = load_dataset(name, tmp_path)
    assert_well_formed(bundle, (1, 28, 28))
    assert bundle.num_train == 20 and bundle.num_test == 10
    assert torch.equal(bundle.train_y, torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64))
    assert torch.equal(bundle.test_y, torch.as_tensor(arrays["t10k-labels-idx1-ubyte"], dtype=torch.int64))
    expected = torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255.0
    assert torch.allclose(bundle.test_x[:, 0], expected)
    assert (bundle.train_x[:, 0, 0, 0] == 1.0).all() and (bundle.train_x[:, 0, 0, 1] == 0.0).all()
    # the data folder is only read, never written (the .gz files are decompressed elsewhere)
    assert sorted(p.name for p in (tmp_path / class_name / "raw").iterdir()) == before


def test_mnist_test_split_is_a_fixed_stratified_split_of_the_test_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_images(100, 28, 28, seed=4), balanced_labels(100)
    write_idx(raw / "t10k-images-idx3-ubyte", images, compress=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels, compress=True)
    bundle = load_dataset("mnist-test-split", tmp_path)
    assert_well_formed(bundle, (1, 28, 28))
    assert (bundle.num_train, bundle.num_test) == (80, 20)
    assert bundle.test_y.bincount(minlength=10).tolist() == [2] * 10
    assert "MNIST TEST set" in bundle.note
    again = load_dataset("mnist-test-split", tmp_path)
    assert torch.equal(bundle.train_x, again.train_x) and torch.equal(bundle.test_y, again.test_y)
    # train and test are disjoint and together are the whole test file
    everything = torch.cat([bundle.train_x, bundle.test_x]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == 100


# ------------------------------------------------------------------------------------------------------------
# USPS and CIFAR-10


def test_usps_reads_libsvm_bz2(tmp_path: Path) -> None:
    written = write_usps(tmp_path / "USPS")
    bundle = load_dataset("usps", tmp_path)
    assert_well_formed(bundle, (1, 16, 16))
    assert bundle.num_train == 30 and bundle.num_test == 12
    assert torch.equal(bundle.train_y, torch.as_tensor(written["usps.bz2"][0] - 1))
    first_row = bundle.train_x[:, 0, 0]
    assert (first_row[:, 0] == 0.0).all() and (first_row[:, 1] == 1.0).all()
    assert torch.allclose(first_row[:, 2], torch.full((30,), 127 / 255))  # (0 + 1) / 2 * 255 -> uint8 127


def test_cifar10_reads_pickled_batches_without_checksums(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = load_dataset("cifar10", tmp_path, verify_checksums=False)
    assert_well_formed(bundle, (3, 32, 32))
    assert bundle.num_train == 20 and bundle.num_test == 4
    assert (bundle.train_x[:, 0] == 1.0).all() and (bundle.train_x[:, 1] == 0.0).all()
    assert torch.allclose(bundle.train_x[:, 2], torch.tensor(128 / 255))
    assert bundle.train_y[:4].tolist() == [0, 1, 2, 3] and bundle.test_y.tolist() == [5, 6, 7, 8]


def test_cifar10_keeps_torchvision_md5_check_by_default(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFound, match="MD5"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="verify_checksums"):
        load_dataset("cifar10", tmp_path, download=True, verify_checksums=False)


# ------------------------------------------------------------------------------------------------------------
# digits, errors


def test_digits_split_is_fixed_and_stratified() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    assert_well_formed(first, (1, 8, 8))
    assert (first.num_train, first.num_test) == (1347, 450)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    _, labels = load_digits(return_X_y=True)
    totals = np.bincount(labels)
    test_counts = first.test_y.bincount(minlength=10).numpy()
    assert (first.train_y.bincount(minlength=10).numpy() + test_counts == totals).all()
    assert np.abs(test_counts - 0.25 * totals).max() <= 1.0
    assert first.train_x.max().item() == 1.0


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"digits"}))
def test_missing_data_raises_one_line_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFound) as caught:
        load_dataset(name, tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "\n" not in message
    assert message.startswith(f"{name}:") and str(tmp_path) in message and "download=True" in message


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name: unknown data set 'imagenet'.*digits"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("usps")


def test_bundle_to_casts_inputs_only() -> None:
    bundle = load_dataset("digits").to(dtype=torch.float64)
    assert bundle.train_x.dtype == torch.float64 and bundle.train_y.dtype == torch.int64


# ------------------------------------------------------------------------------------------------------------
# The real files, when this machine has them

REAL_DATA_DIR = Path(os.environ.get("FUSE_TEST_DATA_DIR", "/work/shared/data"))


def test_real_usps_and_mnist_test_split() -> None:
    if not (REAL_DATA_DIR / "USPS" / "usps.bz2").is_file() or not (REAL_DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found in {REAL_DATA_DIR} (set FUSE_TEST_DATA_DIR)")
    usps = load_dataset("usps", REAL_DATA_DIR)
    assert_well_formed(usps, (1, 16, 16))
    assert (usps.num_train, usps.num_test) == (7291, 2007)
    assert set(usps.train_y.unique().tolist()) == set(range(10))
    mnist = load_dataset("mnist-test-split", REAL_DATA_DIR)
    assert_well_formed(mnist, (1, 28, 28))
    assert (mnist.num_train, mnist.num_test) == (8000, 2000)
    counts = mnist.test_y.bincount(minlength=10).float()
    total = counts + mnist.train_y.bincount(minlength=10).float()
    assert ((counts - 0.2 * total).abs() <= 1.0).all()
    assert 0.1 < mnist.train_x.mean().item() < 0.2  # MNIST's mean pixel is about 0.13
