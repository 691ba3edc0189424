"""Fashion-MNIST read straight from the four IDX ``.gz`` files (no torchvision download).

Data: 28x28 grey images, 1 channel, 10 classes. Split: the official 60,000 training images
are ``train``; the official 10,000 test images (``t10k-*``) are ``val`` -- there is no
separate test split, so val accuracy is the number to compare with papers.
Normalisation: pixels / 255, then ``(x - 0.2860) / 0.3530`` (mean and std of the training
pixels). ``image_size`` other than 28 resizes bilinearly (antialiased when shrinking).
No augmentation.

Where the files are looked for, in order (the first folder holding all four wins):

1. ``root`` (``--data PATH``): the files themselves, or torchvision's
   ``FashionMNIST/raw`` layout under it; when given, nothing else is searched;
2. ``$CASCADEC_DATA/fashion_mnist``;
3. ``~/.cache/cascadec/fashion_mnist`` (where ``download=True`` puts them without ``root``);
4. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu ``dataset-fashion-mnist``).

Uncompressed files (no ``.gz``) are accepted too. Headers and sizes are checked, so a
truncated download fails with the file's name instead of a reshape error.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import FashionMNIST

from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import TensorImageDataset
from cascadec.errors import UserError, first_line

__all__ = ["MEAN", "STD", "build", "find_files", "read_idx", "search_dirs"]

MEAN = (0.2860,)
STD = (0.3530,)
NATIVE_SIZE = 28
NUM_CLASSES = 10
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


def cache_dir() -> Path:
    return Path("~/.cache/cascadec/fashion_mnist").expanduser()


def search_dirs(root: Path | None) -> list[Path]:
    """The folders searched, in order; read at call time so env changes take effect."""
    if root is not None:
        return [root, root / "FashionMNIST" / "raw", root / "raw", root / "fashion_mnist"]
    dirs: list[Path] = []
    env = os.environ.get("CASCADEC_DATA")
    if env:
        base = Path(env).expanduser()
        dirs += [base / "fashion_mnist", base / "FashionMNIST" / "raw"]
    cache = cache_dir()
    return [*dirs, cache, cache / "FashionMNIST" / "raw", DEBIAN_DIR]


def find_files(root: Path | None, *, download: bool = False) -> dict[str, Path]:
    """Paths of the four files, from the first folder that holds all of them."""
    dirs = search_dirs(root)
    for folder in dirs:
        found = _files_in(folder)
        if found is not None:
            return found
    if download:
        target = root if root is not None else cache_dir()
        _download(target)
        found = _files_in(target / "FashionMNIST" / "raw")
        if found is not None:
            return found
    looked = ", ".join(str(d) for d in dirs)
    raise UserError(
        f"Fashion-MNIST not found (looked in: {looked}); install it with "
        "`apt-get install dataset-fashion-mnist`, pass --data PATH to a folder holding "
        f"{_FILES['train_images']}.gz and the other three files, or allow download"
    )


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An IDX uint8 array, with magic number and byte count checked against the header."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is truncated or corrupt ({first_line(exc)})") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[0:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UserError(
            f"{path} is not an IDX file of {ndim}-d uint8 data "
            f"(magic {data[:4].hex() or 'missing'}, expected 0000080{ndim})"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise UserError(
            f"{path} is truncated or corrupt: header says {dims} = {expected} bytes, file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def build(root: Path | None, *, image_size: int | None, download: bool, seed: int) -> DataBundle:
    """Fashion-MNIST as a :class:`DataBundle` (``seed`` unused: the split is the official one)."""
    files = find_files(root, download=download)
    size = image_size or NATIVE_SIZE
    splits = {}
    for split in ("train", "val"):
        images = read_idx(files[f"{split}_images"], ndim=3)
        labels = read_idx(files[f"{split}_labels"], ndim=1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise UserError(
                f"{files[f'{split}_images']}: {images.shape} images do not match "
                f"{labels.shape[0]} labels in {files[f'{split}_labels']}"
            )
        if labels.size and labels.max() > 9:
            raise UserError(f"{files[f'{split}_labels']} holds label {labels.max()}, expected 0-9")
        splits[split] = TensorImageDataset(
            torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), mean=MEAN, std=STD, image_size=size
        )
    folder = files["train_images"].parent
    return DataBundle(
        name="fashion_mnist",
        train=splits["train"],
        val=splits["val"],
        num_classes=NUM_CLASSES,
        in_channels=1,
        image_size=size,
        mean=MEAN,
        std=STD,
        description=(
            f"Fashion-MNIST from {folder}: {len(splits['train'])} train / "
            f"{len(splits['val'])} test (used as val), 1x{size}x{size}, 10 classes, "
            f"normalised with mean {MEAN[0]} std {STD[0]}"
        ),
    )


def _files_in(folder: Path) -> dict[str, Path] | None:
    found: dict[str, Path] = {}
    for key, stem in _FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _download(target: Path) -> None:
    """torchvision's downloader (mirrors + md5 checks); only when the user asked for it."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(target), train=True, download=True)
    except Exception as exc:
        raise UserError(f"downloading Fashion-MNIST into {target} failed: {first_line(exc)}") from None
