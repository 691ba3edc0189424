"""The one object every dataset builder returns, so stages never special-case a dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

__all__ = ["DataBundle"]


@dataclass
class DataBundle:
    """Train/val datasets plus what a model and a deployment need to know about the input.

    ``train`` and ``val`` yield ``(float tensor C x H x W, already normalised, int label)``.
    ``mean``/``std`` are the per-channel constants used for that normalisation (0-1 pixel
    scale), recorded so that deployment preprocessing can reproduce it exactly.

    ``selection`` is carved out of the training data by ``build_data`` (seeded,
    class-balanced, disjoint from ``train``): every decision a run makes (teacher
    promotion, best epoch, the TA ladder check) is taken on it, so that ``val`` (the
    official test split where one exists) is only ever used for the reported figures.
    ``train_indices`` / ``selection_indices`` are positions in the original training set,
    kept so that tests and reports can show the splits are disjoint.
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
    selection: Dataset | None = None
    eval_transform: Callable | None = None  # what ``val`` uses, for datasets whose ``train`` augments
    train_indices: list[int] | None = None
    selection_indices: list[int] | None = None

    @property
    def input_shape(self) -> list[int]:
        """One image's shape, C x H x W: what models are traced, exported and profiled with."""
        return [self.in_channels, self.image_size, self.image_size]
