"""Compensation-aware pruning (CaP) and compensation as a starting point for fine-tuning.

CaP needs no training: calibration images give every consumer's input statistics
(prune/compensate.py), units are ranked by the output error that remains *after* compensating
their removal, the global mask solver picks them, and the consumers are refitted. The
ranking is re-done in ``prune.compensation.steps`` steps of equal budget, each conditioned
on what the steps before removed (the step constraint: a unit's cost depends on which of its
correlated neighbours are already gone), and the solver's binary search meets each step's
budget. docs/method.md, "CaP", maps the equations to this code.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.progress import log
from cascadec.prune.compensate import (
    Consumer,
    InputStatistics,
    compensate,
    find_consumers,
    gather_statistics,
    removed_dims,
    ridge_inverse,
)
from cascadec.prune.latency_refine import Refined
from cascadec.recipe import Recipe
from cascadec.train.bn import sample_loader

_REMOVED = -1e30  # a unit an earlier step removed stays removed


def calibration_loader(dataset, recipe: Recipe) -> DataLoader:
    """The fixed, seeded calibration images (``prune.compensation.images``) from the training set."""
    return sample_loader(
        dataset, recipe.prune.compensation.images, recipe.data.batch_size, seed=recipe.train.seed + 7919
    )


def consumer_errors(
    layer: nn.Module, consumer: Consumer, stats: InputStatistics, keep: torch.Tensor, ridge: float, scores: torch.Tensor
) -> None:
    """Add to ``scores`` each kept unit's removal error at this consumer, after compensation,
    relative to the consumer's output variance (so layers of different scale compare).

    With P = (C_SS + lambda I)^-1 over the kept dims S and W' the compensated weights on S,
    removing block b adds W'_b (P_bb)^-1 W'_b^T to the output error covariance (OBS)."""
    weight = layer.weight.detach()
    w = weight.reshape(weight.shape[0], -1).to("cpu", torch.float64)
    cov = stats.covariance
    variance = torch.einsum("od,de,oe->o", w, cov, w).clamp_min(1e-12)  # each output's variance
    gone = torch.zeros(w.shape[1], dtype=torch.bool)
    gone[removed_dims(consumer, keep)] = True
    kept = torch.nonzero(~gone).flatten()
    if len(kept) == 0:
        return
    position = torch.full((w.shape[1],), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    inverse = ridge_inverse(cov[kept][:, kept], ridge)  # P
    compensated = (w @ cov[:, kept]) @ inverse  # W' on S (P is symmetric)
    flat = keep.detach().cpu()
    by_size: dict[int, list[tuple[int, list[int]]]] = {}
    for unit, dims in consumer.unit_dims.items():
        if flat[unit] >= 0.5:
            by_size.setdefault(len(dims), []).append((unit, position[dims].tolist()))
    for entries in by_size.values():  # batched over units whose blocks have the same size
        units = torch.tensor([u for u, _ in entries])
        blocks = torch.tensor([b for _, b in entries])  # [units, block]
        p_bb = inverse[blocks.unsqueeze(2), blocks.unsqueeze(1)]  # [units, block, block]
        w_b = compensated[:, blocks].permute(1, 0, 2)  # [units, out, block]
        error = torch.einsum("uob,ubc,uoc->uo", w_b, torch.linalg.inv(p_bb), w_b)  # w_b (P_bb)^-1 w_b^T
        scores.index_add_(0, units, (error / variance).mean(1).float())


def cap_scores(
    model: nn.Module, consumers: list[Consumer], stats: dict[str, InputStatistics], keep: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Compensated removal error of every unit given the current ``keep`` (removed units: -1e30)."""
    scores = torch.zeros(len(keep))
    reached = torch.zeros(len(keep), dtype=torch.bool)
    for c in consumers:
        consumer_errors(model.get_submodule(c.name), c, stats[c.name], keep, ridge, scores)
        reached[list(c.unit_dims)] = True
    if (~reached).any():
        # no compensable layer reads these units (only grouped convs or unknown ops): keep them
        # unless the target cannot be met otherwise
        scores[~reached] = scores[reached].max() if reached.any() else 1.0
    scores[keep < 0.5] = _REMOVED
    return scores


def marginal_costs(analysis, keep: torch.Tensor) -> torch.Tensor:
    """What removing one more unit of each group saves in the budget's metric, per unit (costs are
    bilinear in the widths, so every unit of a group saves the same; a fully removed group: 1)."""
    metric, cost = analysis.budget.metric, analysis.cost
    base = cost.metric(metric, keep)
    out = torch.ones(len(keep))
    for group, offset in zip(analysis.index.groups, analysis.index.offsets()):
        kept = torch.nonzero(keep[offset : offset + group.size] > 0.5).flatten()
        if len(kept):
            trial = keep.clone()
            trial[offset + int(kept[0])] = 0.0
            out[offset : offset + group.size] = base - cost.metric(metric, trial)
    return out.clamp_min(1e-12)


