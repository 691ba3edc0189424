"""How the cascade's learned scores move: the update rule of Eq. 5 and its schedule.

The scores of model i receive, through the straight-through mask, the Taylor term of model
i+1 (Eq. 5): g_n = sum_{h,w} dL_{i+1}/dY_n * Y_n, summed over the batch. Two readings:

* ``taylor`` (the paper): gamma <- gamma - alpha * g, through SGD (momentum 0.9) or RMSProp.
  Once model i+1 is near a minimum, E[g] ~ 0 for every unit (scaling a channel after BN is
  the same as scaling BN's affine parameters, whose gradient vanishes at convergence), so the
  update is a random walk: in the old benchmark 115-126 of 208 units flipped in 92 steps.
* ``taylor_magnitude``: gamma <- (1 - alpha) * gamma + alpha * |g|, a running average of the
  first-order Taylor importance (Molchanov et al. 2019), which is what the one-shot ranking and
  the paper's own initialisation use. |g| measures how much the loss reacts to the unit, and
  stays informative at convergence; the average makes it an estimate, not a single batch.

Both anneal: the score step follows the weights' cosine schedule down to zero at the step where
the masks freeze (``cascade.freeze_fraction`` of the joint phase is left with fixed masks), so
the weights spend the end of the joint phase on the masks that will be extracted.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

SIGNALS = ("taylor", "taylor_magnitude")


class TaylorMagnitude(Optimizer):
    """gamma <- (1 - lr) * gamma + lr * |grad|: a running average of the Taylor magnitude.

    An ``Optimizer`` so that LR schedulers, the fp16 GradScaler (which unscales ``grad`` before
    ``step``), gradient averaging across ranks and checkpoints treat it like any other."""

    def __init__(self, params, lr: float) -> None:
        if not 0.0 < lr <= 1.0:
            raise ValueError(f"taylor_magnitude: the running-average weight must be in (0, 1], got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the class docstring says what a step does
        for group in self.param_groups:
            rate = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1.0 - rate).add_(p.grad.abs(), alpha=rate)
        return None


def make_score_optimizer(
    params: list[torch.nn.Parameter], *, signal: str, optimizer: str, lr: float
) -> Optimizer | None:
    if not params:
        return None
    if signal == "taylor_magnitude":
        return TaylorMagnitude(params, lr=min(lr, 1.0))
    if optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def freeze_step(total_steps: int, freeze_fraction: float) -> int:
    """The joint step from which masks stay fixed (== total_steps: they never freeze)."""
    return max(0, min(total_steps, round(total_steps * (1.0 - freeze_fraction))))


def score_schedule(optimizer: Optimizer, moving_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from the recipe's score_lr to 0 at ``moving_steps``, 0 after it."""
    total = max(1, moving_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if step < total else 0.0
    )
