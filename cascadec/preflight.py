"""Pre-flight answers that need no data and no training: ``cascadec inspect`` and
``cascadec compress --dry-run``. What can be pruned, what cannot and why, and what the
recipe's target means in FLOPs, parameters and per-layer widths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.recipe import Recipe

# Input geometry per data set, so a dry run needs neither the data nor a download.
# (channels, image size, classes); the data builders are the source of truth at run time.
INPUT_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (1, 28, 10),
    "digits": (1, 16, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "imagefolder": (3, 224, 1000),
    "synthetic": (3, 32, 10),
}


@dataclass
class InputSpec:
    in_channels: int
    image_size: int
    num_classes: int


def input_spec(recipe: Recipe) -> InputSpec:
    channels, size, classes = INPUT_DEFAULTS.get(recipe.data.name, (3, 224, 1000))
    return InputSpec(
        in_channels=recipe.model.in_channels or channels,
        image_size=recipe.data.image_size or size,
        num_classes=recipe.model.num_classes or classes,
    )


def inspect_model(model_name: str, *, in_channels: int = 3, image_size: int = 224, num_classes: int | None = None,
                  recipe: Recipe | None = None, weights: str | None = None) -> dict[str, Any]:
    """Groups, frozen groups with reasons, FLOPs/params, and (with a recipe) the target's
    meaning: per-group widths chosen by L1 importance of the given (or random) weights."""
    from cascadec.prune.cost import CostModel
    from cascadec.prune.groups import build_groups
    from cascadec.prune.importance import l1_importance
    from cascadec.prune.targets import Budget, MaskSolver

    kwargs: dict[str, Any] = {"in_channels": in_channels}
    if num_classes:
        kwargs["num_classes"] = num_classes
    torch.manual_seed(0)  # random-init widths are reproducible from one dry run to the next
    model = create_model(model_name, weights=weights, **kwargs).eval()
    example = torch.zeros(1, in_channels, image_size, image_size)
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:  # ViT/MaxViT assert their size
        raise UserError(f"{model_name} does not accept a {in_channels}x{image_size}x{image_size} input: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    index = build_groups(model, example)
    cost = CostModel.build(model, index, example)
    out: dict[str, Any] = {
        "model": model_name,
        "input_shape": [in_channels, image_size, image_size],
        "flops": cost.base_macs,
        "params": cost.base_params,
        "prunable_units": index.num_units,
        "groups": [{"root": g.root, "channels": g.size, "layers": len(g.layers)} for g in index.groups],
        "frozen": [{"root": f.root, "channels": f.size, "reason": f.reason} for f in index.frozen],
    }
    if recipe is not None and index.groups:
        p = recipe.prune
        solver = MaskSolver(index, cost, min_channels=p.min_channels, round_to=p.round_to, allocation=p.allocation)
        budget = Budget.from_target(cost, flops_reduction=p.target.flops_reduction, params_reduction=p.target.params_reduction,
                                    keep_ratio=p.target.keep_ratio)
        keep = solver.solve(l1_importance(model, index), budget)
        parts = torch.split(keep, [g.size for g in index.groups])
        for row, part in zip(out["groups"], parts):
            row["kept"] = int(part.sum())
        out["target"] = {
            "description": p.target.describe(),
            "metric": budget.metric,
            "budget_fraction": budget.keep_fraction,
            "flops": cost.macs(keep),
            "params": cost.params(keep),
            "kept_units": int(keep.sum()),
            "note": "widths from L1 importance of these weights; the recipe's method learns its own",
        }
    return out


def dry_run(model_name: str, recipe: Recipe) -> dict[str, Any]:
    spec = input_spec(recipe)
    return inspect_model(model_name, in_channels=spec.in_channels, image_size=spec.image_size, num_classes=spec.num_classes,
                         recipe=recipe, weights=None)
