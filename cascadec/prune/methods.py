"""The one-shot methods (``prune.method: oneshot`` and ``cap``), the pieces every method shares
(importance, distillation specs, latency refinement, the fine-tuning tail) and
:func:`prune_model`, the prune stage's entry point.

* ``oneshot``: rank units once (Taylor or L1 on the pretrained network), cut to the target,
  fine-tune for joint_epochs + student_epochs, with KD from the teacher when ``distill.kd``.
  Baselines (a) and (b) of the benchmark.
* ``cap``: CaP's compensation-aware selection and refit (cap.py), fine-tuned the same way.
* ``cascade`` (cascade_method.py) and ``fbs`` (fbs_method.py) live in their own modules.

They spend the same epochs, data and optimiser, so the benchmark compares like with like. Each
is a :class:`~cascadec.prune.method.PruneMethod` registered by name.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from cascadec.data.sampler import position
from cascadec.distill.hints import HintSpec, hint_spec
from cascadec.distill.hsakd import HsakdSpec, HsakdWeights, store_heads, teacher_heads
from cascadec.distill.losses import DistillLoss
from cascadec.formatting import fmt_float
from cascadec.progress import log
from cascadec.prune.analysis import Analysis, analyse
from cascadec.prune.cap import calibration_loader, compensate_start, prune_cap
from cascadec.prune.finetune import PhaseSettings, student_phase
from cascadec.prune.importance import CRITERIA
from cascadec.prune.latency_refine import Refined, SpeedupMeter, refine_latency_mask
from cascadec.prune.method import PruneContext, PruneMethod, PruneOutcome, get_method, register_method
from cascadec.recipe import Recipe
from cascadec.train.bn import recalibration_loader
from cascadec.train.runtime import Runtime


def distill_loss(recipe: Recipe) -> DistillLoss:
    d = recipe.distill
    return DistillLoss(ce_weight=d.ce_weight, kd_weight=d.kd_weight if d.kd else 0.0, temperature=d.temperature)


def initial_importance(model, analysis, recipe, loader, device, runtime: Runtime | None = None) -> torch.Tensor:
    """Unit importance on the pretrained network; in a distributed run each rank scores its own
    slices of the batches and the ranks average, so every rank starts from the same scores."""
    criterion = CRITERIA[recipe.prune.importance]
    if not criterion.needs_data:
        return criterion.score(model, analysis, recipe, loader, device)
    position(loader, 0, "importance")
    importance = criterion.score(model, analysis, recipe, loader, device)
    if runtime is not None and runtime.dist.active:
        importance = runtime.dist.all_reduce_mean(importance.to(runtime.device)).cpu()
    return importance


def _recalibration(recipe: Recipe, loader) -> tuple[object, int]:
    """The fixed training batches BatchNorm statistics are re-estimated on (CaP: its
    calibration images, so a retrain-free run sees no other training data)."""
    batches = recipe.train.bn_recalibration_batches
    if batches <= 0:
        return None, 0
    if recipe.prune.method == "cap":
        calibration = calibration_loader(loader.dataset, recipe)
        return calibration, len(calibration)
    return recalibration_loader(
        loader.dataset, recipe.data.batch_size, batches=batches, seed=recipe.train.seed
    ), batches


def hint_spec_for(recipe: Recipe, model, analysis: Analysis) -> HintSpec | None:
    """``distill.hints`` resolved on this network (its stages or last blocks)."""
    d = recipe.distill
    return hint_spec(d.hints, d.hint_weight, model, analysis.example)


def hsakd_spec_for(
    recipe: Recipe, teacher, analysis: Analysis, loader, device, runtime: Runtime | None = None
) -> HsakdSpec | None:
    """``distill.method: hsakd`` resolved on this teacher: its stages and trained auxiliary heads
    (cached beside the teacher when ``teacher.cache`` is on). In a distributed run every rank
    trains on its own slice of the data; rank 0's heads are then broadcast, so all teach alike."""
    d = recipe.distill
    if d.method != "hsakd":
        return None
    from cascadec.teacher import cache_root  # the teacher module builds on this one's neighbours

    data = {**recipe.data.model_dump(exclude={"workers", "download"}), "seed": recipe.train.seed}
    distributed = runtime.dist if runtime is not None and runtime.dist.active else None
    spec = teacher_heads(
        teacher,
        analysis.example,
        loader,
        weights=HsakdWeights(ce=d.ce_weight, kd=d.kd_weight, aux=d.aux_weight, temperature=d.temperature),
        epochs=d.aux_epochs,
        lr=d.aux_lr,
        data=data,
        device=device,
        cache=cache_root() / "hsakd" if recipe.teacher.cache else None,
        max_steps=recipe.train.max_steps_per_epoch,
        write_cache=distributed is None,
    )
    if distributed is not None:  # every rank now holds rank 0's heads; rank 0 caches them
        distributed.sync_state([spec.teacher_heads])
        if distributed.is_main:
            store_heads(spec)
    return spec


