"""Write a copy of Fashion-MNIST for a device call that is small enough to carry (the device tool carries at
most 64 MiB with the checkout and the ModelOpt wheels; the full training images alone are 26 MB).

Only the training images that the benchmarks draw for calibration are kept (``calibration_subset`` of the
given seeds); every other training image is zeroed, so the file compresses to almost nothing while the
60,000-image index that ``calibration_subset`` draws from stays the same. The calibration images, and so every
record, are byte for byte those of the full data set. The test split is copied whole.

    python -m benchmarks.slim_fashion_mnist scratch/fmz --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import torch

from cptv_plugin.datasets import FASHION_MNIST_DIR, calibration_subset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the four *-idx*-ubyte.gz files to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds to keep")
    parser.add_argument("--calibration", type=int, default=1000, help="calibration images per seed")
    args = parser.parse_args(argv)
    source = FASHION_MNIST_DIR
    if args.out.resolve() == source.resolve():
        raise SystemExit(f"{args.out} is the source folder: give another folder, the source stays untouched")
    args.out.mkdir(parents=True, exist_ok=True)
    with gzip.open(source / "train-images-idx3-ubyte.gz", "rb") as handle:
        data = bytearray(handle.read())
    header, count, pixels = 16, int.from_bytes(data[4:8], "big"), 28 * 28
    keep = torch.zeros(count, dtype=torch.bool)
    for seed in args.seeds:  # the images calibration_subset draws: its draw applied to the indices
        keep[calibration_subset(torch.arange(count), args.calibration, seed)] = True
    for index in (~keep).nonzero().flatten().tolist():
        data[header + index * pixels : header + (index + 1) * pixels] = bytes(pixels)
    temporary = args.out / "train-images-idx3-ubyte.gz.partial"
    with gzip.open(temporary, "wb") as handle:
        handle.write(bytes(data))
    temporary.replace(args.out / "train-images-idx3-ubyte.gz")
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(source / name, args.out / name)
    size = sum(path.stat().st_size for path in args.out.glob("*.gz"))
    print(f"{args.out}: {int(keep.sum())} of {count} training images kept, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
