"""What a network looks like to the pruner: its coupled channel groups, the cost of every
mask, and the budget the recipe's target sets. Built once per run and passed on."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from cascadec import progress
from cascadec.errors import UserError
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import STEM_REASON, GroupIndex, build_groups
from cascadec.prune.latency import attach_latency_model
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.prune.trial import prove_groups
from cascadec.recipe import Recipe


@dataclass
class Analysis:
    """What a network looks like to the pruner: groups, costs and the resolved budget."""

    index: GroupIndex
    cost: CostModel
    solver: MaskSolver
    budget: Budget
    example: torch.Tensor | None = None  # the input the analysis traced (sizes hint adapters)


def analyse(model: nn.Module, recipe: Recipe, example_input: torch.Tensor) -> Analysis:
    """Build the analysis once per run (``compress`` does it before the run directory exists,
    so an infeasible target is refused early) and pass it on: group discovery and the exactness
    trial take seconds, and ``prune.analysis_timeout_s`` bounds them together. Groups and costs
    are keyed by module names, so the analysis of one instance serves every instance of the same
    architecture."""
    limit = recipe.prune.analysis_timeout_s
    start = time.monotonic()
    index = build_groups(model, example_input, timeout_s=limit, prune_stem=recipe.prune.prune_stem)
    index = prove_groups(model, index, example_input, timeout_s=max(1.0, limit - (time.monotonic() - start)))
    if not index.groups:
        reasons = "; ".join(sorted({f.reason for f in index.frozen})[:3]) or "no conv/linear layers"
        raise UserError(f"{type(model).__name__}: no prunable channel groups ({reasons})")
    cost = CostModel.build(model, index, example_input)
    p = recipe.prune
    latency = None
    if p.target.is_latency:
        latency = attach_latency_model(
            model,
            example_input,
            cost,
            backend=p.latency.backend,
            batch=p.latency.batch,
            grid_points=p.latency.grid_points,
            multiple=p.latency.fixed_multiple,
            ranking=p.latency.ranking,
            precision=p.latency.precision,
            threads=recipe.profile.threads,
            progress=progress.enabled(),
        )
    # a latency target keeps widths at the multiples the backend's kernels block by (prune.latency)
    # and, below them, the half block the table timed on its own (LatencyTable.narrow); a
    # recipe's own round_to is kept to exactly
    round_to, narrow = p.round_to, 0
    if latency is not None and not p.round_to:
        round_to, narrow = latency.table.multiple, latency.table.narrow
    solver = MaskSolver(
        index, cost, min_channels=p.min_channels, round_to=round_to, narrow=narrow, allocation=p.allocation
    )
    budget = Budget.from_section(cost, p.target)
    return Analysis(index, cost, solver, budget, example_input.detach()[:1].clone())


def check_feasible(model: nn.Module, recipe: Recipe, analysis: Analysis) -> None:
    """Refuse a target the narrowest allowed network cannot meet (MaskSolver.check_feasible).
    When the first conv's outputs are frozen by policy alone, the same target is tried with them
    prunable, and where that meets it the one line says so (a small network of one's own whose
    widest group is tied to the stem is otherwise refused with no way out named). Not for a
    latency target: trying it would time a second latency table."""
    try:
        analysis.solver.check_feasible(analysis.budget)
    except UserError as refused:
        policy = any(f.reason.startswith(STEM_REASON) for f in analysis.index.frozen)
        if recipe.prune.prune_stem or not policy or recipe.prune.target.is_latency:
            raise
        lifted = recipe.model_copy(update={"prune": recipe.prune.model_copy(update={"prune_stem": True})})
        try:
            other = analyse(model, lifted, analysis.example)
            other.solver.check_feasible(other.budget)
        except UserError:
            raise refused from None
        raise UserError(
            f"{refused}; the first conv's outputs are kept by policy, and with them prunable the target is "
            "met: --set prune.prune_stem=true"
        ) from None