def _fine_tune(
    student,
    mask,
    analysis,
    teachers,
    recipe,
    loader,
    select_loader,
    device,
    epochs,
    promote,
    runtime: Runtime | None = None,
    resume: dict | None = None,
    teacher_accuracy: list[float] | None = None,
    hint_teacher=None,
    hsakd: HsakdSpec | None = None,
    teacher_heads: list | None = None,
    start_heads=None,
):
    recal, batches = _recalibration(recipe, loader)
    return student_phase(
        student,
        mask,
        analysis.index,
        teachers,
        loader,
        select_loader,
        distill_loss(recipe),
        PhaseSettings.from_recipe(recipe.train, epochs=epochs, promote=promote, recalibration_batches=batches),
        device=device,
        runtime=runtime,
        resume=resume,
        teacher_accuracy=teacher_accuracy,
        recalibration=recal,
        hints=hint_spec_for(recipe, student, analysis),
        hint_teacher=hint_teacher,
        hsakd=hsakd,
        teacher_heads=teacher_heads,
        start_heads=start_heads,
        example=analysis.example,
    )


def refine_for_latency(
    teacher: nn.Module,
    analysis: Analysis,
    recipe: Recipe,
    scores: torch.Tensor,
    runtime: Runtime | None = None,
    ceiling: float | None = None,
) -> Refined | None:
    """A latency target's mask held to the backend's measurement (``prune/latency_refine.py``)
    where ``prune.latency.refine`` allows it; None for other targets. Distributed: rank 0
    measures, every rank solves the budget it settled on (the scores agree across ranks).
    ``ceiling``: the largest budget fraction a re-solve may use (CaP: its previous step's)."""
    lat = recipe.prune.latency
    if analysis.budget.metric != "latency" or analysis.cost.latency is None or lat.refine < 1:
        return None
    scores = scores.detach().cpu()
    dist = runtime.dist if runtime is not None else None
    refined = None
    table = analysis.cost.latency.table
    # INT8 (prune.latency.precision): the meter times the INT8 student against the FP32 network
    scale = analysis.cost.latency.base_ms / analysis.cost.latency.reference_ms
    if dist is None or not dist.active or dist.is_main:
        model = copy.deepcopy(teacher).cpu().eval()  # latency does not depend on the weights
        meter = SpeedupMeter(
            model,
            analysis.index,
            analysis.example,
            backend=table.backend,
            batch=table.batch,
            threads=recipe.profile.threads,
            precision=table.precision,
            scale=scale,
        )
        try:
            refined = refine_latency_mask(
                analysis.solver, scores, analysis.budget, meter, rounds=lat.refine, ceiling=ceiling
            )
        finally:
            meter.close()
    if dist is not None and dist.active:
        settled = dist.broadcast_object(
            (refined.budget.keep_fraction, refined.history) if refined is not None else None
        )
        if refined is None:
            budget = analysis.budget.scaled(settled[0], analysis.cost)
            refined = Refined(analysis.solver.solve(scores, budget), budget, settled[1])
    for h in refined.history:
        h["deployed_speedup"] = h["measured_speedup"] / scale  # against the FP32 network
    shown = ", ".join(f"{h['deployed_speedup']:.2f}x" for h in refined.history)
    log(
        f"latency target {1 / (analysis.budget.keep_fraction * scale):.2f}x: measured {shown} on {table.backend}"
        + (" (INT8 student against the FP32 network)" if table.precision == "int8" else "")
        + f"; kept the budget {refined.budget.keep_fraction:.3f} of the table's latency"
    )
    return refined


@register_method
class OneShot(PruneMethod):
    """Rank units once (Taylor or L1 on the pretrained network), cut to the target, fine-tune."""

    name = "oneshot"
    description = "rank once, fine-tune"

    def run(self, ctx: PruneContext) -> PruneOutcome:
        teacher, analysis, recipe, device, runtime = ctx.teacher, ctx.analysis, ctx.recipe, ctx.device, ctx.runtime
        start = time.perf_counter()
        resume = runtime.load("student") if runtime is not None else None
        if resume is not None:
            mask = resume["mask"].to(device)  # the importance ranking is not recomputed on resume
        else:
            scores = initial_importance(teacher, analysis, recipe, ctx.loader, device, runtime)
            mask = analysis.solver.solve(scores, analysis.budget)
        student = copy.deepcopy(teacher).to(device)
        record = {}
        refined = refine_for_latency(teacher, analysis, recipe, scores, runtime) if resume is None else None
        if refined is not None:
            mask = refined.keep.to(device)
            record["latency_refine"] = refined.history
        if recipe.prune.compensate and resume is None:
            record["compensation"] = compensate_start(student, teacher, analysis, mask, ctx.loader, recipe, device)
        return fine_tuned(ctx, student, mask, resume, start, record)


