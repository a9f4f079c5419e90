"""Data sets loaded whole into memory as tensors, through torchvision's own readers.

Every loader returns a ``DataBundle``: inputs ``(N, C, H, W)`` float32 scaled to ``[0, 1]`` (pixel
value / 255, or / 16 for scikit-learn's digits), **not** standardised, and int64 class labels in
``[0, num_classes)``, split into train / validation / test. ``[0, 1]`` is what torchvision's
``ToTensor`` gives, what the paper's setting implies, and what the project's reference numbers use:
f* = 0.261865 for logistic regression with L2 (1e-3) on all 1,797 digits scaled by 1/16 (scipy
L-BFGS-B, BENCHMARKS.md, "Minibatch second phase"); per-channel standardisation would change those
references and is left to a model if it wants it.

Validation split: none of these data sets has an official validation split, so every loader holds
one out of its *training* data (never the test data) by one rule, in ``_bundle``: a seeded hold-out
of ``round(n_train / 6)`` training samples (Python's ``round``, halves to even), stratified by label
(scikit-learn ``train_test_split``, ``random_state=SPLIT_SEED`` = 0). It depends only on the labels
read from the files, never on a run's seed: the same files give the same split. When stratifying is
impossible (a class with fewer than 2 training samples, or fewer validation or remaining training
samples than classes, as in tiny files) the hold-out is an unstratified seeded split of the same size
(``stratify=None``, ``random_state=0``). Indices stay sorted, so train and validation keep the files'
order. The test set is the data set's own test set, unchanged.

Data sets, where their files go (``data_dir`` is always a parameter, never a fixed path) and their
train / validation / test sizes:

============================  ======================================================================
``digits``                    scikit-learn's bundled ``load_digits`` (1,797 8x8 images, offline);
                              fixed stratified 75/25 split, ``random_state=0`` (1,347 / 450), then
                              the validation hold-out: 1,123 train / 224 validation / 450 test
``mnist``                     ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
                              50,000 train / 10,000 validation / 10,000 test
``fashionmnist``              same four files under ``<data_dir>/FashionMNIST/raw/``; 50,000 / 10,000
                              / 10,000
``kmnist``                    same four files under ``<data_dir>/KMNIST/raw/``; 50,000 / 10,000 /
                              10,000
``mnist-test-split``          only ``<data_dir>/MNIST/raw/t10k-*-ubyte[.gz]``: the 10,000-image MNIST
                              **test** set split (stratified, seed 0) into 8,000 train / 2,000 test,
                              then the validation hold-out: 6,667 train / 1,333 validation / 2,000 test
``usps``                      ``<data_dir>/USPS/usps.bz2`` and ``usps.t.bz2`` (LIBSVM format);
                              7,291 / 2,007 in the files: 6,076 train / 1,215 validation / 2,007 test
``cifar10``                   ``<data_dir>/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
                              ``batches.meta``); 41,667 train / 8,333 validation / 10,000 test
============================  ======================================================================

The files are read by torchvision's dataset classes (``MNIST``, ``FashionMNIST``, ``KMNIST``,
``USPS``, ``CIFAR10``) or, for the MNIST test split, by its ``read_image_file``/``read_label_file``;
we take the parsed ``data``/``targets`` arrays and skip the per-sample PIL transform. torchvision's
MNIST readers want the *uncompressed* idx files: when only the ``.gz`` files are present they are
decompressed into a temporary directory for the read (``data_dir`` is never written to, so it may be
read-only). With ``download=True`` a data set whose files are missing is fetched by torchvision into
``data_dir`` (online only); files already present are never fetched again.

Checksums: of the readers used here only torchvision's ``CIFAR10`` verifies MD5 sums of files already
on disk (the others check them only when downloading). ``verify_checksums=False`` reads CIFAR-10
files that are not the official release (e.g. tiny files written by tests) through the same reading
code, with only the MD5 comparison turned off; the default keeps torchvision's check.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision

from fuse_tune.errors import UserError

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetNotFound",
    "load_dataset",
]

MNIST_TEST_SPLIT_TRAIN_SIZE = 8_000
MNIST_TEST_SPLIT_TEST_SIZE = 2_000
SPLIT_SEED = 0
VALIDATION_FRACTION = 1 / 6  # of the training samples; the hold-out is round(n_train * VALIDATION_FRACTION)


class DatasetNotFound(FileNotFoundError, UserError):
    """A data set's files are missing (or fail their checksum) and were not, or could not be, downloaded.

    A :class:`fuse_tune.errors.UserError` too: the data folder is the user's input (one line, exit 2)."""


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A data set held in memory, split into train / validation / test.

    The validation split is held out of the data set's training data (see the module docstring: a
    fixed, seeded, stratified sixth of it); train, validation and test are disjoint.

    Attributes:
        name: the registry name (``"mnist"``, ``"digits"``, ...).
        train_x, val_x, test_x: inputs, ``(N, C, H, W)``, float, values in ``[0, 1]``.
        train_y, val_y, test_y: labels, ``(N,)``, int64, values in ``[0, num_classes)``.
        num_classes: number of classes.
        input_shape: ``(C, H, W)`` of one input.
        note: provenance in one or two sentences (source files, splits with their sizes, scaling).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    note: str

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_val(self) -> int:
        return int(self.val_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DataBundle:
        """A copy with inputs moved to ``device`` and cast to ``dtype``; labels moved, kept int64."""
        return replace(
            self,
            train_x=self.train_x.to(device=device, dtype=dtype),
            val_x=self.val_x.to(device=device, dtype=dtype),
            test_x=self.test_x.to(device=device, dtype=dtype),
            train_y=self.train_y.to(device=device),
            val_y=self.val_y.to(device=device),
            test_y=self.test_y.to(device=device),
        )


def _bundle(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    note: str,
) -> DataBundle:
    """Build a ``DataBundle`` from float ``(N, C, H, W)`` inputs in ``[0, 1]`` and integer labels.

    ``train`` is the data set's whole training data: the validation split is held out of it here
    (``_validation_split``), the one place every loader's split is made, and ``note`` (provenance and
    train/test split) gets a sentence saying how, with the three sizes. ``test`` is kept as it is.
    """
    full_x, full_y = train
    full_y = torch.as_tensor(full_y, dtype=torch.int64)
    test_x, test_y = test
    train_index, val_index, stratified = _validation_split(full_y.numpy())
    train_index_t, val_index_t = torch.as_tensor(train_index), torch.as_tensor(val_index)
    how = "stratified by label" if stratified else "unstratified (too few samples per class to stratify)"
    note = (
        f"{note}; validation: round(1/6 of the {len(full_y):,} training samples) held out, {how}, "
        f"seed {SPLIT_SEED}: {len(train_index):,} train / {len(val_index):,} validation / "
        f"{len(test_y):,} test"
    )
    return DataBundle(
        name=name,
        train_x=full_x[train_index_t].to(torch.float32).contiguous(),
        train_y=full_y[train_index_t].contiguous(),
        val_x=full_x[val_index_t].to(torch.float32).contiguous(),
        val_y=full_y[val_index_t].contiguous(),
        test_x=test_x.to(torch.float32).contiguous(),
        test_y=torch.as_tensor(test_y, dtype=torch.int64),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in full_x.shape[1:]),
        note=note,
    )


