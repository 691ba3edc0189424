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

from torch.utils.data import Subset

from cascadec.data import cifar, digits, fashion_mnist, imagefolder, synthetic
from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import eval_view, limit_dataset, split_off
from cascadec.errors import UserError
from cascadec.names import DATASETS, check_registry

__all__ = ["build_data", "input_geometry", "list_datasets"]

SELECTION_SEED = 0
_COMMON = {"root", "image_size", "download", "seed"}
_DATASETS: dict[str, Callable[..., DataBundle]] = {
    "fashion_mnist": fashion_mnist.build,
    "digits": digits.build,
    "cifar10": cifar.build_cifar10,
    "cifar100": cifar.build_cifar100,
    "imagefolder": imagefolder.build,
    "synthetic": synthetic.build,
}
check_registry("data sets", _DATASETS, DATASETS)


# (input channels, native image size, classes) of each builder's output, read from the builder
# modules so that a dry run needs neither the data nor a download; imagefolder's class count is
# only known from the folder (None: the model's default head stands)
_GEOMETRY: dict[str, tuple[int, int, int | None]] = {
    "fashion_mnist": (1, fashion_mnist.NATIVE_SIZE, fashion_mnist.NUM_CLASSES),
    "digits": (1, digits.DEFAULT_SIZE, digits.NUM_CLASSES),
    "cifar10": (3, cifar.NATIVE_SIZE, cifar.CIFAR10.num_classes),
    "cifar100": (3, cifar.NATIVE_SIZE, cifar.CIFAR100.num_classes),
    "imagefolder": (3, imagefolder.DEFAULT_SIZE, None),
}


def input_geometry(name: str, options: dict[str, Any] | None = None) -> tuple[int, int, int | None]:
    """(channels, native image size, classes) dataset ``name`` produces, without reading it."""
    if name == "synthetic":  # its geometry is its options
        params = inspect.signature(synthetic.build).parameters
        opts = options or {}
        return (
            int(opts.get("in_channels", params["in_channels"].default)),
            synthetic.DEFAULT_SIZE,
            int(opts.get("num_classes", params["num_classes"].default)),
        )
    if name not in _GEOMETRY:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(list_datasets())}")
    return _GEOMETRY[name]


def default_selection_size(train_size: int) -> int:
    """10 % of the training set, at most 5,000 images: enough that one image moves a decision
    by at most 0.02 points on large sets, small enough to cost little training data."""
    return max(1, min(5000, round(0.1 * train_size)))


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
    selection_size: int | None = None,
    seed: int = 0,
    download: bool = False,
    **options: Any,
) -> DataBundle:
    """Build dataset ``name``; ``*_limit`` keep a seeded class-balanced subset of each split.

    A selection split of ``selection_size`` training images (default: 10 % of the training
    set, at most 5,000) is held out first, class-balanced and seeded, and ``train_limit``
    then subsets what remains: decisions are taken on held-out training images, never on
    ``val`` (the official test split), which is kept for the reported accuracy."""
    if name not in _DATASETS:
        close = get_close_matches(str(name), list(_DATASETS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown dataset '{name}'; {hint}known: {', '.join(list_datasets())}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    builder = _DATASETS[name]
    allowed = sorted(set(inspect.signature(builder).parameters) - _COMMON)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"dataset '{name}' has no option '{unknown[0]}' (options: {', '.join(allowed) if allowed else 'none'})"
        )
    path = Path(root).expanduser() if root is not None and str(root).strip() else None
    bundle = builder(path, image_size=image_size, download=bool(download), seed=seed, **options)
    full_train = bundle.train
    n = len(full_train)  # type: ignore[arg-type]
    if n < 2:
        raise UserError(
            f"dataset '{name}': {n} training image(s); at least 2 are needed (one to train on, one to select with)"
        )
    size = selection_size if selection_size is not None else default_selection_size(n)
    # the split does not move with train.seed: like the official test split it is a property
    # of the data, so teachers trained on the rest never see it, whatever seed a run uses
    select_idx, rest_idx = split_off(full_train, size, SELECTION_SEED)
    remaining = Subset(full_train, rest_idx)
    limited = limit_dataset(remaining, train_limit, seed, key="train_limit")
    train_idx = rest_idx if limited is remaining else [rest_idx[i] for i in limited.indices]  # type: ignore[attr-defined]
    bundle.train = Subset(full_train, train_idx)
    bundle.selection = Subset(eval_view(full_train, bundle.eval_transform), select_idx)
    bundle.train_indices, bundle.selection_indices = train_idx, select_idx
    bundle.val = limit_dataset(bundle.val, val_limit, seed, key="val_limit")
    return bundle
