"""scikit-learn's bundled 8x8 handwritten digits: a dataset that is always there, offline.

Data: 1,797 images, 8x8, 1 channel, 10 classes (``sklearn.datasets.load_digits``, the UCI
optical-digits test set). Pixel values are 0-16; they are divided by 16.
Split: a fixed stratified 80/20 split, ``train_test_split(test_size=0.2, stratify=y,
random_state=0)`` -> 1,437 train / 360 val. It is fixed on purpose (it ignores ``seed``) so
that val accuracy is comparable between runs; ``seed`` only drives ``train_limit``.
Normalisation: ``(x / 16 - 0.3054) / 0.3761`` (mean and std of the 8x8 training pixels).
Images are upsampled bilinearly to ``image_size`` (default 16), since 8x8 is too small for
the strided stems of most nets; upsampling smooths, so the std at 16x16 is ~0.85, not 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import TensorImageDataset

__all__ = ["MEAN", "STD", "build"]

MEAN = (0.3054,)
STD = (0.3761,)
DEFAULT_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0


def build(root: Path | None, *, image_size: int | None, download: bool, seed: int) -> DataBundle:
    """Digits as a :class:`DataBundle`; ``root`` and ``download`` are unused (bundled data)."""
    from sklearn.datasets import load_digits  # here, not at import: scikit-learn takes ~2 s to import
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    targets = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, val_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=digits.target, random_state=SPLIT_SEED
    )
    size = image_size or DEFAULT_SIZE

    def subset(idx: np.ndarray) -> TensorImageDataset:
        index = torch.from_numpy(np.sort(idx))
        return TensorImageDataset(images[index], targets[index], mean=MEAN, std=STD, image_size=size)

    train, val = subset(train_idx), subset(val_idx)
    return DataBundle(
        name="digits",
        train=train,
        val=val,
        num_classes=NUM_CLASSES,
        in_channels=1,
        image_size=size,
        mean=MEAN,
        std=STD,
        description=(
            f"scikit-learn digits: {len(train)} train / {len(val)} val (fixed stratified 80/20, "
            f"random_state={SPLIT_SEED}), 8x8 upsampled to 1x{size}x{size}, 10 classes"
        ),
    )
