"""``build_data(name, ...)``: every dataset behind one call that returns a :class:`DataBundle`.

Builders share one signature, ``build(root, *, image_size, download, seed, **options)``;
dataset-specific options (``augment`` for cifar/imagefolder, ``in_channels``,
``num_classes``, ``train_size``, ``val_size``, ``noise`` for synthetic) are checked against
the builder's own keyword arguments here, so a typo in a recipe is a ``UserError`` naming
the key rather than a ``TypeError`` traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from cascadec.data import cifar, digits, fashion_mnist, imagefolder, synthetic
from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import limit_dataset
from cascadec.errors import UserError

__all__ = ["build_data", "list_datasets"]

_COMMON = {"root", "image_size", "download", "seed"}
_DATASETS: dict[str, Callable[..., DataBundle]] = {
    "fashion_mnist": fashion_mnist.build,
    "digits": digits.build,
    "cifar10": cifar.build_cifar10,
    "cifar100": cifar.build_cifar100,
    "imagefolder": imagefolder.build,
    "synthetic": synthetic.build,
}


def list_datasets() -> list[str]:
    """Every dataset name ``build_data`` accepts, sorted."""
    return sorted(_DATASETS)


def build_data(
    name: str,
    root: str | Path | None = None,
    *,
    image_size: int | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
    download: bool = False,
    **options: Any,
) -> DataBundle:
    """Build dataset ``name``; ``*_limit`` keep a seeded class-balanced subset of each split."""
    if name not in _DATASETS:
        close = get_close_matches(str(name), list(_DATASETS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown dataset '{name}'; {hint}known: {', '.join(list_datasets())}")
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    builder = _DATASETS[name]
    allowed = sorted(set(inspect.signature(builder).parameters) - _COMMON)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"dataset '{name}' has no option '{unknown[0]}' "
            f"(options: {', '.join(allowed) if allowed else 'none'})"
        )
    path = Path(root).expanduser() if root is not None and str(root).strip() else None
    bundle = builder(path, image_size=image_size, download=bool(download), seed=seed, **options)
    bundle.train = limit_dataset(bundle.train, train_limit, seed, key="train_limit")
    bundle.val = limit_dataset(bundle.val, val_limit, seed, key="val_limit")
    return bundle
