"""The student phase: the masked student fine-tunes alone, with KD from a ladder of teachers.

Shared by the cascade (teachers: the frozen TAs, then the pretrained network) and one-shot
pruning (teacher: the pretrained network, or none). Every decision is taken on the selection
split (held-out training images), never on the test split the run reports:

* **Which teacher.** A student never distils from a model that is no better than itself: it
  starts at the lowest teacher that beats it, and moves up whenever it catches its teacher
  (docs/paper.md, Schedule step 2), up to the pretrained network at the top.
* **Which epoch.** The student that ships is the best epoch on the selection split, the
  unfine-tuned start included, with its BatchNorm statistics recalibrated on training data.
* **Which network.** The masked student computes the same function as the shrunk one, at the
  full width's cost; the phase trains the shrunk network (``shrunk``) and writes its weights back
  into the full-width student at the end (``shrink.write_back``), so callers see no difference.
  Hints and HSAKD read full-width features and keep the masked network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.distill.hints import HintedLoss, HintSpec, identity_adapters
from cascadec.distill.hsakd import AuxNetwork, HsakdLoss, HsakdSpec, Rotated, student_heads
from cascadec.distill.logit_cache import LogitCache
from cascadec.distill.losses import DistillLoss
from cascadec.errors import UserError
from cascadec.progress import log
from cascadec.prune.groups import GroupIndex
from cascadec.prune.masks import ChannelMasks
from cascadec.prune.shrink import shrink, shrink_positions, write_back
from cascadec.train.bn import recalibrate_batchnorm
from cascadec.train.checkpoint import rng_state, set_rng_state
from cascadec.train.loop import cosine_schedule, evaluate, make_optimizer, steps_in, train_epoch
from cascadec.train.runtime import Runtime

Teachers = list[tuple[str, nn.Module | None]]


@dataclass(frozen=True)
class PhaseSettings:
    """How the student phase trains: the schedule (SGD, cosine to 0 over ``epochs``), whether the
    student may move up the teacher ladder (``promote``), which epoch ships (``select_best``: the
    best on the selection split), BatchNorm recalibration batches, the shrunk layout and the
    teacher-logit table. :meth:`from_recipe` reads them from a recipe's ``train`` section."""

    epochs: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    promote: bool = False
    max_steps: int | None = None
    select_best: bool = True
    recalibration_batches: int = 0
    shrunk: bool = False
    cache_logits: bool = True

    @classmethod
    def from_recipe(cls, train: Any, *, epochs: int, promote: bool, recalibration_batches: int = 0) -> PhaseSettings:
        """A recipe's ``train`` section (cascadec.recipe.TrainSection) as the phase's settings."""
        return cls(
            epochs=epochs,
            lr=train.lr,
            momentum=train.momentum,
            nesterov=train.nesterov,
            weight_decay=train.weight_decay,
            promote=promote,
            max_steps=train.max_steps_per_epoch,
            select_best=train.select_best,
            recalibration_batches=recalibration_batches,
            shrunk=train.shrunk_student,
            cache_logits=train.cache_teacher_logits,
        )


def first_better(teacher_accuracy: list[float], student_accuracy: float, start: int = 0) -> int:
    """The lowest level at or above ``start`` whose teacher beats the student; the top level when
    none does (the pretrained network is still the best signal there is)."""
    for level in range(start, len(teacher_accuracy)):
        if teacher_accuracy[level] > student_accuracy:
            return level
    return len(teacher_accuracy) - 1


