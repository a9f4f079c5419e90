"""Data set loaders: tiny files in each real on-disk format, read through torchvision's code path.

Every bundle has a validation split held out of the data set's training data (a seeded sixth,
stratified when the labels allow it), so sizes of the files' training data are train + validation.
"""

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
from sklearn.model_selection import train_test_split

from fuse_tune.workloads.datasets import DATASETS, DataBundle, DatasetNotFound, _validation_split, load_dataset

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
    splits = ((bundle.train_x, bundle.train_y), (bundle.val_x, bundle.val_y), (bundle.test_x, bundle.test_y))
    for inputs, labels in splits:
        assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
        assert inputs.shape[1:] == input_shape and inputs.shape[0] == labels.shape[0]
        assert 0.0 <= inputs.min().item() and inputs.max().item() <= 1.0
        assert 0 <= labels.min().item() and labels.max().item() < num_classes
    assert bundle.note and "validation" in bundle.note


def row_positions(original: torch.Tensor, subset: torch.Tensor) -> list[int]:
    """Where each row of ``subset`` is in ``original`` (whose rows must be distinct), by exact bytes."""
    where = {row.numpy().tobytes(): index for index, row in enumerate(original.flatten(1))}
    assert len(where) == original.shape[0], "rows of the original must be distinct to be matched"
    return [where[row.numpy().tobytes()] for row in subset.flatten(1)]


def assert_partition(
    bundle: DataBundle, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> tuple[list[int], list[int]]:
    """Train and validation are a partition of the original training set (by rows, order kept), test is
    the original test set; returns the positions of train and validation in the original training set."""
    train_at, val_at = row_positions(train_x, bundle.train_x), row_positions(train_x, bundle.val_x)
    assert not set(train_at) & set(val_at)
    assert sorted(train_at + val_at) == list(range(train_x.shape[0]))
    assert train_at == sorted(train_at) and val_at == sorted(val_at)
    assert torch.equal(bundle.train_y, train_y[train_at]) and torch.equal(bundle.val_y, train_y[val_at])
    assert torch.equal(bundle.test_x, test_x) and torch.equal(bundle.test_y, test_y)
    test_rows = {row.numpy().tobytes() for row in bundle.test_x.flatten(1)}
    assert not test_rows & {row.numpy().tobytes() for row in train_x.flatten(1)}
    return train_at, val_at


def unstratified_positions(count: int) -> list[int]:
    """The documented fallback: sklearn's unstratified seeded hold-out of round(count / 6), sorted."""
    _, val_index = train_test_split(np.arange(count), test_size=round(count / 6), stratify=None, random_state=0)
    return sorted(val_index.tolist())


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
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (17, 3, 10)  # 20 training images = 17 + 3
    train_y = torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64)
    assert torch.equal(torch.cat([bundle.train_y, bundle.val_y]).sort().values, train_y.sort().values)
    assert torch.equal(bundle.test_y, torch.as_tensor(arrays["t10k-labels-idx1-ubyte"], dtype=torch.int64))
    expected = torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255.0
    assert torch.allclose(bundle.test_x[:, 0], expected)
    for inputs in (bundle.train_x, bundle.val_x):
        assert (inputs[:, 0, 0, 0] == 1.0).all() and (inputs[:, 0, 0, 1] == 0.0).all()
    # the data folder is only read, never written (the .gz files are decompressed elsewhere)
    assert sorted(p.name for p in (tmp_path / class_name / "raw").iterdir()) == before


def test_tiny_file_validation_split_is_a_seeded_unstratified_partition_of_the_training_file(
    tmp_path: Path,
) -> None:
    arrays = write_mnist_family(tmp_path, "MNIST", "gz", n_train=20, n_test=10)
    train_x = torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32).div(255.0).unsqueeze(1)
    train_y = torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64)
    test_x = torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32).div(255.0).unsqueeze(1)
    test_y = torch.as_tensor(arrays["t10k-labels-idx1-ubyte"], dtype=torch.int64)
    torch.manual_seed(123)
    np.random.seed(123)
    bundle = load_dataset("mnist", tmp_path)
    _, val_at = assert_partition(bundle, train_x, train_y, test_x, test_y)
    # 3 validation images cannot hold 10 classes: the documented unstratified fallback, seed 0
    assert val_at == unstratified_positions(20)
    assert "unstratified" in bundle.note and "17 train / 3 validation / 10 test" in bundle.note
    # the split depends on the files only, not on the global random state
    torch.manual_seed(7)
    np.random.seed(7)
    again = load_dataset("mnist", tmp_path)
    assert torch.equal(again.val_x, bundle.val_x) and torch.equal(again.train_y, bundle.train_y)