@register_method
class Cap(PruneMethod):
    """CaP: compensation-aware selection and refit on calibration images, then BatchNorm
    statistics re-estimated on the same images; the recipe's epochs (0 for a retrain-free run)
    fine-tune it like a one-shot student."""

    name = "cap"
    description = "compensation-aware, no training needed"
    history_keys = ("cap",)

    def run(self, ctx: PruneContext) -> PruneOutcome:
        teacher, analysis, recipe, device, runtime = ctx.teacher, ctx.analysis, ctx.recipe, ctx.device, ctx.runtime
        start = time.perf_counter()
        resume = runtime.load("student") if runtime is not None else None
        tries: dict[str, Any] = {}  # a latency target's measured tries (prune/latency_refine.py)
        if resume is not None:
            mask, report = resume["mask"].to(device), {}
            student = copy.deepcopy(teacher).to(device)
        else:
            # a latency target: the last selection step's solve is held to the backend's measurement
            def refine(scores: torch.Tensor, ceiling: float) -> Refined | None:
                refined = refine_for_latency(teacher, analysis, recipe, scores, runtime, ceiling=ceiling)
                if refined is not None:
                    tries["latency_refine"] = refined.history  # where the report reads them
                return refined

            student, mask, report = prune_cap(teacher, analysis, recipe, ctx.loader, device, refine=refine)
        record = {"cap": report, **tries}
        return fine_tuned(ctx, student, mask, resume, start, record)

    def training_lines(self, prune: Mapping[str, Any]) -> list[str]:
        cap = prune.get("cap")
        if not (isinstance(cap, Mapping) and cap.get("layers") is not None):
            return []
        return [
            f"CaP (no training): {cap.get('calibration_images')} calibration images, "
            f"{len(cap.get('steps') or [])} selection step(s), {len(cap['layers'])} layer(s) refitted; "
            f"statistics {fmt_float(cap.get('statistics_seconds'), '.1f')} s, "
            f"selection {fmt_float(cap.get('selection_seconds'), '.1f')} s, total {fmt_float(cap.get('seconds'), '.1f')} s.",
            "",
        ]


def fine_tuned(ctx: PruneContext, student, mask, resume: dict | None, start: float, record: dict) -> PruneOutcome:
    """The one-shot tail shared by ``oneshot``, ``cap`` and ``fbs``: fine-tune the (masked)
    student for joint + student epochs with KD from the teacher (or none), and return it."""
    teacher, recipe = ctx.teacher, ctx.recipe
    teachers = [("teacher", teacher)] if recipe.distill.kd else [("none", None)]
    hsakd = hsakd_spec_for(recipe, teacher, ctx.analysis, ctx.loader, ctx.device, ctx.runtime)
    if hsakd is not None:
        record["hsakd"] = hsakd.report
    history = _fine_tune(
        student,
        mask,
        ctx.analysis,
        teachers,
        recipe,
        ctx.loader,
        ctx.select_loader,
        ctx.device,
        recipe.train.joint_epochs + recipe.train.student_epochs,
        promote=False,
        runtime=ctx.runtime,
        resume=resume,
        hint_teacher=teacher,
        hsakd=hsakd,
        teacher_heads=[hsakd.teacher_heads] if hsakd is not None else None,
    )
    return PruneOutcome(
        student, mask, ctx.analysis, {**record, "fine_tune": history, "seconds": time.perf_counter() - start}
    )


def prune_model(
    teacher,
    recipe,
    loader,
    select_loader,
    example_input,
    device,
    runtime: Runtime | None = None,
    analysis: Analysis | None = None,
) -> PruneOutcome:
    """Entry point of the prune stage: analyse, then run the recipe's method. ``select_loader``
    (held-out training images) drives every decision; the caller reports on the test split.
    A ``runtime`` with a checkpoint directory makes the stage resumable and turns Ctrl-C into
    "finish the step, write a checkpoint, stop". ``analysis`` is the one :func:`analyse` built
    for this architecture and recipe (built here when not given)."""
    runtime = runtime or Runtime(device)
    teacher = runtime.prepare_model(teacher).eval()
    analysis = analysis or analyse(teacher, recipe, example_input.to(device))
    method = get_method(recipe.prune.method)
    ctx = PruneContext(teacher, analysis, recipe, loader, select_loader, device, runtime)
    if runtime.checkpoint_dir is None:
        return method.run(ctx)
    with runtime.stop.installed():
        return method.run(ctx)
