"""Calibration and evaluation data: Fashion-MNIST from the Debian package, and image folders.

Fashion-MNIST is the project's real data set (no model hub or download is reachable here): the Debian
package ``dataset-fashion-mnist`` installs the original IDX files under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "calibration_subset",
]

FASHION_MNIST_DIR = Path(os.environ.get("CPTV_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as normalized images ``(N, 1, 28, 28)`` and labels ``(N,)``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder holding the IDX files; defaults to the Debian package's folder.

    Returns:
        ``(images, labels)``: float32 images normalized with the data set's mean and std, int64 labels.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    image_file, label_file = (folder / name for name in _FILES[split])
    if not image_file.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {folder}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or set CPTV_FASHION_MNIST_DIR to a folder "
            "holding the four *-idx*-ubyte.gz files."
        )
    images = torch.from_numpy(_read_idx(image_file).copy()).float().div_(255.0)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(label_file).astype(np.int64))
    return images, labels


def calibration_subset(images: torch.Tensor, count: int = 1000, seed: int = 0) -> torch.Tensor:
    """Draw ``count`` images at random (without replacement) from ``images``, reproducibly from ``seed``."""
    if count > len(images):
        raise ValueError(f"asked for {count} calibration images but only {len(images)} are available")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:count]
    return images[index]
