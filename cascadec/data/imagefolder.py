"""Any class-per-folder image tree in the ImageNet layout, with torchvision's ImageNet recipe.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; classes are the
sub-folder names, sorted (torchvision ``ImageFolder``), and ``val`` must have the same
classes as ``train`` so that label indices agree. Images are converted to RGB (3 channels).
Split: whatever the two folders hold; ``val`` is the evaluation split.
Transforms (torchvision's ImageNet reference recipe, ``image_size`` default 224):
train ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip`` (or, with
``augment=False``, the val transform); val ``Resize(round(image_size * 256 / 224))`` +
``CenterCrop(image_size)``.
Normalisation: ImageNet ``mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)``, what
torchvision's pretrained weights expect.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from cascadec.data.bundle import DataBundle
from cascadec.errors import UserError, first_line

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build", "train_transform", "val_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224


def train_transform(size: int) -> T.Compose:
    return T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def val_transform(size: int) -> T.Compose:
    return T.Compose(
        [T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def build(root: Path | None, *, image_size: int | None, download: bool, seed: int, augment: bool = True) -> DataBundle:
    """An ImageFolder pair as a :class:`DataBundle`; there is nothing to download."""
    if root is None:
        raise UserError("imagefolder needs a data path (--data PATH) to a folder with train/ and val/")
    size = image_size or DEFAULT_SIZE
    folders = {split: root / split for split in ("train", "val")}
    for folder in folders.values():
        if not folder.is_dir():
            raise UserError(
                f"imagefolder: {folder} is missing; expected {root}/train/<class>/... and {root}/val/<class>/..."
            )
    train = _open(folders["train"], train_transform(size) if augment else val_transform(size))
    val = _open(folders["val"], val_transform(size))
    if train.classes != val.classes:
        differ = sorted(set(train.classes) ^ set(val.classes)) or ["(order)"]
        raise UserError(
            f"imagefolder: {folders['val']} and {folders['train']} have different classes "
            f"(e.g. {', '.join(differ[:3])})"
        )
    return DataBundle(
        name="imagefolder",
        train=train,
        val=val,
        num_classes=len(train.classes),
        in_channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_transform=val_transform(size),
        description=(
            f"ImageFolder {root}: {len(train)} train / {len(val)} val images, "
            f"{len(train.classes)} classes, 3x{size}x{size}, ImageNet normalisation"
        ),
    )


def _open(folder: Path, transform: T.Compose) -> ImageFolder:
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"imagefolder: {folder}: {first_line(exc)}") from None
