"""Torch-Pruning itself as a peer in the benchmarks (issue 32 item 4), through cascadec's plugin API.

What a Torch-Pruning user runs: ``tp.pruner.MetaPruner`` with ``GroupTaylorImportance``
(gradients of the cross-entropy on the same number of training batches cascadec's Taylor ranking
uses), the classifier ignored, ``round_to`` as the recipe, one pruning step, local (the same
ratio in every layer, Torch-Pruning's default) or global (one threshold across layers). The
pruning ratio is bisected until the pruned network's MACs (counted by cascadec's counter, the
one every other row uses) are within the recipe's FLOPs budget. The physically pruned network
is then fine-tuned by cascadec's student phase with the recipe's KD loss, data, optimiser and
epochs (joint + student, like every one-shot method), so the only difference from the other
rows is which channels Torch-Pruning removed.

Registered as the plugin methods ``tp_taylor_local`` and ``tp_taylor_global`` on import
(``cascadec.prune.method.register_method``): ``bench/quality.py`` imports this module, so
its recipes may name them, in its own process and in its spawned workers alike.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from cascadec.prune.analysis import Analysis
from cascadec.prune.cost import count_macs
from cascadec.prune.groups import build_groups
from cascadec.prune.method import PruneContext, PruneMethod, PruneOutcome, register_method
from cascadec.prune.methods import fine_tuned

BISECTION_STEPS = 16
# MACs may exceed the budget by this much, the tolerance cascadec's own targets allow (a local
# ratio moves every layer's width at once, so its MACs step coarsely)
TOLERANCE = 0.02


def _taylor_gradients(model: torch.nn.Module, loader, device, batches: int) -> int:
    """Accumulate the cross-entropy's gradients on ``batches`` training batches (eval mode:
    the teacher's BatchNorm statistics, as cascadec's Taylor ranking does)."""
    model.eval().requires_grad_(True).zero_grad(set_to_none=True)  # the teacher arrives frozen
    seen = 0
    for images, labels in loader:
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        loss.backward()
        seen += 1
        if seen >= batches:
            break
    return seen


def _classifier(model: torch.nn.Module) -> list[torch.nn.Module]:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return last[-1:]


def tp_prune(
    template: torch.nn.Module, example: torch.Tensor, ratio: float, *, global_pruning: bool, round_to: int | None
) -> torch.nn.Module:
    """One MetaPruner step on a copy of ``template``, its gradients copied over (``deepcopy``
    leaves ``.grad`` behind)."""
    import torch_pruning as tp

    model = copy.deepcopy(template)
    for source, copied in zip(template.parameters(), model.parameters(), strict=True):
        copied.grad = None if source.grad is None else source.grad.detach().clone()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=_classifier(model),
        round_to=round_to,
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_to_budget(
    teacher: torch.nn.Module,
    loader,
    example: torch.Tensor,
    ceiling: float,
    *,
    device,
    batches: int,
    global_pruning: bool,
    round_to: int | None,
) -> tuple[torch.nn.Module, dict]:
    """Bisect the pruning ratio: the least pruning whose MACs are within ``ceiling`` (+ TOLERANCE)."""
    template = copy.deepcopy(teacher).to(device)
    used = _taylor_gradients(template, loader, device, batches)
    example = example.to(device)
    lo, hi = 0.0, 0.99
    best: tuple[float, torch.nn.Module, float] | None = None
    tries = []
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        try:
            model = tp_prune(template, example, mid, global_pruning=global_pruning, round_to=round_to)
            macs = float(count_macs(copy.deepcopy(model).cpu(), example.cpu()))
        except Exception as exc:  # e.g. global pruning emptying a layer: prune less
            tries.append({"ratio": mid, "error": f"{type(exc).__name__}: {exc}"})
            hi = mid
            continue
        tries.append({"ratio": mid, "macs": macs})
        if macs <= ceiling * (1 + TOLERANCE):
            best, hi = (mid, model, macs), mid
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning reached no network under {ceiling:.0f} MACs (tries: {tries[-3:]})")
    ratio, model, macs = best
    return model, {"ratio": ratio, "macs": macs, "ceiling": ceiling, "taylor_batches": used, "tries": len(tries)}


class _TorchPruningTaylor(PruneMethod):
    global_pruning = False

    def run(self, ctx: PruneContext) -> PruneOutcome:
        start = time.perf_counter()
        recipe, analysis = ctx.recipe, ctx.analysis
        example = analysis.example
        round_to = recipe.prune.round_to if recipe.prune.round_to and recipe.prune.round_to > 1 else None
        student, record = prune_to_budget(
            ctx.teacher,
            ctx.loader,
            example,
            count_macs(copy.deepcopy(ctx.teacher).cpu(), example.cpu()) * analysis.budget.keep_fraction,
            device=ctx.device,
            batches=recipe.prune.importance_batches,
            global_pruning=self.global_pruning,
            round_to=round_to,
        )
        record["seconds"] = time.perf_counter() - start
        # the pruned network is the student as it is: every unit of its own groups kept, so the
        # student phase (and the benchmark's shrink) changes no width
        index = build_groups(student, example.to(ctx.device))
        own = Analysis(index=index, cost=analysis.cost, solver=analysis.solver, budget=analysis.budget, example=example)
        mask = torch.ones(index.num_units, device=ctx.device)
        inner = PruneContext(ctx.teacher, own, recipe, ctx.loader, ctx.select_loader, ctx.device, ctx.runtime)
        return fine_tuned(inner, student, mask, None, start, {"torch_pruning": record})


@register_method
class TorchPruningTaylorLocal(_TorchPruningTaylor):
    name = "tp_taylor_local"
    description = "Torch-Pruning MetaPruner, group Taylor, local (uniform ratio), then KD"


@register_method
class TorchPruningTaylorGlobal(_TorchPruningTaylor):
    name = "tp_taylor_global"
    description = "Torch-Pruning MetaPruner, group Taylor, global threshold, then KD"
    global_pruning = True