def _grey_images(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)`` in ``[0, 1]``."""
    return torch.as_tensor(pixels).to(torch.float32).div_(255.0).unsqueeze(1)


def _stratified_split(
    labels: np.ndarray, test_size: int | float, seed: int, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of a seeded train/test split (scikit-learn's ``train_test_split``).

    Stratified by ``labels``; ``stratify=False`` gives a plain seeded shuffle split of the same size.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    train_index, test_index = train_test_split(
        indices, test_size=test_size, stratify=labels if stratify else None, random_state=seed, shuffle=True
    )
    return np.sort(train_index), np.sort(test_index)


def _validation_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Sorted (train, validation) indices into a data set's training data of ``labels``, and whether
    the split is stratified.

    The validation split is ``round(n / 6)`` samples, seeded with ``SPLIT_SEED`` (never a run's seed,
    so the same files always give the same split) and stratified by label. When stratifying is
    impossible (a class with fewer than 2 samples, or fewer validation or remaining training samples
    than classes, as in tiny test files) it falls back to an unstratified split of the same size and
    seed. Three samples or fewer leave an empty validation split.
    """
    total = int(labels.shape[0])
    num_val = round(total * VALIDATION_FRACTION)
    if num_val == 0:
        return np.arange(total), np.arange(0), False
    counts = np.unique(labels, return_counts=True)[1]
    stratify = bool(counts.min() >= 2) and min(num_val, total - num_val) >= counts.shape[0]
    train_index, val_index = _stratified_split(labels, test_size=num_val, seed=SPLIT_SEED, stratify=stratify)
    return train_index, val_index, stratify


