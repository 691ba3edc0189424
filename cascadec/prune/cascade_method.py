"""``prune.method: cascade``: the paper's method (cascade.py holds the trainer).

``cascade.num_tas: 0`` gives learned scores without TAs (baseline c);
``cascade.cascade_update: false`` switches Eq. 5 off. The joint phase trains the teacher's
shared-weight copy, its TAs and the student's masks together; the student phase then
distils the student from the TA ladder. Resumable at any step (``joint`` and ``student``
checkpoints).
"""

from __future__ import annotations

import copy
import time

import torch

from cascadec.errors import UserError
from cascadec.progress import log
from cascadec.prune.cap import compensate_start
from cascadec.prune.cascade import CascadeTrainer
from cascadec.prune.method import PruneContext, PruneMethod, PruneOutcome, register_method
from cascadec.prune.methods import (
    _fine_tune,
    _recalibration,
    distill_loss,
    hint_spec_for,
    hsakd_spec_for,
    initial_importance,
    refine_for_latency,
)
from cascadec.prune.scores import freeze_step, make_score_optimizer, score_schedule
from cascadec.train.checkpoint import rng_state, set_rng_state
from cascadec.train.loop import cosine_schedule, evaluate, make_optimizer, steps_in
from cascadec.train.runtime import Runtime


@register_method
class Cascade(PruneMethod):
    """The paper's schedule (:func:`run_cascade`)."""

    name = "cascade"
    description = "the paper: learned masks with teaching assistants, then the student distilled from them"

    def run(self, ctx: PruneContext) -> PruneOutcome:
        return run_cascade(
            ctx.teacher, ctx.analysis, ctx.recipe, ctx.loader, ctx.select_loader, ctx.device, ctx.runtime
        )