def select_cap(
    model: nn.Module,
    analysis,
    consumers: list[Consumer],
    stats: dict[str, InputStatistics],
    *,
    steps: int,
    ridge: float,
    per_cost: bool = True,
    refine: Callable[[torch.Tensor, float], Refined | None] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """The mask, in ``steps`` equal steps of the budget, re-scored after each. ``per_cost`` off
    ranks by error alone (the paper; kept for bench/cap_ablation.py). ``refine``: the last
    step's solve held to the backend's measurement (a latency target; ``methods.refine_for_latency``,
    whose caller keeps the measured tries)."""
    keep, record, _ = _select(
        model, analysis, consumers, stats, steps=steps, ridge=ridge, per_cost=per_cost, refine=refine
    )
    return keep, record


def _select(
    model,
    analysis,
    consumers,
    stats,
    *,
    steps: int,
    ridge: float,
    per_cost: bool = True,
    refine: Callable[[torch.Tensor, float], Refined | None] | None = None,
):
    """``select_cap``'s loop; also returns a ranking of every unit consistent with it: units
    removed at a later step rank above earlier ones, survivors above all, and within a step
    by the score that step gave them."""
    budget, cost, solver = analysis.budget, analysis.cost, analysis.solver
    keep = torch.ones(analysis.index.num_units)
    ranking = torch.zeros(analysis.index.num_units)
    record = []
    for step in range(1, steps + 1):
        fraction = 1.0 - (1.0 - budget.keep_fraction) * step / steps
        scores = cap_scores(model, consumers, stats, keep, ridge)
        if per_cost and budget.metric != "latency":  # (the solver divides a latency target's scores by unit ms itself)
            # error per unit of cost saved: a knapsack ranking, so a cheap-to-keep unit is not cut
            # for the same error as an expensive one
            scores = torch.where(keep > 0.5, scores / marginal_costs(analysis, keep), scores)
        alive = keep > 0.5
        order = torch.zeros_like(ranking)
        order[alive] = torch.argsort(torch.argsort(scores[alive])).float() / max(1, int(alive.sum()))
        # a re-solve's budget stays within the previous step's: past it, it would bring back
        # units an earlier step removed (scored _REMOVED, the worst first under a latency weight)
        previous = 1.0 - (1.0 - budget.keep_fraction) * (step - 1) / steps
        refined = refine(scores, previous) if refine is not None and step == steps else None
        keep = (
            refined.keep
            if refined is not None
            else solver.solve(scores, budget.scaled(fraction, cost) if step < steps else budget)
        )
        gone = alive & (keep < 0.5)
        ranking[gone] = step + order[gone]  # removed now: above everything removed before
        if step == steps:
            ranking[keep > 0.5] = steps + 1 + order[keep > 0.5]
        record.append({"step": step, "keep_fraction": fraction, "units_kept": int(keep.sum())})
        if refined is not None:
            record[-1].update(keep_fraction=refined.budget.keep_fraction)
    return keep, record, ranking


def cap_importance(teacher, analysis, recipe: Recipe, loader, device: torch.device) -> torch.Tensor:
    """``prune.importance: cap``: CaP's selection as a ranking of every unit (higher: keep longer),
    the starting scores of the cascade or one-shot pruning. Solving the recipe's budget on it
    gives CaP's own mask."""
    c = recipe.prune.compensation
    calibration = calibration_loader(loader.dataset, recipe)
    consumers = find_consumers(teacher, analysis.index)
    stats = gather_statistics(teacher, consumers, calibration, device, seed=recipe.train.seed)
    _, _, ranking = _select(teacher, analysis, consumers, stats, steps=c.steps, ridge=c.ridge)
    return ranking + 1.0  # positive: the cascade divides scores by their mean


def compensated_student(
    student: nn.Module,
    reference: nn.Module,
    consumers: list[Consumer],
    keep: torch.Tensor,
    calibration: DataLoader,
    recipe: Recipe,
    device: torch.device,
    example: torch.Tensor,
    stats: dict[str, InputStatistics] | None = None,
) -> dict:
    """Refit ``student``'s consumers of the removed units on ``reference``'s input statistics
    (``example``: the analysis's traced input, to find the BatchNorm after each consumer)."""
    start = time.perf_counter()
    if stats is None:
        stats = gather_statistics(reference, consumers, calibration, device, seed=recipe.train.seed)
    report = compensate(student, consumers, stats, keep, example.to(device), ridge=recipe.prune.compensation.ridge)
    report["seconds"] = time.perf_counter() - start
    log(f"compensation: {len(report['layers'])} layers refitted in {report['seconds']:.1f} s")
    return report


def compensate_start(student, reference, analysis, keep, loader, recipe, device) -> dict:
    """``prune.compensate``: refit the masked student before its fine-tuning starts."""
    calibration = calibration_loader(loader.dataset, recipe)
    consumers = find_consumers(student, analysis.index)
    return compensated_student(
        student, reference, consumers, keep.to("cpu"), calibration, recipe, device, analysis.example
    )


def prune_cap(
    teacher,
    analysis,
    recipe: Recipe,
    loader,
    device,
    refine: Callable[[torch.Tensor, float], Refined | None] | None = None,
) -> tuple[nn.Module, torch.Tensor, dict]:
    """CaP's mask and its compensated (still full-width, masked) student; no training.
    ``refine``: see ``select_cap``."""
    start = time.perf_counter()
    c = recipe.prune.compensation
    calibration = calibration_loader(loader.dataset, recipe)
    consumers = find_consumers(teacher, analysis.index)
    stats = gather_statistics(teacher, consumers, calibration, device, seed=recipe.train.seed)
    gathered = time.perf_counter() - start
    keep, steps = select_cap(teacher, analysis, consumers, stats, steps=c.steps, ridge=c.ridge, refine=refine)
    selected = time.perf_counter() - start
    student = copy.deepcopy(teacher)
    report = compensated_student(
        student, teacher, consumers, keep, calibration, recipe, device, analysis.example, stats=stats
    )
    report.update(
        {
            "calibration_images": len(calibration.dataset),
            "statistics_seconds": gathered,
            "selection_seconds": selected - gathered,
            "steps": steps,
            "seconds": time.perf_counter() - start,
        }
    )
    log(
        f"CaP: {len(consumers)} consumer layers, {len(calibration.dataset)} calibration images, "
        f"statistics {gathered:.1f} s, selection {selected - gathered:.1f} s in {c.steps} step(s)"
    )
    return student, keep.to(device), report
