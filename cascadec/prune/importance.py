"""One-shot importance criteria: one class of question ("how much does this unit matter?"),
one function per answer, as in Torch-Pruning's importance module.

Scores are per unit (group channel) and comparable across layers, because one global
threshold ranks them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cascadec.names import CRITERIA as CRITERION_NAMES
from cascadec.names import check_registry
from cascadec.prune.groups import GroupIndex
from cascadec.prune.masks import masked


def taylor_importance(
    model: nn.Module,
    index: GroupIndex,
    loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    batches: int = 8,
) -> torch.Tensor:
    """Mean over batches of |sum_{h,w} dL/dY * Y| per unit: the first-order Taylor estimate
    of the loss change when the unit is removed (Molchanov et al. 2019, on the mask after BN).
    The same quantity, signed, is what the cascade's scores learn from (Eqs. 3-4)."""
    was_training = model.training
    model.eval()  # BN uses its running statistics: importance of the network as it is
    ones = torch.ones(index.num_units, device=device, requires_grad=True)
    total = torch.zeros(index.num_units, device=device)
    count = 0
    with masked(model, index, ones):
        for step, (images, labels) in enumerate(loader):
            if step >= batches:
                break
            loss = loss_fn(model(images.to(device)), labels.to(device))
            (grad,) = torch.autograd.grad(loss, ones)
            total += grad.abs()
            count += 1
    model.train(was_training)
    return (total / max(count, 1)).detach().cpu()


def l1_importance(model: nn.Module, index: GroupIndex) -> torch.Tensor:
    """Sum of L1 norms of each unit's filters in the group's conv/linear producers, divided by
    the group's mean so that groups with big kernels do not win every global comparison."""
    scores = []
    for group in index.groups:
        s = torch.zeros(group.size)
        for member in group.members:
            if member.role != "out":
                continue
            module = model.get_submodule(member.module)
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            weight = module.weight.detach().cpu()
            norms = weight.flatten(1).abs().sum(1)
            s.index_add_(0, torch.tensor(member.root_idxs), norms[torch.tensor(member.idxs)])
        mean = s.mean()
        scores.append(s / mean if mean > 0 else s)
    return torch.cat(scores) if scores else torch.zeros(0)


@dataclass(frozen=True)
class Criterion:
    """One entry of ``prune.importance``: ``score(model, analysis, recipe, loader, device)``
    gives one score per unit; ``needs_data`` says whether it reads training batches through the
    loader's sampler (and therefore takes its own sampler position and is averaged across ranks)."""

    score: Callable[..., torch.Tensor]
    needs_data: bool


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def _cap(model, analysis, recipe, loader, device) -> torch.Tensor:
    from cascadec.prune.cap import cap_importance  # (cap.py builds on compensation, not on this module)

    return cap_importance(model, analysis, recipe, loader, device)


# prune.importance -> criterion; a new criterion is one function above and one entry here
CRITERIA: dict[str, Criterion] = {
    "taylor": Criterion(
        lambda model, analysis, recipe, loader, device: taylor_importance(
            model, analysis.index, loader, _cross_entropy, device=device, batches=recipe.prune.importance_batches
        ),
        needs_data=True,
    ),
    "l1": Criterion(
        lambda model, analysis, _recipe, _loader, _device: l1_importance(model, analysis.index), needs_data=False
    ),
    # CaP's compensation-aware selection as a ranking (prune/cap.py); it reads its own fixed
    # calibration images, not the loader's batches, so every rank computes the same one
    "cap": Criterion(_cap, needs_data=False),
}
check_registry("prune.importance criteria", CRITERIA, CRITERION_NAMES)
