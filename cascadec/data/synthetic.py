"""Deterministic random images for tests and smoke runs: no files, any shape.

Each class has a smooth random prototype (a 4x4 Gaussian pattern upsampled bilinearly to
the image size); an image is its class prototype plus i.i.d. Gaussian noise
(``noise`` std, default 0.5). Low-frequency prototypes are easy for a small conv net, so a
test can check that training actually reduces the loss.
Split: ``train_size`` (default 512) and ``val_size`` (default 128) samples drawn
independently from the same prototypes; labels cycle through the classes (balanced) in a
seeded random order. Everything is a function of ``seed``: same seed, same tensors.
Normalisation: none needed -- pixels are already ~zero-mean, ~unit-std, so mean=0, std=1.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cascadec import memory
from cascadec.data.bundle import DataBundle
from cascadec.data.tensors import TensorImageDataset
from cascadec.errors import UserError

__all__ = ["build", "make_synthetic"]

DEFAULT_SIZE = 32


def make_synthetic(
    n: int,
    *,
    channels: int = 3,
    size: int = DEFAULT_SIZE,
    num_classes: int = 10,
    seed: int = 0,
    split: int = 0,
    noise: float = 0.5,
) -> TensorImageDataset:
    """``n`` images of split ``split``; prototypes depend on ``seed`` only, samples on both."""
    for key, value in (("n", n), ("channels", channels), ("size", size), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"synthetic data: {key} must be a positive integer, got {value!r}")
    # made eagerly, in float32: the noise, the prototypes picked per image and their sum at once
    memory.require(
        3 * n * memory.image_bytes((channels, size, size)),
        f"synthetic data: {n} images of {channels}x{size}x{size}",
        "lower data.image_size or the synthetic sizes",
    )
    base = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=base)
    prototypes = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + split + 1)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = prototypes[labels] + noise * torch.randn(n, channels, size, size, generator=gen)
    return TensorImageDataset(images, labels, mean=(0.0,) * channels, std=(1.0,) * channels, image_size=size)


def build(
    root: Path | None,
    *,
    image_size: int | None,
    download: bool,
    seed: int,
    in_channels: int = 3,
    num_classes: int = 10,
    train_size: int = 512,
    val_size: int = 128,
    noise: float = 0.5,
) -> DataBundle:
    """Synthetic data as a :class:`DataBundle`; ``root``/``download`` are unused."""
    size = image_size or DEFAULT_SIZE
    common = dict(channels=in_channels, size=size, num_classes=num_classes, seed=seed, noise=noise)
    train = make_synthetic(train_size, split=0, **common)  # type: ignore[arg-type]
    val = make_synthetic(val_size, split=1, **common)  # type: ignore[arg-type]
    return DataBundle(
        name="synthetic",
        train=train,
        val=val,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=size,
        mean=(0.0,) * in_channels,
        std=(1.0,) * in_channels,
        description=(
            f"synthetic (seed {seed}): {train_size} train / {val_size} val, "
            f"{in_channels}x{size}x{size}, {num_classes} classes, noise std {noise}"
        ),
    )