def test_validation_fallback_when_a_class_has_one_sample() -> None:
    labels = np.array([0] * 30 + [1] * 29 + [2])  # 60 samples, 10 in validation, class 2 has one sample
    train_index, val_index, stratified = _validation_split(labels)
    assert not stratified
    assert val_index.tolist() == unstratified_positions(60)
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(60))
    assert train_index.tolist() == sorted(train_index.tolist())
    # with two samples or more per class (and enough of them) the same call stratifies
    balanced = np.arange(60) % 3
    _, val_index, stratified = _validation_split(balanced)
    assert stratified
    assert np.abs(np.bincount(balanced[val_index], minlength=3) - 10 / 3).max() <= 1.0


def test_mnist_test_split_is_a_fixed_stratified_split_of_the_test_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_images(100, 28, 28, seed=4), balanced_labels(100)
    write_idx(raw / "t10k-images-idx3-ubyte", images, compress=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels, compress=True)
    bundle = load_dataset("mnist-test-split", tmp_path)
    assert_well_formed(bundle, (1, 28, 28))
    assert (bundle.num_train + bundle.num_val, bundle.num_test) == (80, 20)
    assert (bundle.num_train, bundle.num_val) == (67, 13)  # round(80 / 6) = 13, stratified (8 per class)
    assert bundle.test_y.bincount(minlength=10).tolist() == [2] * 10
    val_counts = bundle.val_y.bincount(minlength=10)
    assert val_counts.min().item() >= 1 and val_counts.max().item() <= 2
    assert "MNIST TEST set" in bundle.note and "stratified by label" in bundle.note
    again = load_dataset("mnist-test-split", tmp_path)
    assert torch.equal(bundle.train_x, again.train_x) and torch.equal(bundle.test_y, again.test_y)
    assert torch.equal(bundle.val_x, again.val_x) and torch.equal(bundle.val_y, again.val_y)
    # train, validation and test are disjoint and together are the whole test file
    everything = torch.cat([bundle.train_x, bundle.val_x, bundle.test_x]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == 100


# ------------------------------------------------------------------------------------------------------------
# USPS and CIFAR-10


def test_usps_reads_libsvm_bz2(tmp_path: Path) -> None:
    written = write_usps(tmp_path / "USPS")
    bundle = load_dataset("usps", tmp_path)
    assert_well_formed(bundle, (1, 16, 16))
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (25, 5, 12)  # 30 training rows = 25 + 5
    labels = torch.as_tensor(written["usps.bz2"][0] - 1)
    val_at = unstratified_positions(30)  # 5 validation rows cannot hold 10 classes: the fallback
    train_at = sorted(set(range(30)) - set(val_at))
    assert torch.equal(bundle.train_y, labels[train_at]) and torch.equal(bundle.val_y, labels[val_at])
    assert torch.equal(bundle.test_y, torch.as_tensor(written["usps.t.bz2"][0] - 1))
    first_row = torch.cat([bundle.train_x, bundle.val_x])[:, 0, 0]
    assert (first_row[:, 0] == 0.0).all() and (first_row[:, 1] == 1.0).all()
    assert torch.allclose(first_row[:, 2], torch.full((30,), 127 / 255))  # (0 + 1) / 2 * 255 -> uint8 127


def test_cifar10_reads_pickled_batches_without_checksums(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = load_dataset("cifar10", tmp_path, verify_checksums=False)
    assert_well_formed(bundle, (3, 32, 32))
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (17, 3, 4)  # 20 training images = 17 + 3
    for inputs in (bundle.train_x, bundle.val_x):
        assert (inputs[:, 0] == 1.0).all() and (inputs[:, 1] == 0.0).all()
        assert torch.allclose(inputs[:, 2], torch.tensor(128 / 255))
    labels = torch.tensor([(index + j) % 10 for index in range(5) for j in range(4)])  # data_batch_1..5 in order
    val_at = unstratified_positions(20)
    train_at = sorted(set(range(20)) - set(val_at))
    assert torch.equal(bundle.train_y, labels[train_at]) and torch.equal(bundle.val_y, labels[val_at])
    assert bundle.test_y.tolist() == [5, 6, 7, 8]


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
    assert (first.num_train + first.num_val, first.num_test) == (1347, 450)
    assert (first.num_train, first.num_val) == (1123, 224)  # round(1347 / 6) = round(224.5) = 224
    for a, b in (
        (first.train_x, second.train_x),
        (first.train_y, second.train_y),
        (first.val_x, second.val_x),
        (first.val_y, second.val_y),
        (first.test_x, second.test_x),
        (first.test_y, second.test_y),
    ):
        assert torch.equal(a, b)
    _, labels = load_digits(return_X_y=True)
    totals = np.bincount(labels)
    train_counts = first.train_y.bincount(minlength=10).numpy()
    val_counts = first.val_y.bincount(minlength=10).numpy()
    test_counts = first.test_y.bincount(minlength=10).numpy()
    assert (train_counts + val_counts + test_counts == totals).all()
    assert np.abs(test_counts - 0.25 * totals).max() <= 1.0
    assert first.train_x.max().item() == 1.0


def test_digits_train_validation_test_partition_the_digits() -> None:
    images, labels = load_digits(return_X_y=True)
    inputs = torch.as_tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    # the original 75/25 split, made independently: train + validation must be its training part
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0, shuffle=True
    )
    train_index, test_index = np.sort(train_index), np.sort(test_index)
    bundle = load_dataset("digits")
    assert_partition(bundle, inputs[train_index], targets[train_index], inputs[test_index], targets[test_index])
    # and all three together are every one of the 1,797 digits exactly once
    everything = row_positions(inputs, torch.cat([bundle.train_x, bundle.val_x, bundle.test_x]))
    assert sorted(everything) == list(range(1797))


def test_digits_validation_split_is_stratified() -> None:
    bundle = load_dataset("digits")
    train_counts = bundle.train_y.bincount(minlength=10).numpy()
    val_counts = bundle.val_y.bincount(minlength=10).numpy()
    pool = train_counts + val_counts  # per-class counts of the 1,347 training digits
    assert np.abs(val_counts - bundle.num_val * pool / pool.sum()).max() <= 1.0
    assert "stratified by label" in bundle.note and "1,123 train / 224 validation / 450 test" in bundle.note


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
    assert bundle.val_x.dtype == torch.float64 and bundle.val_y.dtype == torch.int64
    assert bundle.test_x.dtype == torch.float64 and bundle.test_y.dtype == torch.int64


def test_bundle_to_moves_every_split() -> None:
    bundle = load_dataset("digits").to(device="meta")
    tensors = (bundle.train_x, bundle.train_y, bundle.val_x, bundle.val_y, bundle.test_x, bundle.test_y)
    assert all(t.device.type == "meta" for t in tensors)
    assert bundle.val_x.dtype == torch.float32 and bundle.val_y.dtype == torch.int64
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (1123, 224, 450)


# ------------------------------------------------------------------------------------------------------------
# The real files, when this machine has them

REAL_DATA_DIR = Path(os.environ.get("FUSE_TEST_DATA_DIR", "/work/shared/data"))


def test_real_usps_and_mnist_test_split() -> None:
    if not (REAL_DATA_DIR / "USPS" / "usps.bz2").is_file() or not (REAL_DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found in {REAL_DATA_DIR} (set FUSE_TEST_DATA_DIR)")
    usps = load_dataset("usps", REAL_DATA_DIR)
    assert_well_formed(usps, (1, 16, 16))
    assert (usps.num_train + usps.num_val, usps.num_test) == (7291, 2007)
    assert (usps.num_train, usps.num_val, usps.num_test) == (6076, 1215, 2007)  # round(7291 / 6) = 1215
    assert set(usps.train_y.unique().tolist()) == set(range(10)) == set(usps.val_y.unique().tolist())
    val_counts = usps.val_y.bincount(minlength=10).float()
    pool = val_counts + usps.train_y.bincount(minlength=10).float()
    assert ((val_counts - usps.num_val * pool / pool.sum()).abs() <= 1.0).all()
    mnist = load_dataset("mnist-test-split", REAL_DATA_DIR)
    assert_well_formed(mnist, (1, 28, 28))
    assert (mnist.num_train + mnist.num_val, mnist.num_test) == (8000, 2000)
    assert (mnist.num_train, mnist.num_val, mnist.num_test) == (6667, 1333, 2000)  # round(8000 / 6) = 1333
    counts = mnist.test_y.bincount(minlength=10).float()
    val_counts = mnist.val_y.bincount(minlength=10).float()
    pool = val_counts + mnist.train_y.bincount(minlength=10).float()
    total = counts + pool
    assert ((counts - 0.2 * total).abs() <= 1.0).all()
    assert ((val_counts - mnist.num_val * pool / pool.sum()).abs() <= 1.0).all()
    everything = torch.cat([mnist.train_x, mnist.val_x, mnist.test_x]).flatten(1)
    assert everything.shape[0] == 10_000
    assert 0.1 < mnist.train_x.mean().item() < 0.2  # MNIST's mean pixel is about 0.13
