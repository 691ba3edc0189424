"""BatchNorm recalibration: running statistics that match the weights and masks a model ends with.

During the cascade's joint phase every model's mask moves, and the shared weights move under
all of them, so each model's running mean/variance is an exponential average over networks
that no longer exist, and a one-shot mask leaves the teacher's statistics on a network that
no longer exists either. (The middle-TA collapse of the old benchmark had another cause, the
signed Eq. 5 step: prune/scores.py.) Recalibrating means
re-estimating the statistics with the final weights and masks on a few training batches, with
a cumulative (not exponential) average: BatchNorm's ``momentum=None`` mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, *, device: torch.device, limit: int) -> int:
    """Replace ``model``'s BatchNorm running statistics by their average over ``limit`` batches;
    weights, biases and every other buffer are left as they are. Returns the batches used."""
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms or limit <= 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    tracked = [m.num_batches_tracked.clone() for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    try:
        for images, _ in batches:
            if used >= limit:
                break
            model(images.to(device))
            used += 1
    finally:
        for m, momentum, count in zip(norms, momenta, tracked):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)  # the counter is bookkeeping, not a statistic
        model.train(was_training)
    return used


def recalibration_loader(dataset, batch_size: int, *, batches: int, seed: int) -> DataLoader:
    """A fixed, seeded sample of ``batches`` training batches: the same images on every call and
    after a resume, and independent of where the training loader is in its epoch."""
    return sample_loader(dataset, batches * batch_size, batch_size, seed=seed + 104_729)


def sample_loader(dataset, images: int, batch_size: int, *, seed: int) -> DataLoader:
    """``images`` training images drawn once with ``seed``: the same ones on every call."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, images)]
    # random order, not sorted: ImageFolder-style sets are stored class by class, and single-class
    # batches would understate the variance
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False)
