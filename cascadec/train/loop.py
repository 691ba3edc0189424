"""Training and evaluation as plain functions you can read top to bottom.

Modelled on torchvision's references/classification/train.py: no callback framework.
The cascade (prune/cascade.py) has its own step because it trains several models at once,
but uses ``evaluate``, ``make_optimizer`` and ``cosine_schedule`` from here.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.errors import UserError
from cascadec.progress import Status


def make_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: training cannot go on, but the last checkpoint is still good."""


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{where}: loss became {loss.item()} (NaN/inf); lower the learning rate (train.lr) and retry")


def steps_in(loader: DataLoader, max_steps: int | None) -> int:
    return min(len(loader), max_steps) if max_steps else len(loader)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    teacher: nn.Module | None = None,
    description: str = "train",
    max_steps: int | None = None,
    epoch: int = 0,
    runtime=None,
) -> dict[str, float]:
    """One epoch; ``loss_fn(logits, labels, teacher_logits_or_None)``. A ``runtime``
    (cascadec.train.runtime) adds mixed precision and gradient averaging across ranks."""
    from cascadec.data.sampler import position
    from cascadec.train.runtime import Runtime, check_step

    runtime = runtime or Runtime(device)
    model.train()
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    steps = steps_in(loader, max_steps)
    first = position(loader, epoch, "teacher")
    params = [p for p in model.parameters() if p.requires_grad]
    with Status(description, steps) as status:
        for step, (images, labels) in enumerate(loader, start=first):
            if step >= steps:
                break
            images, labels = runtime.batch(images, labels)
            with runtime.autocast():
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images).float()
                loss = loss_fn(model(images).float(), labels, teacher_logits)
            check_step(runtime, loss, description)
            optimizer.zero_grad(set_to_none=True)
            runtime.backward_step(loss, [optimizer], params)
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.item() * images.size(0)
            seen += images.size(0)
            status.advance(f"loss {total_loss / seen:.3f}")
    runtime.dist.sync_state([model])
    elapsed = time.perf_counter() - start
    images = seen * runtime.dist.world_size
    return {"loss": total_loss / max(seen, 1), "images": images, "seconds": elapsed, "images_per_s": images / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device, description: str = "evaluate") -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    with Status(description, len(loader)) as status:
        for images, labels in loader:
            logits = model(images.to(device))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            seen += labels.numel()
            status.advance(f"acc {correct / max(seen, 1):.4f}")
    model.train(was_training)
    return correct / max(seen, 1)
