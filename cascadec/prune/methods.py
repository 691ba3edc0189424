"""The pruning methods a recipe can choose (``prune.method``), on one shared code path.

* ``oneshot``: rank units once (Taylor or L1 on the pretrained network), cut to the target,
  fine-tune for joint_epochs + student_epochs, with KD from the teacher when ``distill.kd``.
  Baselines (a) and (b) of the benchmark.
* ``cascade``: the paper's method (cascade.py). ``cascade.num_tas: 0`` gives learned scores
  without TAs (baseline c); ``cascade.cascade_update: false`` switches Eq. 5 off.

Both spend the same epochs, data and optimiser, so the benchmark compares like with like.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cascadec.data.sampler import position
from cascadec.distill.hints import HintSpec, hint_spec
from cascadec.distill.hsakd import HsakdSpec, HsakdWeights, store_heads, teacher_heads
from cascadec.distill.losses import DistillLoss
from cascadec.errors import UserError
from cascadec.progress import log
from cascadec.prune.analysis import Analysis, analyse
from cascadec.prune.cap import calibration_loader, compensate_start, prune_cap
from cascadec.prune.cascade import CascadeTrainer
from cascadec.prune.fbs import build_started
from cascadec.prune.finetune import student_phase
from cascadec.prune.importance import CRITERIA
from cascadec.prune.latency_refine import Refined, SpeedupMeter, refine_latency_mask
from cascadec.prune.scores import freeze_step, make_score_optimizer, score_schedule
from cascadec.recipe import Recipe
from cascadec.train.bn import recalibration_loader
from cascadec.train.checkpoint import rng_state, set_rng_state
from cascadec.train.loop import cosine_schedule, evaluate, make_optimizer, steps_in
from cascadec.train.runtime import Runtime


@dataclass
class PruneResult:
    student: nn.Module  # full-width network; ``mask`` says which units survive
    mask: torch.Tensor | None  # None: nothing removed (FBS: the student's gates choose per image)
    analysis: Analysis
    history: dict = field(default_factory=dict)


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
    t = recipe.train
    recal, batches = _recalibration(recipe, loader)
    return student_phase(
        student,
        mask,
        analysis.index,
        teachers,
        loader,
        select_loader,
        distill_loss(recipe),
        epochs=epochs,
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.nesterov,
        weight_decay=t.weight_decay,
        device=device,
        promote=promote,
        max_steps=t.max_steps_per_epoch,
        runtime=runtime,
        resume=resume,
        teacher_accuracy=teacher_accuracy,
        recalibration=recal,
        recalibration_batches=batches,
        select_best=t.select_best,
        hints=hint_spec_for(recipe, student, analysis),
        hint_teacher=hint_teacher,
        hsakd=hsakd,
        teacher_heads=teacher_heads,
        start_heads=start_heads,
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


def run_oneshot(
    teacher, analysis, recipe, loader, select_loader, device, runtime: Runtime | None = None
) -> PruneResult:
    start = time.perf_counter()
    resume = runtime.load("student") if runtime is not None else None
    if resume is not None:
        mask = resume["mask"].to(device)  # the importance ranking is not recomputed on resume
    else:
        scores = initial_importance(teacher, analysis, recipe, loader, device, runtime)
        mask = analysis.solver.solve(scores, analysis.budget)
    student = copy.deepcopy(teacher).to(device)
    record = {}
    refined = refine_for_latency(teacher, analysis, recipe, scores, runtime) if resume is None else None
    if refined is not None:
        mask = refined.keep.to(device)
        record["latency_refine"] = refined.history
    if recipe.prune.compensate and resume is None:
        record["compensation"] = compensate_start(student, teacher, analysis, mask, loader, recipe, device)
    return _fine_tuned(
        teacher, student, mask, analysis, recipe, loader, select_loader, device, runtime, resume, start, record
    )


def run_cap(teacher, analysis, recipe, loader, select_loader, device, runtime: Runtime | None = None) -> PruneResult:
    """CaP: compensation-aware selection and refit on calibration images, then BatchNorm
    statistics re-estimated on the same images; the recipe's epochs (0 for a retrain-free run)
    fine-tune it like a one-shot student."""
    start = time.perf_counter()
    resume = runtime.load("student") if runtime is not None else None
    if resume is not None:
        mask, report = resume["mask"].to(device), {}
        student = copy.deepcopy(teacher).to(device)
    else:
        # a latency target: the last selection step's solve is held to the backend's measurement
        def refine(scores: torch.Tensor, ceiling: float) -> Refined | None:
            return refine_for_latency(teacher, analysis, recipe, scores, runtime, ceiling=ceiling)

        student, mask, report = prune_cap(teacher, analysis, recipe, loader, device, refine=refine)
    record = {"cap": report}
    last = (report.get("steps") or [{}])[-1]
    if "latency_refine" in last:  # where the report reads a latency target's tries
        record["latency_refine"] = last.pop("latency_refine")
    return _fine_tuned(
        teacher, student, mask, analysis, recipe, loader, select_loader, device, runtime, resume, start, record
    )


def run_fbs(teacher, analysis, recipe, loader, select_loader, device, runtime: Runtime | None = None) -> PruneResult:
    """FBS: the teacher with saliency gates (a deterministic start, so a resumed run rebuilds it
    and loads its checkpoint), trained like a one-shot student; ``mask`` is None: nothing is
    removed, the gates choose channels per image."""
    start = time.perf_counter()
    if "target" in recipe.prune.model_fields_set:
        log(f"FBS: prune.target ({recipe.prune.target.describe()}) is not used; the budget is prune.fbs.keep")
    resume = runtime.load("student") if runtime is not None else None
    student, report = build_started(teacher, recipe.prune.fbs.keep)
    return _fine_tuned(
        teacher,
        student.to(device),
        None,
        analysis,
        recipe,
        loader,
        select_loader,
        device,
        runtime,
        resume,
        start,
        {"fbs": report},
    )


def _fine_tuned(
    teacher, student, mask, analysis, recipe, loader, select_loader, device, runtime, resume, start, record: dict
) -> PruneResult:
    """The one-shot tail shared by ``oneshot`` and ``cap``: fine-tune the masked student for
    joint + student epochs with KD from the teacher (or none), and return it."""
    teachers = [("teacher", teacher)] if recipe.distill.kd else [("none", None)]
    hsakd = hsakd_spec_for(recipe, teacher, analysis, loader, device, runtime)
    if hsakd is not None:
        record["hsakd"] = hsakd.report
    history = _fine_tune(
        student,
        mask,
        analysis,
        teachers,
        recipe,
        loader,
        select_loader,
        device,
        recipe.train.joint_epochs + recipe.train.student_epochs,
        promote=False,
        runtime=runtime,
        resume=resume,
        hint_teacher=teacher,
        hsakd=hsakd,
        teacher_heads=[hsakd.teacher_heads] if hsakd is not None else None,
    )
    return PruneResult(
        student, mask, analysis, {**record, "fine_tune": history, "seconds": time.perf_counter() - start}
    )


def _scale_free_scores(importance: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scores start at importance / c (mean 1); gradients are divided by c too, so Eq. 5's
    step size alpha = score_lr is relative to the initial Taylor scale and one recipe value
    works across models and data sets."""
    c = float(importance.abs().mean()) or 1.0
    return importance / c, c


