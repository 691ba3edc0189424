"""CIFAR-10 / CIFAR-100 from torchvision's on-disk layout (the "python version" batches).

Data: 32x32 RGB, 10 or 100 classes (CIFAR-100: the 100 fine labels).
Split: the official 50,000 training images are ``train``; the official 10,000 test images
are ``val``.
Normalisation: pixels / 255, then per channel
``mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616)`` for CIFAR-10 and
``mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)`` for CIFAR-100 (the
statistics of each training set).
Augmentation (train only, unless ``augment=False``): zero-pad 4 px + random 32x32 crop,
random horizontal flip. ``image_size`` other than 32 resizes after augmentation.

Layout: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
``root/cifar-100-python/{train,test}``; ``root`` may also be that folder itself. Without
``root``: ``$CASCADEC_DATA``, ``$CASCADEC_DATA/cifar``, ``~/.cache/cascadec/cifar``.
``download=True`` fetches with torchvision into ``root`` (or the cache) only when asked.

The batch files are pickles -- that is the dataset's standard format. They are read with an
unpickler that only admits numpy array reconstruction, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import RandomCropFlip, TensorImageDataset
from cascadec.errors import UserError, first_line

__all__ = ["CIFAR10", "CIFAR100", "build_cifar10", "build_cifar100", "read_batch"]


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


CIFAR10 = CifarSpec(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "labels",
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    "CIFAR10",
)
CIFAR100 = CifarSpec(
    "cifar100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "fine_labels",
    100,
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    "CIFAR100",
)
NATIVE_SIZE = 32

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy arrays and bytes need."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if canonical.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = canonical.replace("numpy.core", "numpy._core", 1)  # avoid the shim warning
        return super().find_class(module, name)


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch file, validated."""
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as exc:
        raise UserError(f"CIFAR batch {path} is truncated or corrupt ({first_line(exc)})") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR batch {path} holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserError(f"CIFAR batch {path} lacks the 'data' or '{label_key}' key")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"CIFAR batch {path}: 'data' is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise UserError(f"CIFAR batch {path}: {labels.shape} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def build_cifar10(
    root: Path | None, *, image_size: int | None, download: bool, seed: int, augment: bool = True
) -> DataBundle:
    """CIFAR-10 as a :class:`DataBundle` (``seed`` unused: the split is the official one)."""
    return _build(CIFAR10, root, image_size=image_size, download=download, augment=augment)


def build_cifar100(
    root: Path | None, *, image_size: int | None, download: bool, seed: int, augment: bool = True
) -> DataBundle:
    """CIFAR-100 (fine labels) as a :class:`DataBundle`."""
    return _build(CIFAR100, root, image_size=image_size, download=download, augment=augment)


def _build(spec: CifarSpec, root: Path | None, *, image_size: int | None, download: bool, augment: bool) -> DataBundle:
    folder = _find_folder(spec, root, download)
    size = image_size or NATIVE_SIZE
    splits: dict[str, TensorImageDataset] = {}
    for split, files in (("train", spec.train_files), ("val", spec.val_files)):
        parts = [read_batch(folder / f, spec.label_key) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise UserError(f"{folder}: label {labels.max()} out of range for {spec.num_classes} classes")
        splits[split] = TensorImageDataset(
            torch.from_numpy(images),
            torch.from_numpy(labels),
            mean=spec.mean,
            std=spec.std,
            image_size=size,
            augment=RandomCropFlip(4) if (split == "train" and augment) else None,
        )
    return DataBundle(
        name=spec.name,
        train=splits["train"],
        val=splits["val"],
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=size,
        mean=spec.mean,
        std=spec.std,
        description=(
            f"{spec.name.upper()} from {folder}: {len(splits['train'])} train / "
            f"{len(splits['val'])} test (used as val), 3x{size}x{size}, "
            f"{spec.num_classes} classes, train augmentation "
            f"{'crop 4 + flip' if augment else 'off'}"
        ),
    )


def _candidates(spec: CifarSpec, root: Path | None) -> list[Path]:
    if root is not None:
        bases = [root]
    else:
        bases = []
        env = os.environ.get("CASCADEC_DATA")
        if env:
            bases += [Path(env).expanduser(), Path(env).expanduser() / "cifar"]
        bases.append(_cache_dir())
    out: list[Path] = []
    for base in bases:
        out.append(base if base.name == spec.folder else base / spec.folder)
    return out


def _find_folder(spec: CifarSpec, root: Path | None, download: bool) -> Path:
    candidates = _candidates(spec, root)
    for folder in candidates:
        if folder.is_dir():
            missing = [f for f in spec.train_files + spec.val_files if not (folder / f).is_file()]
            if missing:
                raise UserError(f"{spec.name}: {folder / missing[0]} is missing")
            return folder
    if download:
        target = root if root is not None else _cache_dir()
        _download(spec, target)
        return _find_folder(spec, target, download=False)
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"{spec.name} not found (looked for {looked}); pass --data PATH to the folder holding "
        f"'{spec.folder}', or allow download"
    )


def _cache_dir() -> Path:
    return Path("~/.cache/cascadec/cifar").expanduser()


def _download(spec: CifarSpec, target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
        import torchvision.datasets as tvd  # here, not at import: torchvision takes ~2 s and only a download needs it

        getattr(tvd, spec.torchvision_class)(str(target), train=True, download=True)
    except Exception as exc:
        raise UserError(f"downloading {spec.name} into {target} failed: {first_line(exc)}") from None