def _not_found(name: str, where: Path, files: list[str], hint: str = "") -> DatasetNotFound:
    return DatasetNotFound(
        f"{name}: data set not found: expected {', '.join(files)} in {where}; put the files there"
        f"{hint}, or pass download=True to fetch them when online"
    )


def _download_failed(name: str, where: Path, error: BaseException) -> DatasetNotFound:
    reason = " ".join(str(error).split()) or type(error).__name__
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return DatasetNotFound(f"{name}: download into {where} failed ({reason}); put the files there by hand")


# ------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def _load_digits(data_dir: Path | None, download: bool, verify_checksums: bool) -> DataBundle:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    inputs = torch.as_tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    train_index, test_index = _stratified_split(labels, test_size=0.25, seed=SPLIT_SEED)
    labels_tensor = torch.as_tensor(labels, dtype=torch.int64)
    return _bundle(
        "digits",
        (inputs[train_index], labels_tensor[train_index]),
        (inputs[test_index], labels_tensor[test_index]),
        num_classes=10,
        note=(
            "scikit-learn load_digits (1,797 8x8 images, pixel/16); fixed stratified 75/25 split with "
            "random_state=0: 1,347 train (before the validation hold-out) / 450 test"
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# MNIST, FashionMNIST, KMNIST (idx-ubyte files)


def _idx_names(dataset_class: type[torchvision.datasets.MNIST]) -> list[str]:
    """Uncompressed idx file names torchvision expects in ``<root>/<ClassName>/raw/``."""
    return [filename.removesuffix(".gz") for filename, _ in dataset_class.resources]


def _locate(raw_dir: Path, names: list[str]) -> dict[str, Path] | None:
    """Path of each idx file, uncompressed if present else its ``.gz``; ``None`` if any is missing."""
    found: dict[str, Path] = {}
    for name in names:
        for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


@contextmanager
def _uncompressed(found: dict[str, Path], layout: str) -> Iterator[Path]:
    """A directory holding every file of ``found`` uncompressed under ``layout`` (a relative folder).

    Yields the original root when nothing needs decompressing; otherwise a temporary root (removed on
    exit) with the ``.gz`` files decompressed and the other files linked or copied there.
    """
    if all(path.suffix != ".gz" for path in found.values()):
        # found paths all live in <root>/<layout>/
        first = next(iter(found.values()))
        yield first.parents[len(Path(layout).parts)]
        return
    with tempfile.TemporaryDirectory(prefix="fuse-data-") as temporary:
        target = Path(temporary) / layout
        target.mkdir(parents=True)
        for name, path in found.items():
            if path.suffix == ".gz":
                with gzip.open(path, "rb") as source, open(target / name, "wb") as destination:
                    shutil.copyfileobj(source, destination)
            else:
                try:
                    os.symlink(path.resolve(), target / name)
                except OSError:
                    shutil.copyfile(path, target / name)
        yield Path(temporary)


def _load_mnist_family(
    name: str, dataset_class: type[torchvision.datasets.MNIST], data_dir: Path, download: bool
) -> DataBundle:
    layout = f"{dataset_class.__name__}/raw"
    raw_dir = data_dir / layout
    names = _idx_names(dataset_class)
    found = _locate(raw_dir, names)
    if found is None:
        if not download:
            raise _not_found(name, raw_dir, [f"{n}[.gz]" for n in names])
        try:
            dataset_class(root=data_dir, train=True, download=True)
        except (RuntimeError, OSError) as error:
            raise _download_failed(name, raw_dir, error) from error
        found = _locate(raw_dir, names)
        assert found is not None
    with _uncompressed(found, layout) as root:
        train = dataset_class(root=root, train=True, download=False)
        test = dataset_class(root=root, train=False, download=False)
        train_x, train_y = _grey_images(train.data), train.targets
        test_x, test_y = _grey_images(test.data), test.targets
    return _bundle(
        name,
        (train_x, train_y),
        (test_x, test_y),
        num_classes=len(dataset_class.classes),
        note=f"torchvision {dataset_class.__name__} from {raw_dir} (pixel/255), standard train/test split",
    )


def _load_mnist(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    return _load_mnist_family("mnist", torchvision.datasets.MNIST, data_dir, download)


def _load_fashionmnist(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    return _load_mnist_family("fashionmnist", torchvision.datasets.FashionMNIST, data_dir, download)


def _load_kmnist(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    return _load_mnist_family("kmnist", torchvision.datasets.KMNIST, data_dir, download)


def _load_mnist_test_split(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    layout = "MNIST/raw"
    raw_dir = data_dir / layout
    names = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    found = _locate(raw_dir, names)
    if found is None:
        if not download:
            raise _not_found("mnist-test-split", raw_dir, [f"{n}[.gz]" for n in names])
        try:
            torchvision.datasets.MNIST(root=data_dir, train=False, download=True)
        except (RuntimeError, OSError) as error:
            raise _download_failed("mnist-test-split", raw_dir, error) from error
        found = _locate(raw_dir, names)
        assert found is not None
    with _uncompressed(found, layout) as root:
        images = read_image_file(str(root / layout / names[0]))
        labels = read_label_file(str(root / layout / names[1]))
    if images.shape[0] != labels.shape[0]:
        raise DatasetNotFound(
            f"mnist-test-split: {raw_dir} holds {images.shape[0]} images but {labels.shape[0]} labels"
        )
    total = int(labels.shape[0])
    # The full 10,000 images split 8,000 / 2,000; smaller files (tests) keep the same 80/20 ratio.
    test_size = MNIST_TEST_SPLIT_TEST_SIZE if total >= 10_000 else 0.2
    train_index, test_index = _stratified_split(labels.numpy(), test_size=test_size, seed=SPLIT_SEED)
    inputs = _grey_images(images)
    return _bundle(
        "mnist-test-split",
        (inputs[train_index], labels[train_index]),
        (inputs[test_index], labels[test_index]),
        num_classes=10,
        note=(
            f"a split of the MNIST TEST set ({raw_dir}, {total} images, pixel/255), not MNIST's training "
            f"set: stratified, seed {SPLIT_SEED}, {len(train_index)} train (before the validation hold-out) / "
            f"{len(test_index)} test"
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# USPS (LIBSVM bz2)


def _load_usps(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    root = data_dir / "USPS"
    names = [entry[1] for entry in torchvision.datasets.USPS.split_list.values()]
    missing = [n for n in names if not (root / n).is_file()]
    if missing and not download:
        raise _not_found("usps", root, names)
    try:
        train = torchvision.datasets.USPS(root=root, train=True, download=download)
        test = torchvision.datasets.USPS(root=root, train=False, download=download)
    except (RuntimeError, OSError) as error:
        raise _download_failed("usps", root, error) from error
    return _bundle(
        "usps",
        (_grey_images(train.data), train.targets),
        (_grey_images(test.data), test.targets),
        num_classes=10,
        note=(
            f"torchvision USPS from {root} (LIBSVM values in [-1, 1] -> uint8 by torchvision, then /255), "
            "train: usps.bz2, test: usps.t.bz2"
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 (pickled python batches)


class _CIFAR10WithoutChecksums(torchvision.datasets.CIFAR10):
    """torchvision's ``CIFAR10`` reader with the MD5 sums of the files on disk set to ``None``.

    ``check_integrity(path, None)`` only checks that the file exists, so everything else (file list,
    unpickling, reshaping, the meta file) is torchvision's own code. Used only when the caller passes
    ``verify_checksums=False``; it never downloads.
    """

    train_list = [[filename, None] for filename, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[filename, None] for filename, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    def download(self) -> None:
        raise RuntimeError("download: not available when checksums are not verified")


def _load_cifar10(data_dir: Path, download: bool, verify_checksums: bool) -> DataBundle:
    base = torchvision.datasets.CIFAR10
    folder = data_dir / base.base_folder
    names = [filename for filename, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if not download:
            raise _not_found("cifar10", folder, names, hint=" (extracted from cifar-10-python.tar.gz)")
        try:
            base(root=data_dir, train=True, download=True)
        except (RuntimeError, OSError) as error:
            raise _download_failed("cifar10", folder, error) from error
    dataset_class = base if verify_checksums else _CIFAR10WithoutChecksums
    try:
        train = dataset_class(root=data_dir, train=True, download=False)
        test = dataset_class(root=data_dir, train=False, download=False)
    except RuntimeError as error:
        raise DatasetNotFound(
            f"cifar10: files in {folder} fail torchvision's MD5 check (corrupt or not the official release); "
            "re-download them with download=True, or pass verify_checksums=False to read them anyway"
        ) from error

    def images(data: np.ndarray) -> torch.Tensor:  # uint8 (N, H, W, C) -> float32 (N, C, H, W)
        return torch.as_tensor(data).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

    return _bundle(
        "cifar10",
        (images(train.data), train.targets),
        (images(test.data), test.targets),
        num_classes=len(train.classes),
        note=f"torchvision CIFAR10 from {folder} (pixel/255, not standardised), standard train/test split",
    )


# ------------------------------------------------------------------------------------------------------------
# Registry

Loader = Callable[[Path, bool, bool], DataBundle]

DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "mnist-test-split": _load_mnist_test_split,
    "fashionmnist": _load_fashionmnist,
    "kmnist": _load_kmnist,
    "usps": _load_usps,
    "cifar10": _load_cifar10,
}

# Data sets that need no files (bundled with a package).
BUNDLED_DATASETS = frozenset({"digits"})


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify_checksums: bool = True,
) -> DataBundle:
    """Load the data set ``name`` into memory.

    Args:
        name: one of ``DATASETS``.
        data_dir: the folder holding the data sets in torchvision's layout (see the module docstring);
            not needed for ``digits``.
        download: let torchvision fetch missing files into ``data_dir`` (needs the internet).
        verify_checksums: keep torchvision's MD5 check of CIFAR-10 files on disk (the only reader that
            has one); ``False`` reads unofficial files through the same code.

    Raises:
        ValueError: unknown ``name`` or missing ``data_dir``.
        DatasetNotFound: the files are missing and ``download`` is false, or the download failed.
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown data set {name!r}; accepted: {', '.join(sorted(DATASETS))}")
    if data_dir is None:
        if name not in BUNDLED_DATASETS:
            raise ValueError(
                f"data_dir: data set {name!r} is read from files; pass the folder that holds them"
            )
        path = None
    else:
        path = Path(data_dir).expanduser()
    if download and not verify_checksums:
        raise ValueError("verify_checksums: must be True when download=True")
    return DATASETS[name](path, download, verify_checksums)
