"""The one object every dataset builder returns, so stages never special-case a dataset."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

__all__ = ["DataBundle"]


@dataclass
class DataBundle:
    """Train/val datasets plus what a model and a deployment need to know about the input.

    ``train`` and ``val`` yield ``(float tensor C x H x W, already normalised, int label)``.
    ``mean``/``std`` are the per-channel constants used for that normalisation (0-1 pixel
    scale), recorded so that deployment preprocessing can reproduce it exactly.
    """

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