def run_cascade(
    teacher, analysis, recipe, loader, select_loader, device, runtime: Runtime | None = None
) -> PruneResult:
    """The paper's schedule, with masks that settle: the scores' step anneals to zero and the
    last ``cascade.freeze_fraction`` of the joint phase trains on fixed masks, after every
    model's BatchNorm statistics are recalibrated. At the end of the joint phase each model is
    evaluated on the selection split (the TA ladder) before the student phase starts.

    With a checkpointing ``runtime`` the joint phase saves a ``joint`` checkpoint (after
    scoring, every epoch, every N steps, on Ctrl-C) and the student phase a ``student`` one;
    a resumed run continues from whichever is furthest along."""
    runtime = runtime or Runtime(device)
    start = time.perf_counter()
    c, t = recipe.cascade, recipe.train
    joint_state, student_state = runtime.load("joint"), runtime.load("student")
    if student_state is not None and joint_state is None:
        raise UserError(
            f"{runtime.checkpoint_dir}: a student checkpoint without its joint checkpoint; delete the directory to restart"
        )
    if joint_state is None:
        importance = initial_importance(teacher, analysis, recipe, loader, device, runtime)
        scores, scale = _scale_free_scores(importance)
    else:
        scores, scale = torch.zeros(analysis.index.num_units), float(joint_state["score_scale"])
    base = copy.deepcopy(teacher)
    hsakd = hsakd_spec_for(recipe, teacher, analysis, loader, device, runtime)
    if hsakd is not None and joint_state is not None and joint_state.get("hsakd_teacher_heads") is not None:
        hsakd.teacher_heads.load_state_dict(joint_state["hsakd_teacher_heads"])  # the heads this run distils from
    trainer = CascadeTrainer(
        base,
        teacher,
        analysis.index,
        analysis.solver,
        analysis.budget,
        scores,
        num_tas=c.num_tas,
        ta_ratios=c.ta_ratios,
        cascade_update=c.cascade_update,
        loss=distill_loss(recipe),
        device=device,
        hints=hint_spec_for(recipe, base, analysis),
        hsakd=hsakd,
    )
    weights, score_params = trainer.parameters()
    for s in score_params:
        s.register_hook(lambda g, scale=scale: g / scale)
    weight_opt = make_optimizer(weights, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    score_opt = make_score_optimizer(score_params, signal=c.score_signal, optimizer=c.score_optimizer, lr=c.score_lr)
    joint_steps = t.joint_epochs * steps_in(loader, t.max_steps_per_epoch)
    sched = cosine_schedule(weight_opt, joint_steps)
    trainer.freeze_at = freeze_step(joint_steps, c.freeze_fraction)
    score_sched = score_schedule(score_opt, trainer.freeze_at) if score_opt is not None else None
    recal, recal_batches = _recalibration(recipe, loader)

    def on_freeze() -> None:
        if recal is not None:
            trainer.recalibrate(recal, recal_batches)
        log(
            f"joint phase: masks fixed from step {trainer.freeze_at} of {joint_steps}"
            + (", BatchNorm statistics recalibrated" if recal is not None else "")
        )

    trainer.on_freeze = on_freeze
    refine_record: list[dict] = []

    def before_freeze() -> None:
        # the student's mask is about to be final: hold its latency target to the backend
        refined = refine_for_latency(teacher, analysis, recipe, trainer.scores[0], runtime)
        if refined is not None:
            trainer.set_student_budget(refined.budget)
            refine_record[:] = refined.history

    trainer.before_freeze = before_freeze
    if joint_state is not None:
        trainer.load_checkpoint_state(joint_state["trainer"])
        weight_opt.load_state_dict(joint_state["weight_optimizer"])
        if score_opt is not None:
            score_opt.load_state_dict(joint_state["score_optimizer"])
        sched.load_state_dict(joint_state["scheduler"])
        if score_sched is not None and joint_state.get("score_scheduler") is not None:
            score_sched.load_state_dict(joint_state["score_scheduler"])
        if trainer.freeze_due(sched.last_epoch):
            trainer.freeze(callback=False)  # the checkpoint holds the recalibrated statistics
        runtime.restore_scaler(joint_state)
        initial_mask = joint_state["initial_mask"]
        joint = list(joint_state["history"])
        first_epoch, first_step, partial = joint_state["epoch"], joint_state["step"], joint_state["partial"]
        if student_state is None:
            set_rng_state(joint_state["rng"])
            log(f"joint phase: resuming at epoch {first_epoch}, step {first_step}")
    else:
        initial_mask = trainer.state.hard_masks[0].detach().cpu().clone()
        joint, first_epoch, first_step, partial = [], 0, 0, {}

    def save_joint(epoch: int, step: int, partial: dict) -> None:
        if runtime.checkpoint_dir is None:
            return
        runtime.save(
            "joint",
            {
                "phase": "joint",
                "epoch": epoch,
                "step": step,
                "partial": partial,
                "score_scale": scale,
                "initial_mask": initial_mask,
                "trainer": trainer.checkpoint_state(),
                "weight_optimizer": weight_opt.state_dict(),
                "score_optimizer": score_opt.state_dict() if score_opt is not None else None,
                "score_scheduler": score_sched.state_dict() if score_sched is not None else None,
                "scheduler": sched.state_dict(),
                "history": joint,
                "rng": rng_state(),
                "ladder": ladder_acc,
                "hsakd_teacher_heads": hsakd.teacher_heads.state_dict() if hsakd is not None else None,
                "latency_refine": refine_record
                or (joint_state.get("latency_refine") if joint_state is not None else None),
            },
        )

    ladder_acc: list[float] = list(joint_state.get("ladder") or []) if joint_state is not None else []
    if joint_state is None:
        if trainer.freeze_due(0):
            trainer.freeze()  # a joint phase too short to move the masks at all
        save_joint(0, 0, {})  # a resumed run need not score the units again
    names = trainer.names
    for epoch in range(first_epoch, t.joint_epochs):
        resumed_here = epoch == first_epoch
        before = [m.detach().cpu().clone() for m in trainer.state.hard_masks]
        record = trainer.joint_epoch(
            loader,
            weight_opt,
            score_opt,
            sched,
            max_steps=t.max_steps_per_epoch,
            epoch=epoch,
            runtime=runtime,
            start_step=first_step if resumed_here else 0,
            partial=partial if resumed_here else None,
            save=save_joint,
            score_scheduler=score_sched,
        )
        record["mask_changes"] = [int((b != a.cpu()).sum()) for b, a in zip(before, trainer.state.hard_masks)]
        record["frozen"] = trainer.frozen
        record["accuracies"] = trainer.evaluate_models(select_loader) if c.track_accuracy else None
        joint.append(record)
        shown = ", ".join(f"{n} {x:.3f}" for n, x in zip(names, record["losses"]))  # losses run student first
        accs = (
            "; selection accuracy " + ", ".join(f"{n} {a:.4f}" for n, a in zip(names, record["accuracies"]))
            if record["accuracies"]
            else ""
        )
        log(f"joint epoch {epoch}: loss {shown}{accs}, {record['images_per_s']:.0f} images/s")
        save_joint(epoch + 1, 0, {})
    joint_seconds = sum(epoch["seconds"] for epoch in joint)  # the joint loop only, not scoring/setup
    if not ladder_acc:  # (a resumed run whose joint phase had finished kept these in its checkpoint)
        if recal is not None:
            trainer.recalibrate(recal, recal_batches)  # the statistics of the weights the models end with
        ladder_acc = trainer.evaluate_models(select_loader)
        save_joint(t.joint_epochs, 0, {})
    ladder = check_ladder(names, trainer.state.fractions, ladder_acc, c.ladder_check)
    teachers = [
        (f"TA{j} (keep {trainer.state.fractions[j]:.2f})", trainer.frozen_model(j))
        for j in range(1, len(trainer.models))
    ]
    teachers.append(("teacher", teacher))
    heads = None
    if hsakd is not None:  # each TA teaches with the heads it trained; the teacher with its cached ones
        heads = [trainer.frozen_heads(j) for j in range(1, len(trainer.models))] + [hsakd.teacher_heads]
    student_start_heads = trainer.aux_heads[0] if hsakd is not None else None
    teacher_accuracy = [
        *ladder_acc[1:],
        evaluate(teacher, select_loader, device=device, description="evaluate teacher"),
    ]
    student, mask = trainer.extract_student()
    final_mask = mask.cpu()
    compensation = None
    if recipe.prune.compensate and student_state is None:
        # toward the unmasked shared network the student was cut from (the top of the ladder)
        compensation = compensate_start(student, student, analysis, final_mask, loader, recipe, device)
    history = {
        "fractions": trainer.state.fractions,
        "joint": joint,
        "joint_seconds": joint_seconds,
        "mask_changed_units": int((final_mask != initial_mask).sum()),
        "ladder": ladder,
        "freeze_step": trainer.freeze_at,
        "joint_steps": joint_steps,
    }
    if compensation is not None:
        history["compensation"] = compensation
    if refine_record or (joint_state is not None and joint_state.get("latency_refine")):
        history["latency_refine"] = refine_record or joint_state["latency_refine"]
    if hsakd is not None:
        history["hsakd"] = hsakd.report
    history["student"] = _fine_tune(
        student,
        mask,
        analysis,
        teachers,
        recipe,
        loader,
        select_loader,
        device,
        t.student_epochs,
        promote=c.promote_teacher,
        runtime=runtime,
        resume=student_state,
        teacher_accuracy=teacher_accuracy,
        hint_teacher=teacher,
        hsakd=hsakd,
        teacher_heads=heads,
        start_heads=student_start_heads,
    )
    history["seconds"] = time.perf_counter() - start
    return PruneResult(student, final_mask, analysis, history)


# prune.method -> the function that runs it; a new method is one entry here and its module
METHODS: dict[str, Callable[..., PruneResult]] = {
    "cascade": run_cascade,
    "oneshot": run_oneshot,
    "cap": run_cap,
    "fbs": run_fbs,
}


def check_ladder(names: list[str], fractions: list[float], accuracies: list[float], policy: str) -> dict:
    """The TA ladder at the end of the joint phase: each model should be at least as accurate
    (on the selection split) as the one below it, or it cannot teach it. A broken ladder is
    logged loudly, recorded in the manifest and the report, and stops the run with
    ``cascade.ladder_check: stop``."""
    rungs = [{"model": n, "keep": f, "accuracy": a} for n, f, a in zip(names, fractions, accuracies)]
    broken = [
        f"{names[j]} {accuracies[j]:.4f} < {names[j - 1]} {accuracies[j - 1]:.4f}"
        for j in range(1, len(accuracies))
        if accuracies[j] < accuracies[j - 1]
    ]
    if len(names) > 1:
        log("TA ladder (selection split): " + " <= ".join(f"{n} {a:.4f}" for n, a in zip(names, accuracies)))
    if broken and policy != "off":
        message = "TA ladder broken at the end of the joint phase: " + "; ".join(broken)
        if policy == "stop":
            raise UserError(f"{message} (cascade.ladder_check: stop)")
        log(f"WARNING: {message}")
    return {"rungs": rungs, "broken": broken, "healthy": not broken}


def prune_model(
    teacher,
    recipe,
    loader,
    select_loader,
    example_input,
    device,
    runtime: Runtime | None = None,
    analysis: Analysis | None = None,
) -> PruneResult:
    """Entry point of the prune stage: analyse, then run the recipe's method. ``select_loader``
    (held-out training images) drives every decision; the caller reports on the test split.
    A ``runtime`` with a checkpoint directory makes the stage resumable and turns Ctrl-C into
    "finish the step, write a checkpoint, stop". ``analysis`` is the one :func:`analyse` built
    for this architecture and recipe (built here when not given)."""
    runtime = runtime or Runtime(device)
    teacher = runtime.prepare_model(teacher).eval()
    analysis = analysis or analyse(teacher, recipe, example_input.to(device))
    runner = METHODS[recipe.prune.method]
    if runtime.checkpoint_dir is None:
        return runner(teacher, analysis, recipe, loader, select_loader, device, runtime)
    with runtime.stop.installed():
        return runner(teacher, analysis, recipe, loader, select_loader, device, runtime)
