"""Write a tiny stand-in for FashionMNIST in the data set's real on-disk format, for trying the example offline.

torchvision's ``FashionMNIST(root)`` reads four uncompressed IDX files from ``<root>/FashionMNIST/raw/``::

    train-images-idx3-ubyte   magic 2051, then n, 28, 28 (big-endian int32), then n*28*28 unsigned bytes
    train-labels-idx1-ubyte   magic 2049, then n, then n unsigned bytes (the class, 0-9)
    t10k-images-idx3-ubyte    the same for the test set
    t10k-labels-idx1-ubyte

It checks only that these files exist (no checksum), so the files written here load exactly as the real ones
do. Each class is a fixed random 28x28 template (smooth blobs drawn at 7x7 and upsampled), and each image is
its class's template shifted by up to 3 pixels under strong pixel noise: a small CNN learns the classes in a few
epochs, but not at once.

    python write_tiny_fashionmnist.py DATA_DIR [--n-train 600] [--n-test 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

IMAGE_MAGIC, LABEL_MAGIC, SIDE, CLASSES = 2051, 2049, 28, 10
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_images(path: Path, images: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">4i", IMAGE_MAGIC, len(images), SIDE, SIDE))
        f.write(images.astype(np.uint8).tobytes())


def _write_labels(path: Path, labels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">2i", LABEL_MAGIC, len(labels)))
        f.write(labels.astype(np.uint8).tobytes())


def _templates(rng: np.random.Generator) -> np.ndarray:
    """One 28x28 template per class in [0, 1]: 7x7 random blobs upsampled 4x, so neighbouring pixels agree."""
    coarse = rng.random((CLASSES, SIDE // 4, SIDE // 4))
    return np.kron(coarse, np.ones((4, 4)))


def _sample(rng: np.random.Generator, templates: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % CLASSES  # balanced classes
    rng.shuffle(labels)
    images = np.empty((n, SIDE, SIDE))
    for i, label in enumerate(labels):  # the class's template, moved by up to 3 pixels, under pixel noise
        shift = rng.integers(-3, 4, size=2)
        images[i] = 0.4 * np.roll(templates[label], tuple(shift), axis=(0, 1)) + 0.6 * rng.random((SIDE, SIDE))
    return np.clip(np.rint(255 * images), 0, 255).astype(np.uint8), labels


def write_tiny_fashionmnist(root: str | Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``n_train`` training and ``n_test`` test images under ``<root>/FashionMNIST/raw``; return that folder."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train, n_test: expected >= 1, got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    templates = _templates(rng)
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _sample(rng, templates, n)
        _write_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the data folder (the files go to ROOT/FashionMNIST/raw)")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raw = write_tiny_fashionmnist(args.root, args.n_train, args.n_test, args.seed)
    print(f"wrote {args.n_train} training and {args.n_test} test images to {raw}")


if __name__ == "__main__":
    main()
