"""Pre-flight answers that need no data and no training: ``cascadec inspect`` and
``cascadec compress --dry-run``. What can be pruned, what cannot and why, and what the
recipe's target means in FLOPs, parameters and per-layer widths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cascadec import memory, progress
from cascadec.data.registry import input_geometry
from cascadec.errors import UserError, first_line
from cascadec.models import create_model
from cascadec.prune.analysis import analyse
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance
from cascadec.prune.latency import attach_latency_model, time_per_flop
from cascadec.prune.method import get_method
from cascadec.prune.trial import prove_groups
from cascadec.recipe import LatencySection, Recipe


@dataclass
class InputSpec:
    in_channels: int
    image_size: int
    num_classes: int | None


def input_spec(recipe: Recipe) -> InputSpec:
    """The input a recipe's model will see, from what the data builders know (no data read)."""
    channels, size, classes = input_geometry(recipe.data.name, recipe.data.options)
    return InputSpec(
        in_channels=recipe.model.in_channels or channels,
        image_size=recipe.data.image_size or size,
        num_classes=recipe.model.num_classes or classes,
    )


def check_input_memory(recipe: Recipe) -> int:
    """Refuse an image size one image of which does not fit in memory, from what the data builders
    know, before any data is read or built (a data set may build its images eagerly). Returns the
    estimate (bytes per image), which the training-batch check reuses."""
    spec = input_spec(recipe)
    kwargs: dict[str, Any] = {"in_channels": spec.in_channels, "options": recipe.model.options}
    if spec.num_classes:
        kwargs["num_classes"] = spec.num_classes
    model = create_model(recipe.model.name, **kwargs).eval()  # random weights: only shapes matter here
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    per_image = memory.activation_bytes(model, shape)
    memory.require(per_image, f"a {'x'.join(map(str, shape))} input to {recipe.model.name}", "lower data.image_size")
    return per_image


def inspect_model(
    model_name: str,
    *,
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int | None = None,
    recipe: Recipe | None = None,
    weights: str | None = None,
    latency_backend: str | None = None,
) -> dict[str, Any]:
    """Groups, frozen groups with reasons, FLOPs/params, and (with a recipe) the target's
    meaning: per-group widths chosen by L1 importance of the given (or random) weights.
    ``latency_backend`` (or a recipe with a latency target) adds the latency table's summary."""
    kwargs: dict[str, Any] = {"in_channels": in_channels}
    if num_classes:
        kwargs["num_classes"] = num_classes
    if recipe is not None and recipe.model.options:
        kwargs["options"] = recipe.model.options
    torch.manual_seed(0)  # random-init widths are reproducible from one dry run to the next
    model = create_model(model_name, weights=weights, **kwargs).eval()
    shape = (in_channels, image_size, image_size)
    memory.require(
        memory.activation_bytes(model, shape),
        f"a {in_channels}x{image_size}x{image_size} input to {model_name}",
        "use a smaller image size",
    )
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:  # ViT/MaxViT assert their size
        raise UserError(
            f"{model_name} does not accept a {in_channels}x{image_size}x{image_size} input: {first_line(exc)}"
        ) from None
    analysis = analyse(model, recipe, example) if recipe is not None else None
    index = analysis.index if analysis else prove_groups(model, build_groups(model, example), example)
    cost = analysis.cost if analysis else CostModel.build(model, index, example)
    if latency_backend is not None and cost.latency is None:
        lat = recipe.prune.latency if recipe is not None else LatencySection()
        attach_latency_model(
            model,
            example,
            cost,
            backend=latency_backend,
            batch=lat.batch,
            grid_points=lat.grid_points,
            multiple=lat.fixed_multiple,
            ranking=lat.ranking,
            precision=lat.precision,
            threads=recipe.profile.threads if recipe is not None else None,
            progress=progress.enabled(),
        )
    out: dict[str, Any] = {
        "model": model_name,
        "input_shape": [in_channels, image_size, image_size],
        "flops": cost.base_macs,
        "params": cost.base_params,
        "prunable_units": index.num_units,
        "groups": [{"root": g.root, "channels": g.size, "layers": len(g.layers)} for g in index.groups],
        "frozen": [{"root": f.root, "channels": f.size, "reason": f.reason} for f in index.frozen],
    }
    if cost.latency is not None:
        out["latency"] = {
            **cost.latency.table.summary(),
            "predicted_ms": cost.latency.base_ms,
            "time_per_flop": time_per_flop(cost.latency),
        }
    # what the method says before a run, in place of the target's widths (FBS: its gates, no static target)
    preview = get_method(recipe.prune.method).preview(model, example, recipe) if recipe is not None else None
    if preview is not None:
        out[recipe.prune.method] = preview
    elif analysis is not None:
        budget = analysis.budget
        keep = analysis.solver.solve(l1_importance(model, index), budget)
        parts = torch.split(keep, [g.size for g in index.groups])
        for row, part in zip(out["groups"], parts):
            row["kept"] = int(part.sum())
        out["target"] = {
            "description": recipe.prune.target.describe(),
            "metric": budget.metric,
            "budget_fraction": budget.keep_fraction,
            "flops": cost.macs(keep),
            "params": cost.params(keep),
            "kept_units": int(keep.sum()),
            **({"latency_ms": cost.latency.predict(keep)} if cost.latency is not None else {}),
            "note": "widths from L1 importance of these weights; the recipe's method learns its own",
        }
    return out


def dry_run(model_name: str, recipe: Recipe) -> dict[str, Any]:
    spec = input_spec(recipe)
    return inspect_model(
        model_name,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        recipe=recipe,
        weights=None,
    )
