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
    "load_image_folder",
    "image_folder_transform",
    "load_calibration_source",
    "fashion_mnist_splits",
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


def fashion_mnist_splits(calibration: int = 1000, test_images: int | None = None, seed: int = 0):
    """``(calibration images, test images, test labels)``: ``calibration`` training images drawn by ``seed``
    and the first ``test_images`` of the test split (all 10,000 by default)."""
    train_images, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if test_images:
        test_x, test_y = test_x[:test_images], test_y[:test_images]
    return calibration_subset(train_images, calibration, seed), test_x, test_y


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_folder_transform(model: torch.nn.Module):
    """timm's evaluation transform for ``model`` (resize, center crop, normalize from its pretrained config),
    with the PIL mode its input channels need."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(model=model)
    channels = config["input_size"][0]
    if channels == 1 and len(config["mean"]) != 1:  # grayscale model with RGB statistics in its config
        config["mean"], config["std"] = config["mean"][:1], config["std"][:1]
    transform = create_transform(**config)
    mode = "L" if channels == 1 else "RGB"
    return lambda image: transform(image.convert(mode))


def load_image_folder(root: str | Path, transform, count: int | None = None, seed: int = 0,
                      with_labels: bool = False):
    """Images from a folder, in ImageNet's class-per-folder layout (``root/<class>/<image>``) or flat.

    Args:
        root: the folder.
        transform: PIL image → tensor (e.g. :func:`image_folder_transform`).
        count: draw this many images at random (reproducibly from ``seed``); ``None`` takes all.
        with_labels: also return labels (class folders in sorted order, as torchvision's ImageFolder).
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(p, classes.index(p.parent.name) if p.parent != root else -1)
             for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if count is not None:
        if count > len(files):
            raise ValueError(f"asked for {count} images but {root} holds only {len(files)}")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:count]
        files = [files[i] for i in order.tolist()]
    images = torch.stack([transform(Image.open(path)) for path, _ in files])
    if with_labels:
        return images, torch.tensor([label for _, label in files])
    return images


def load_calibration_source(source: str | Path, model: torch.nn.Module, count: int = 1000,
                            seed: int = 0) -> torch.Tensor:
    """Calibration images from ``source``: ``"fashion-mnist"`` (the training split), a folder of images
    (ImageNet layout or flat; transformed for ``model`` by timm's data config), or a tensor file saved with
    ``torch.save`` (``(N, C, H, W)``, already normalized). ``count`` images are drawn reproducibly."""
    if str(source) in ("fashion-mnist", "fmnist"):
        images, _ = load_fashion_mnist("train")
        return calibration_subset(images, count, seed)
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, image_folder_transform(model), count, seed)
    if path.is_file():
        images = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(images, dict):
            images = images.get("images")
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{path} must hold a tensor of images (or a dict with an 'images' tensor)")
        return calibration_subset(images, min(count, len(images)), seed)
    raise FileNotFoundError(f"calibration source {source!r} is neither 'fashion-mnist', a folder nor a file")