def student_phase(
    student: nn.Module,
    mask: torch.Tensor | None,
    index: GroupIndex,
    teachers: Teachers,
    loader: DataLoader,
    select_loader: DataLoader,
    loss: DistillLoss,
    settings: PhaseSettings,
    *,
    device: torch.device,
    runtime: Runtime | None = None,
    resume: dict | None = None,
    teacher_accuracy: list[float] | None = None,
    recalibration: DataLoader | None = None,
    hints: HintSpec | None = None,
    hint_teacher: nn.Module | None = None,
    hsakd: HsakdSpec | None = None,
    teacher_heads: list[nn.ModuleList] | None = None,
    start_heads: nn.ModuleList | None = None,
    example: torch.Tensor | None = None,
) -> list[dict]:
    """Fine-tune the masked student in place; returns one record per epoch (plus the start).

    ``settings`` (:class:`PhaseSettings`) holds the schedule and the choices below.
    ``teachers`` runs from the nearest TA up to the pretrained teacher; ``teacher_accuracy``
    (on ``select_loader``) is measured here when not given. With ``promote`` off the student
    keeps the first teacher that beats it. With a checkpointing ``runtime`` the phase saves
    ``student`` checkpoints (every epoch, every N steps, on Ctrl-C) that include the mask and
    the best epoch so far; ``resume`` is such a checkpoint.

    With ``hsakd`` every teacher level has its auxiliary heads in ``teacher_heads`` (aligned
    with ``teachers``); the student's own start as a copy of ``start_heads`` (default: the
    first teacher's) and are trained here, beside the network, never in it.

    ``shrunk`` (with ``example``, an input of the network): train the physically shrunk student
    and write it back into ``student`` at the end; the checkpoints then hold the shrunk weights
    (``layout``); a masked checkpoint (written before, or with shrunk off) resumes masked, and a shrunk
    one that this phase cannot train shrunk is refused with one line.

    ``cache_logits``: each teacher's logits are computed once and read back every epoch where
    the training images are not augmented (cascadec.distill.logit_cache); not with hints or HSAKD,
    which read the teacher's features. The seconds that took are in the epoch's record
    (``teacher_logits_seconds``), apart from its training ``seconds``."""
    runtime = runtime or Runtime(device)
    hooks = None
    full, positions = student, None
    if (
        settings.shrunk
        and mask is not None
        and example is not None
        and hints is None
        and hsakd is None
        and (resume is None or resume.get("layout") == "shrunk")
    ):
        positions = shrink_positions(student, index, mask, example)
        if positions is None:
            log("student phase: this network's shrink changes weights (not a pure selection): training it masked")
    if resume is not None and resume.get("layout") == "shrunk" and positions is None:
        raise UserError(
            "the student checkpoint holds the shrunk student, but this phase trains the masked one "
            "(train.shrunk_student false, distill.hints or HSAKD): resume with the settings it was written with"
        )
    if positions is not None:
        # the same function at the shrunk width's cost; every name below trains this network
        student = runtime.prepare_model(shrink(full, index, mask.cpu(), example.to(next(full.parameters()).device)))
        student.train()
    elif mask is not None:  # None: a student without channel masks (FBS gates its channels itself)
        hooks = ChannelMasks(student, index).install()
        hooks.set(mask.to(device))
    # distill.hints: stage hints pull the student's stages towards ``hint_teacher`` (the pretrained
    # network) through adapters trained here and never exported; paper hints towards its KD teacher
    adapters = (
        identity_adapters(student, hints.points, hints.example.to(device))
        if hints is not None and hints.kind == "stages"
        else None
    )
    aux_heads = None
    if hsakd is not None:
        if teacher_heads is None or len(teacher_heads) != len(teachers):
            raise ValueError("student_phase: hsakd needs one set of teacher heads per teacher level")
        aux_heads = student_heads(start_heads if start_heads is not None else teacher_heads[0])
    trained = [
        *student.parameters(),
        *(adapters.parameters() if adapters is not None else []),
        *(aux_heads.parameters() if aux_heads is not None else []),
    ]
    opt = make_optimizer(
        trained,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )
    steps = steps_in(loader, settings.max_steps)
    sched = cosine_schedule(opt, settings.epochs * steps)

    def recalibrate() -> None:
        if recalibration is not None and settings.recalibration_batches > 0:  # HSAKD: on rotated batches, as trained
            net = Rotated(student) if hsakd is not None else student
            recalibrate_batchnorm(net, recalibration, device=device, limit=settings.recalibration_batches)

    if resume is not None:
        student.load_state_dict(resume["student"])
        if adapters is not None and resume.get("hint_adapters") is not None:
            adapters.load_state_dict(resume["hint_adapters"])
        if aux_heads is not None and resume.get("aux_heads") is not None:
            aux_heads.load_state_dict(resume["aux_heads"])
            if resume.get("teacher_aux_heads") is not None:  # the teacher's heads this run distils from
                teacher_heads[-1].load_state_dict(resume["teacher_aux_heads"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        runtime.restore_scaler(resume)
        teacher_acc, level, history = list(resume["teacher_accuracy"]), resume["level"], list(resume["history"])
        best = {"accuracy": resume["best_accuracy"], "epoch": resume["best_epoch"], "state": resume["best_state"]}
        first_epoch, first_step, partial = resume["epoch"], resume["step"], resume["partial"]
        set_rng_state(resume["rng"])
        log(f"student phase: resuming at epoch {first_epoch}, step {first_step}")
    else:
        teacher_acc = (
            list(teacher_accuracy)
            if teacher_accuracy is not None
            else [
                evaluate(t, select_loader, device=device, description=f"evaluate {name}") if t is not None else 1.0
                for name, t in teachers
            ]
        )
        recalibrate()  # a one-shot mask was just applied to the teacher's statistics
        start_acc = evaluate(student, select_loader, device=device, description="evaluate student")
        level = first_better(teacher_acc, start_acc)
        history = [
            {
                "epoch": -1,
                "teacher": None,
                "teacher_accuracy": None,
                "student_accuracy": start_acc,
                "loss": None,
                "seconds": 0.0,
                "images": 0,
                "images_per_s": None,
            }
        ]
        best = {"accuracy": start_acc, "epoch": -1, "state": _snapshot(student)}
        first_epoch, first_step, partial = 0, 0, {}
        if teachers[level][1] is not None:
            log(
                f"student phase: start {start_acc:.4f} on the selection split; first teacher {teachers[level][0]} "
                f"({teacher_acc[level]:.4f})"
            )

    def save(epoch: int, step: int, partial: dict) -> None:
        if runtime.checkpoint_dir is None:
            return
        runtime.save(
            "student",
            {
                "phase": "student",
                "layout": "shrunk" if positions is not None else "masked",
                "epoch": epoch,
                "step": step,
                "partial": partial,
                "mask": mask,
                "student": student.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "level": level,
                "teacher_accuracy": teacher_acc,
                "history": history,
                "rng": rng_state(),
                "best_accuracy": best["accuracy"],
                "best_epoch": best["epoch"],
                "best_state": best["state"],
                "hint_adapters": adapters.state_dict() if adapters is not None else None,
                "aux_heads": aux_heads.state_dict() if aux_heads is not None else None,
                "teacher_aux_heads": teacher_heads[-1].state_dict() if aux_heads is not None else None,
            },
        )

    logits = LogitCache(
        loader,
        runtime,
        enabled=settings.cache_logits and hints is None and hsakd is None,
        images_ahead=(settings.epochs - first_epoch) * steps * _global_batch(loader),
    )
    for epoch in range(first_epoch, settings.epochs):
        name, teacher = teachers[level]
        before = logits.seconds
        cached = logits.loader_for(level, teacher)
        resumed = epoch == first_epoch
        source = hint_teacher if hints is not None and hints.kind == "stages" else teacher
        epoch_loss = (
            HintedLoss(loss, student, source, hints.points, adapters, hints.weight)
            if hints is not None and source is not None
            else loss
        )
        trainee, teaching = student, teacher
        if hsakd is not None and teacher is not None:  # both run on the 4 rotations, heads beside them
            trainee = AuxNetwork(student, aux_heads, hsakd.points)
            teaching = AuxNetwork(teacher, teacher_heads[level], hsakd.points).eval()
            epoch_loss = HsakdLoss(trainee, teaching, hsakd.weights)
        try:
            stats = train_epoch(
                trainee,
                cached or loader,
                opt,
                sched,
                epoch_loss,
                device=device,
                teacher=None if cached is not None else teaching,
                description=f"student epoch {epoch} (teacher {name})",
                max_steps=settings.max_steps,
                epoch=epoch,
                runtime=runtime,
                phase="student",
                start_step=first_step if resumed else 0,
                partial=partial if resumed else None,
                save=save,
                loss_per="step",
                where="student phase",
                beside=[adapters] if adapters is not None and isinstance(epoch_loss, HintedLoss) else [],
            )
        finally:  # no tap left on the student or a teacher, whatever ended the epoch
            if isinstance(epoch_loss, HintedLoss):
                epoch_loss.remove()
            for net in (trainee, teaching):
                if isinstance(net, AuxNetwork):
                    net.remove()
        acc = evaluate(student, select_loader, device=device, description="evaluate student")
        rate = stats["images_per_s"]
        record = {
            "epoch": epoch,
            "teacher": name,
            "teacher_accuracy": teacher_acc[level] if teacher is not None else None,
            "student_accuracy": acc,
            "loss": stats["loss"],
            "seconds": stats["seconds"],
            "images": stats["images"],
            "images_per_s": rate,
        }
        if logits.seconds > before:
            record["teacher_logits_seconds"] = logits.seconds - before
        history.append(record)
        against = f" (teacher {name} {teacher_acc[level]:.4f})" if teacher is not None else " (no teacher)"
        log(f"student epoch {epoch}: selection accuracy {acc:.4f}{against}, {rate:.0f} images/s")
        if acc > best["accuracy"] or not settings.select_best:
            best = {"accuracy": acc, "epoch": epoch, "state": _snapshot(student)}
        if settings.promote and teacher is not None and acc >= teacher_acc[level] and level + 1 < len(teachers):
            level = first_better(teacher_acc, acc, level + 1)
            log(f"student catches {name}; its teacher is now {teachers[level][0]}")
        save(epoch + 1, 0, {})
        if runtime.dist.agree(torch.zeros((), device=device), runtime.stop.requested)[1]:  # Ctrl-C during validation
            raise KeyboardInterrupt
    if best["epoch"] != history[-1]["epoch"]:
        student.load_state_dict(best["state"])
        log(f"student phase: keeping epoch {best['epoch']} (best on the selection split, {best['accuracy']:.4f})")
    recalibrate()
    for record in history:
        record["kept"] = record["epoch"] == best["epoch"]
    if hooks is not None:
        hooks.remove()
    if positions is not None:
        write_back(full, student, positions)
    return history


def _global_batch(loader: DataLoader) -> int:
    """Images per step over all ranks (an EpochBatchSampler's batch_size is the global batch)."""
    return getattr(loader.batch_sampler, "batch_size", None) or loader.batch_size or 1


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
