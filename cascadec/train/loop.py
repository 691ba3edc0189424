"""Training and evaluation as plain functions you can read top to bottom.

Modelled on torchvision's references/classification/train.py: no callback framework, and one
``train_epoch`` that serves every phase that trains one model: the teacher stage
(stages.train_teacher) and the student phase of both the cascade and one-shot pruning
(prune/finetune.student_phase), resumable mid-epoch. The one other training step is the
cascade's joint phase (``CascadeTrainer.joint_epoch`` in prune/cascade.py): it trains the
student and every TA at once, through shared weights and learned masks, with one summed loss
and two optimisers (weights, mask scores), so it keeps its own step, and uses ``evaluate``, ``make_optimizer``,
``cosine_schedule`` and ``steps_in`` from here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.data.sampler import position
from cascadec.progress import Status
from cascadec.train.runtime import Runtime, check_step


def make_optimizer(
    params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )


def steps_in(loader: DataLoader, max_steps: int | None) -> int:
    return min(len(loader), max_steps) if max_steps else len(loader)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    *,
    device: torch.device,
    teacher: nn.Module | None = None,
    description: str = "train",
    max_steps: int | None = None,
    epoch: int = 0,
    runtime: Runtime | None = None,
    phase: str = "teacher",
    start_step: int = 0,
    partial: dict | None = None,
    save: Callable[[int, int, dict], None] | None = None,
    loss_per: str = "image",
    where: str | None = None,
    beside: Sequence[nn.Module] = (),
) -> dict[str, float]:
    """One epoch of ``model`` (``teacher``, if any, runs under no_grad for ``loss_fn(logits,
    labels, teacher_logits_or_None)``). A ``runtime`` (cascadec.train.runtime) adds mixed
    precision and gradient averaging across ranks.

    A loader whose batches carry a third element (``cascadec.distill.logit_cache.with_logits``)
    brings the teacher's logits with it, and ``teacher`` is not run.

    ``phase`` names the sampler's order (cascadec.data.sampler.PHASES). A resumed epoch starts
    at ``start_step`` with ``partial`` (``loss_sum``, ``steps``, ``images``, ``seconds``) carrying
    the sums of the steps already done. ``save(epoch, next_step, partial)`` writes a mid-epoch
    checkpoint when ``runtime.due`` says so and when a stop (Ctrl-C) was requested; after a stop
    the epoch raises KeyboardInterrupt, saved or not.

    ``beside``: modules trained with ``model`` but outside it (``optimizer`` holds their
    parameters; the student phase's hint adapters): their gradients are averaged across ranks
    and their state synchronised at epoch end, as the model's.

    ``loss_per`` is what the returned ``loss`` averages over: ``"image"`` (each batch weighted
    by its images) or ``"step"`` (each batch counts once, the student phase's records);
    ``partial["loss_sum"]`` is in that unit. ``where`` names the phase in a NaN/inf error
    (default ``description``). Returns ``loss``, ``images`` (all ranks, ``partial`` included),
    ``seconds`` (training only, ``partial`` included), ``images_per_s`` and ``steps``."""
    if loss_per not in ("image", "step"):
        raise ValueError(f"loss_per {loss_per!r}: expected 'image' or 'step'")
    runtime = runtime or Runtime(device)
    where = where or description
    model.train()
    steps = steps_in(loader, max_steps)
    first = position(loader, epoch, phase, start_step)
    partial = partial or {}
    loss_sum, seen, images_seen = partial.get("loss_sum", 0.0), partial.get("steps", 0), partial.get("images", 0)
    prior_seconds, start = partial.get("seconds", 0.0), time.perf_counter()
    world = runtime.dist.world_size

    def average() -> float:  # per image: over this rank's images, as the loss is this rank's
        return loss_sum / max(seen if loss_per == "step" else images_seen // world, 1)

    params = [p for m in (model, *beside) for p in m.parameters() if p.requires_grad]
    with runtime.overlapped_sync(params), Status(description, steps) as status:
        for step, (images, labels, *cached) in enumerate(loader, start=first):
            if step >= steps:
                break
            images, labels = runtime.batch(images, labels)
            with runtime.autocast():
                teacher_logits = None
                if cached:  # the teacher's logits, computed once (cascadec.distill.logit_cache)
                    teacher_logits = cached[0].to(runtime.device, non_blocking=True).float()
                elif teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images).float()
                loss = loss_fn(model(images).float(), labels, teacher_logits)
            stop = check_step(runtime, loss, where)
            optimizer.zero_grad(set_to_none=True)
            runtime.backward_step(loss, [optimizer], params)
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.item() * (images.size(0) if loss_per == "image" else 1)
            seen += 1
            images_seen += images.size(0) * world
            status.advance(f"loss {average():.3f}")
            if save is not None and (stop or runtime.due(step + 1, steps)):
                save(
                    epoch,
                    step + 1,
                    {
                        "loss_sum": loss_sum,
                        "steps": seen,
                        "images": images_seen,
                        "seconds": prior_seconds + time.perf_counter() - start,
                    },
                )
            if stop:
                raise KeyboardInterrupt
    runtime.dist.sync_state([model, *beside])
    elapsed = prior_seconds + time.perf_counter() - start
    return {
        "loss": average(),
        "images": images_seen,
        "seconds": elapsed,
        "images_per_s": images_seen / max(elapsed, 1e-9),
        "steps": seen,
    }


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
