"""The tiny pruning setup the method tests share: ResNet-8 on 32 random 16x16 images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from cascadec.models import create_model
from cascadec.recipe import Recipe


def prune_recipe(method: str = "cascade", over: dict | None = None) -> Recipe:
    """A fast recipe (2 steps per epoch, 1 TA); ``over`` merges section by section."""
    data = {
        "name": "tiny",
        "model": {"name": "cifar_resnet8", "num_classes": 10, "in_channels": 1},
        "prune": {
            "method": method,
            "target": {"flops_reduction": 0.5},
            "importance": "taylor",
            "importance_batches": 2,
        },
        "cascade": {"num_tas": 1},
        "distill": {"kd": True},
        "train": {"joint_epochs": 1, "student_epochs": 1, "max_steps_per_epoch": 2, "lr": 0.01},
    }
    for section, values in (over or {}).items():
        data[section] = {**data[section], **values}
    return Recipe.model_validate(data)


def tiny_data(images: int = 32):
    """A random ResNet-8 teacher, a training loader and a selection loader (its first 16 images)."""
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(images, 1, 16, 16, generator=g), torch.randint(0, 10, (images,), generator=g)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=False)
    val = DataLoader(TensorDataset(xs[:16], ys[:16]), batch_size=8, shuffle=False)
    return teacher, loader, val
