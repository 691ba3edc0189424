"""In-memory image datasets and the seeded subsetting shared by the dataset builders.

Small datasets (Fashion-MNIST, digits, CIFAR, synthetic) are held as one uint8 tensor
(N, C, H, W): 47 MB for Fashion-MNIST instead of 188 MB as float, and no PIL round trip per
item. Conversion, augmentation, resizing and normalisation happen per item, so nothing
depends on how many DataLoader workers there are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from cascadec.errors import UserError

__all__ = ["RandomCropFlip", "TensorImageDataset", "balanced_order", "eval_view", "limit_dataset", "split_off"]


class TensorImageDataset(Dataset):
    """``images`` uint8 (0-255) or float (0-1 scale), shape (N, C, H, W); ``targets`` (N,)."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} do not match targets {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            x = self.augment(x)
        size = self.image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            shrink = size < max(x.shape[-2:])
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0]
        return (x - self.mean) / self.std, int(self.targets[index])


class RandomCropFlip:
    """Zero-pad ``padding`` px, random crop back to size, horizontal flip with p=0.5.

    The standard CIFAR augmentation, on tensors; it draws from torch's global RNG, which
    DataLoader seeds differently in every worker.
    """

    def __init__(self, padding: int = 4) -> None:
        self.padding = padding

    def __call__(self, x: Tensor) -> Tensor:
        p = self.padding
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p))
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        x = padded[:, i : i + h, j : j + w]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def balanced_order(dataset: Dataset, seed: int) -> torch.Tensor:
    """All item positions in a seeded order in which classes take turns: any prefix of it is
    a class-balanced sample (1000 items of a 10-class set hold 100 per class whenever the
    classes have that many), and the same seed always gives the same order."""
    n = len(dataset)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    targets = _targets_of(dataset)
    if targets is None:
        return perm
    labels = targets[perm]
    order = torch.sort(labels, stable=True).indices  # perm positions grouped by class
    grouped = labels[order]
    starts = torch.searchsorted(grouped, grouped, side="left")
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts  # how many earlier items of the same class
    return perm[torch.argsort(rank * n + torch.arange(n))]


def eval_view(dataset: Dataset, eval_transform: Callable | None = None) -> Dataset:
    """The same items without training augmentation, for selection (decisions should not
    depend on random crops). ``eval_transform`` replaces a torchvision dataset's transform."""
    if isinstance(dataset, TensorImageDataset) and dataset.augment is not None:
        view = copy.copy(dataset)
        view.augment = None
        return view
    if eval_transform is not None and hasattr(dataset, "transform"):
        view = copy.copy(dataset)
        view.transform = eval_transform
        return view
    return dataset


def limit_dataset(dataset: Dataset, limit: int | None, seed: int, *, key: str) -> Dataset:
    """A seeded, class-balanced subset of ``limit`` items (the whole set when it is smaller),
    so fast recipes still see every class."""
    if limit is None:
        return dataset
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise UserError(f"{key} must be a positive integer, got {limit!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if limit >= n:
        return dataset
    chosen = balanced_order(dataset, seed)[:limit]
    return Subset(dataset, sorted(chosen.tolist()))


def split_off(dataset: Dataset, size: int, seed: int) -> tuple[list[int], list[int]]:
    """Positions of a seeded, class-balanced split of ``size`` items and of the rest (disjoint,
    each sorted). ``train_limit`` subsets what remains, so it never changes which images
    are held out for selection."""
    n = len(dataset)  # type: ignore[arg-type]
    if not 0 < size < n:
        raise UserError(f"data.selection_size {size} must be between 1 and {n - 1} (the training set has {n} images)")
    order = balanced_order(dataset, seed + 7919)
    return sorted(order[:size].tolist()), sorted(order[size:].tolist())


def _targets_of(dataset: Dataset) -> Tensor | None:
    if isinstance(dataset, Subset):
        inner = _targets_of(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    tensor = torch.as_tensor(targets, dtype=torch.long)
    return tensor if tensor.ndim == 1 and tensor.shape[0] == len(dataset) else None  # type: ignore[arg-type]