def _scale_free_scores(importance: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scores start at importance / c (mean 1); gradients are divided by c too, so Eq. 5's
    step size alpha = score_lr is relative to the initial Taylor scale and one recipe value
    works across models and data sets."""
    c = float(importance.abs().mean()) or 1.0
    return importance / c, c


class JointPhase:
    """The joint phase's resumable state, as torchvision's references checkpoint: everything a
    run needs to continue from any step is gathered by :meth:`state_dict` and put back by
    :meth:`load_state_dict` (the ``joint`` checkpoint; the caller adds the RNG state and the
    runtime its AMP scaler). ``history``, ``ladder`` and ``latency_refine`` are lists the
    schedule appends to or fills in place, so they are saved as they stand."""

    def __init__(self, trainer: CascadeTrainer, weight_opt, score_opt, sched, score_sched, scale: float, hsakd) -> None:
        self.trainer, self.weight_opt, self.score_opt = trainer, weight_opt, score_opt
        self.sched, self.score_sched, self.scale, self.hsakd = sched, score_sched, scale, hsakd
        self.initial_mask = trainer.state.hard_masks[0].detach().cpu().clone()  # the mask scoring gave
        self.epoch, self.step, self.partial = 0, 0, {}  # where a resumed run starts: epoch, step in it
        self.history: list[dict] = []  # one record per joint epoch
        self.ladder: list[float] = []  # the models' selection accuracy once the joint phase ends
        self.latency_refine: list[dict] = []  # the student budget's latency tries (refine_for_latency)

    def state_dict(self) -> dict:
        return {
            "phase": "joint",
            "epoch": self.epoch,
            "step": self.step,
            "partial": self.partial,
            "score_scale": self.scale,
            "initial_mask": self.initial_mask,
            "trainer": self.trainer.checkpoint_state(),
            "weight_optimizer": self.weight_opt.state_dict(),
            "score_optimizer": self.score_opt.state_dict() if self.score_opt is not None else None,
            "score_scheduler": self.score_sched.state_dict() if self.score_sched is not None else None,
            "scheduler": self.sched.state_dict(),
            "history": self.history,
            "ladder": self.ladder,
            "hsakd_teacher_heads": self.hsakd.teacher_heads.state_dict() if self.hsakd is not None else None,
            "latency_refine": self.latency_refine or None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Put a ``joint`` checkpoint back. The scores' scale is not set here: the trainer's
        score hooks are built with it, so the caller reads ``state["score_scale"]`` first."""
        self.trainer.load_checkpoint_state(state["trainer"])
        self.weight_opt.load_state_dict(state["weight_optimizer"])
        if self.score_opt is not None:
            self.score_opt.load_state_dict(state["score_optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.score_sched is not None and state.get("score_scheduler") is not None:
            self.score_sched.load_state_dict(state["score_scheduler"])
        if self.trainer.freeze_due(self.sched.last_epoch):
            self.trainer.freeze(callback=False)  # the checkpoint holds the recalibrated statistics
        if self.hsakd is not None and state.get("hsakd_teacher_heads") is not None:
            self.hsakd.teacher_heads.load_state_dict(state["hsakd_teacher_heads"])  # the heads this run distils from
        self.initial_mask = state["initial_mask"]
        self.epoch, self.step, self.partial = state["epoch"], state["step"], state["partial"]
        self.history[:] = list(state["history"])
        self.ladder[:] = list(state.get("ladder") or [])
        self.latency_refine[:] = list(state.get("latency_refine") or [])


def run_cascade(
    teacher, analysis, recipe, loader, select_loader, device, runtime: Runtime | None = None
) -> PruneOutcome:
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

    def before_freeze() -> None:
        # the student's mask is about to be final: hold its latency target to the backend
        refined = refine_for_latency(teacher, analysis, recipe, trainer.scores[0], runtime)
        if refined is not None:
            trainer.set_student_budget(refined.budget)
            phase.latency_refine[:] = refined.history  # kept through a resume (the checkpoint)

    trainer.before_freeze = before_freeze
    phase = JointPhase(trainer, weight_opt, score_opt, sched, score_sched, scale, hsakd)
    if joint_state is not None:
        phase.load_state_dict(joint_state)
        runtime.restore_scaler(joint_state)
        if student_state is None:
            set_rng_state(joint_state["rng"])
            log(f"joint phase: resuming at epoch {phase.epoch}, step {phase.step}")
    joint, initial_mask = phase.history, phase.initial_mask
    first_epoch, first_step, partial = phase.epoch, phase.step, phase.partial

    def save_joint(epoch: int, step: int, partial: dict) -> None:
        if runtime.checkpoint_dir is not None:
            phase.epoch, phase.step, phase.partial = epoch, step, partial
            runtime.save("joint", {**phase.state_dict(), "rng": rng_state()})

    ladder_acc = phase.ladder
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
        ladder_acc[:] = trainer.evaluate_models(select_loader)
        save_joint(t.joint_epochs, 0, {})
    ladder = check_ladder(names, trainer.state.fractions, ladder_acc, c.ladder_check)
    # the TAs teach shrunk to their masks (the same function, less compute) unless their features
    # are read (hints, HSAKD heads)
    shrunk_tas = t.shrunk_student and hsakd is None and recipe.distill.hints == "none"
    teachers = [
        (
            f"TA{j} (keep {trainer.state.fractions[j]:.2f})",
            trainer.frozen_model(j, example=analysis.example if shrunk_tas else None),
        )
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
        # toward the unmasked shared network the student was cut from: the top of the ladder, with
        # its own BatchNorm, classifier and first conv. Not the student run without its mask: its
        # BatchNorm was trained and calibrated for the masked network, so unmasked it is a network
        # that never trained (the statistics it gave knocked the student to chance at 90 %).
        # With no unpruned TA the pretrained teacher is the top.
        top = len(trainer.models) - 1
        reference = copy.deepcopy(trainer.models[top]).eval() if trainer.state.fractions[top] >= 1.0 else teacher
        compensation = compensate_start(student, reference, analysis, final_mask, loader, recipe, device)
        del reference
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
    if phase.latency_refine:
        history["latency_refine"] = phase.latency_refine
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
    return PruneOutcome(student, final_mask, analysis, history)


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
