"""Cascaded channel pruning with hierarchical self-distillation (Miles & Mikolajczyk, BMVC 2020).

docs/method.md maps each equation to the code below. In short:

* ``build_hierarchy``: N models T_0 (student) .. T_{N-1} (keep fraction 1.0) as copies of
  the network that share ONE set of conv/linear weights; each keeps its own BatchNorm
  layers, classifier and first conv. T_{N-1}'s teacher is the frozen pretrained network.
* ``CascadeTrainer.joint_step``: every model's mask is the global top-k of its scores
  under its budget (recomputed each step). With ``cascade_update`` (Eq. 5) the scores of
  T_i get their straight-through gradient from the forward pass and loss of T_{i+1}: the
  mask vector fed to T_{i+1}'s hooks is ``hard_{i+1} + s_i - s_i.detach()``, so
  dL_{i+1}/ds_i = sum_{h,w} dL_{i+1}/dY_{i+1} * Y_{i+1}, the teacher's Taylor term. A unit
  masked out of T_i but alive in T_{i+1} therefore still learns and can come back.
* Masks settle before the joint phase ends: from ``freeze_at`` the hard masks are fixed, the
  scores get no gradient, and ``on_freeze`` (BatchNorm recalibration) runs once
  (prune/scores.py has the score update and its schedule).
* The student phase (masks frozen, the student alone fine-tunes with KD from the TA ladder)
  lives in prune/finetune.py, shared with one-shot pruning.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.data.sampler import position
from cascadec.distill.hints import FeatureTap, HintSpec, hint_loss, identity_adapters
from cascadec.distill.hsakd import HsakdSpec, Rotated, aux_logits, frozen_heads, hsakd_loss, rotate_batch, student_heads
from cascadec.distill.losses import DistillLoss
from cascadec.errors import UserError
from cascadec.progress import Status
from cascadec.prune.groups import GroupIndex
from cascadec.prune.masks import ChannelMasks
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.train.bn import BATCHNORMS, recalibrate_batchnorm
from cascadec.train.loop import evaluate, steps_in
from cascadec.train.runtime import Runtime, check_finite, check_step


def ta_fractions(student_fraction: float, num_tas: int, explicit: list[float] | None = None) -> list[float]:
    """Keep fractions of [student, TA_1, ..., TA_n]; the last TA is the unpruned 1.0 model.

    The paper's default for 3 TAs is 1+(k_0-1)/1.5, 1+(k_0-1)/2.5, 1.0; for other counts
    we space TAs uniformly ("any reasonably uniform allocation ... is sufficient").
    """
    k0 = student_fraction
    if explicit:
        if abs(explicit[-1] - 1.0) > 1e-9:
            raise UserError(f"cascade.ta_ratios must end with 1.0 (the unpruned shared model), got {explicit}")
        fractions = [k0, *explicit]
    elif num_tas == 0:
        fractions = [k0]
    elif num_tas == 3:
        fractions = [k0, 1 + (k0 - 1) / 1.5, 1 + (k0 - 1) / 2.5, 1.0]
    else:
        fractions = [k0 + (1 - k0) * j / num_tas for j in range(1, num_tas + 1)]
        fractions = [k0, *fractions]
    if any(b <= a for a, b in zip(fractions, fractions[1:])) or fractions[-1] > 1.0 + 1e-9:
        shown = ", ".join(f"{f:.3f}" for f in fractions)
        raise UserError(f"cascade: TA keep fractions must increase from the student's {k0:.3f} to 1.0, got [{shown}]")
    return fractions


def own_parameter_names(model: nn.Module, index: GroupIndex) -> set[str]:
    """Parameters each model of the hierarchy owns: BatchNorm, classifier, first conv."""
    owned_modules = {index.first_conv, index.classifier}
    owned_modules |= {n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)}
    names = set()
    for mod_name in owned_modules:
        if mod_name is None:
            continue
        for p_name, _ in model.get_submodule(mod_name).named_parameters(recurse=False):
            names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def build_hierarchy(base: nn.Module, index: GroupIndex, count: int) -> list[nn.Module]:
    """``count`` copies of ``base`` whose shared parameters are the very same tensors."""
    owned = own_parameter_names(base, index)
    models = []
    for _ in range(count):
        clone = copy.deepcopy(base)
        for name, param in base.named_parameters():
            if name in owned:
                continue
            module_name, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(module_name) if module_name else clone, attr, param)
        models.append(clone)
    return models


@dataclass
class CascadeState:
    fractions: list[float]
    budgets: list[Budget]
    hard_masks: list[torch.Tensor]


class CascadeTrainer:
    """Trains the hierarchy (joint phase) and then the student alone (student phase)."""

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module,
        index: GroupIndex,
        solver: MaskSolver,
        student_budget: Budget,
        initial_scores: torch.Tensor,
        *,
        num_tas: int,
        ta_ratios: list[float] | None,
        cascade_update: bool,
        loss: DistillLoss,
        device: torch.device,
        hints: HintSpec | None = None,
        hsakd: HsakdSpec | None = None,
    ) -> None:
        self.index, self.solver, self.loss, self.device = index, solver, loss, device
        fractions = ta_fractions(student_budget.keep_fraction, num_tas, ta_ratios)
        self.cascade_update = cascade_update and len(fractions) > 1
        budgets = [student_budget.scaled(f, solver.cost) for f in fractions]
        self.teacher = teacher.to(device).eval()  # only ever run under no_grad
        self.models = [m.to(device) for m in build_hierarchy(base.to(device), index, len(fractions))]
        self.masks = [ChannelMasks(m, index).install() for m in self.models]
        # the top model keeps everything: it needs no scores of its own
        self.scores = [
            nn.Parameter(initial_scores.clone().float().to(device)) if f < 1.0 - 1e-9 else None for f in fractions
        ]
        self.budgets = budgets
        self.state = CascadeState(fractions, budgets, [self._solve(i) for i in range(len(fractions))])
        # masks stop moving at joint step ``freeze_at`` (None: never); ``on_freeze`` then runs once
        # (the method recalibrates BatchNorm there), and after it the scores get no gradient at all
        self.freeze_at: int | None = None
        self.on_freeze: Callable[[], None] | None = None
        # runs once before the masks are fixed (a latency target's measured refinement)
        self.before_freeze: Callable[[], None] | None = None
        self.frozen = False
        # distill.hints: every model's taps, the pretrained teacher's, and (stage hints) one set of
        # identity-initialised adapters per model, trained with the shared weights
        self.hints = hints
        self.taps: list[FeatureTap] = []
        self.teacher_tap: FeatureTap | None = None
        self.adapters: list[nn.ModuleDict] = []
        if hints is not None:
            self.taps = [FeatureTap(m, hints.points) for m in self.models]
            self.teacher_tap = FeatureTap(self.teacher, hints.points)
            if hints.kind == "stages":
                self.adapters = [identity_adapters(m, hints.points, hints.example.to(device)) for m in self.models]
        # distill.method: hsakd: every model gets auxiliary heads, started from the pretrained
        # teacher's and trained with the shared weights; each matches the heads of the model above
        self.hsakd = hsakd
        self.aux_heads: list[nn.ModuleList] = []
        if hsakd is not None:
            self.taps = [FeatureTap(m, hsakd.points) for m in self.models]
            self.teacher_tap = FeatureTap(self.teacher, hsakd.points)
            self.aux_heads = [student_heads(hsakd.teacher_heads) for _ in self.models]

    # ---------------------------------------------------------------- masks
    def _solve(self, i: int) -> torch.Tensor:
        if self.scores[i] is None:
            return torch.ones(self.index.num_units, device=self.device)
        return self.solver.solve(self.scores[i], self.budgets[i]).to(self.device)

    def refresh_masks(self) -> None:
        self.state.hard_masks = [self._solve(i) for i in range(len(self.models))]

    def _mask_vector(self, j: int) -> torch.Tensor:
        """What model j's hooks multiply by, and therefore which scores its loss trains."""
        hard = self.state.hard_masks[j]
        if self.frozen:
            return hard
        if self.cascade_update:
            learner = self.scores[j - 1] if j > 0 else None  # Eq. 5: T_j's pass trains T_{j-1}'s scores
        else:
            learner = self.scores[j]  # plain straight-through on the model's own loss
        return hard if learner is None else hard + learner - learner.detach()

    def freeze_due(self, steps_done: int) -> bool:
        return self.freeze_at is not None and steps_done >= self.freeze_at

    def freeze(self, *, callback: bool = True) -> None:
        """Fix every model's mask from now on (``callback=False``: a resumed run whose BatchNorm
        statistics were already recalibrated before the checkpoint)."""
        if self.frozen:
            return
        if callback and self.before_freeze is not None:
            self.before_freeze()
        self.refresh_masks()
        self.frozen = True
        if callback and self.on_freeze is not None:
            self.on_freeze()

    def set_student_budget(self, budget: Budget) -> None:
        """A new budget for the student (model 0); the TAs keep theirs."""
        self.budgets[0] = budget
        self.state.budgets[0] = budget

    def use_hard_masks(self) -> None:
        for j, masks in enumerate(self.masks):
            masks.set(self.state.hard_masks[j])

    def recalibrate(self, loader: DataLoader, batches: int) -> None:
        """BatchNorm statistics of every model, re-estimated under its current hard mask."""
        self.use_hard_masks()
        for model in self.models:  # HSAKD trained on rotated batches: its statistics describe those
            net = Rotated(model) if self.hsakd is not None else model
            recalibrate_batchnorm(net, loader, device=self.device, limit=batches)

    @property
    def names(self) -> list[str]:
        """How logs, the manifest and the report name the models: student, TA1, TA2, ..."""
        return ["student", *(f"TA{j}" for j in range(1, len(self.models)))]

    def evaluate_models(self, loader: DataLoader) -> list[float]:
        """Accuracy of every model (student first) under its current hard mask."""
        self.use_hard_masks()
        return [
            evaluate(m, loader, device=self.device, description=f"evaluate {n}")
            for n, m in zip(self.names, self.models)
        ]

    # ---------------------------------------------------------------- joint phase
    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        seen, weights = set(), []
        for model in [*self.models, *self.adapters, *self.aux_heads]:
            for p in model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    weights.append(p)
        return weights, [s for s in self.scores if s is not None]

    def joint_loss(
        self, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime | None = None
    ) -> tuple[list[float], torch.Tensor]:
        """Forward every model, top first (each model's teacher is the one above); the summed loss."""
        autocast = runtime.autocast() if runtime is not None else nullcontext()
        hsakd = self.hsakd
        if hsakd is not None:
            images = rotate_batch(images)
        with autocast:
            with torch.no_grad():
                upper_logits = self.teacher(images)
                if hsakd is not None:
                    upper_aux = aux_logits(hsakd.teacher_heads, self.teacher_tap.features, hsakd.points)
            teacher_features = upper_features = self.teacher_tap.features if self.teacher_tap is not None else {}
            losses, total = [], 0.0
            for j in reversed(range(len(self.models))):
                self.masks[j].set(self._mask_vector(j))
                logits = self.models[j](images)
                if hsakd is not None:
                    aux = aux_logits(self.aux_heads[j], self.taps[j].features, hsakd.points)
                    loss_j = hsakd_loss(logits.float(), labels, upper_logits.float(), aux, upper_aux, hsakd.weights)
                    upper_aux = [a.detach() for a in aux]
                else:
                    loss_j = self.loss(logits.float(), labels, upper_logits.float())
                if self.hints is not None:
                    stages = self.hints.kind == "stages"  # stages: the pretrained network; paper: the model above
                    loss_j = loss_j + self.hints.weight * hint_loss(
                        self.taps[j].features,
                        teacher_features if stages else upper_features,
                        self.hints.points,
                        self.adapters[j] if stages else None,
                    )
                    upper_features = {k: v.detach() for k, v in self.taps[j].features.items()}
                total = total + loss_j
                losses.append(loss_j.item())
                upper_logits = logits.detach()
        return list(reversed(losses)), total

    def joint_step(self, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One forward + backward (no optimiser step): what the tests and a single process use."""
        losses, total = self.joint_loss(images, labels)
        check_finite(total, "joint phase")
        total.backward()
        return losses

    # ---------------------------------------------------------------- checkpoint state
    def checkpoint_state(self) -> dict:
        """The hierarchy's trainable state: unique shared+own weights, each model's buffers
        (BatchNorm statistics), the scores. Masks are not stored: they are solved from scores."""
        weights, _ = self.parameters()
        return {
            "weights": list(weights),
            "buffers": [dict(m.named_buffers()) for m in self.models],
            "scores": [s for s in self.scores],
            # a refined student budget (latency targets) must survive a resume past the freeze
            "budget_fractions": [b.keep_fraction for b in self.budgets],
        }

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> None:
        weights, _ = self.parameters()
        if len(state["weights"]) != len(weights) or len(state["buffers"]) != len(self.models):
            raise UserError(
                "checkpoint does not match this model/recipe (different hierarchy); delete RUN/checkpoints to restart"
            )
        for param, saved in zip(weights, state["weights"]):
            param.copy_(saved)
        for model, saved in zip(self.models, state["buffers"]):
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
        for score, saved in zip(self.scores, state["scores"]):
            if score is not None:
                score.copy_(saved)
        for j, fraction in enumerate(state.get("budget_fractions") or []):
            if abs(fraction - self.budgets[j].keep_fraction) > 1e-12:
                self.budgets[j] = self.state.budgets[j] = self.budgets[j].scaled(fraction, self.solver.cost)
        self.refresh_masks()

    def joint_epoch(
        self,
        loader: DataLoader,
        weight_opt,
        score_opt,
        scheduler,
        *,
        max_steps: int | None,
        epoch: int,
        runtime: Runtime | None = None,
        start_step: int = 0,
        partial: dict | None = None,
        save: Callable[[int, int, dict], None] | None = None,
        score_scheduler=None,
    ) -> dict:
        """One joint epoch from ``start_step`` (a resumed run), ``partial`` carrying the sums of
        the steps already done. ``save(epoch, next_step, partial)`` writes a mid-epoch
        checkpoint when one is due and when a stop (Ctrl-C) was requested. The weights'
        ``scheduler`` counts the joint steps done, which decides when the masks freeze."""
        runtime = runtime or Runtime(self.device)
        for m in self.models:
            m.train()
        steps = steps_in(loader, max_steps)
        first = position(loader, epoch, "joint", start_step)
        partial = partial or {}
        sums, seen, images_seen = partial.get("sums"), partial.get("steps", 0), partial.get("images", 0)
        prior_seconds, start = partial.get("seconds", 0.0), time.perf_counter()
        weights, score_params = self.parameters()
        with runtime.overlapped_sync([*weights, *score_params]), Status(f"joint epoch {epoch}", steps) as status:
            for step, (images, labels) in enumerate(loader, start=first):
                if step >= steps:
                    break
                images, labels = runtime.batch(images, labels)
                moving = not self.frozen
                weight_opt.zero_grad(set_to_none=True)
                if score_opt is not None:
                    score_opt.zero_grad(set_to_none=True)
                losses, total = self.joint_loss(images, labels, runtime)
                stop = check_step(runtime, total, "joint phase")
                runtime.backward_step(
                    total, [weight_opt, score_opt if moving else None], [*weights, *(score_params if moving else [])]
                )
                scheduler.step()
                if moving:
                    if score_scheduler is not None:
                        score_scheduler.step()
                    self.refresh_masks()
                    if self.freeze_due(scheduler.last_epoch):
                        self.freeze()
                sums = losses if sums is None else [a + b for a, b in zip(sums, losses)]
                seen += 1
                images_seen += images.size(0) * runtime.dist.world_size
                status.advance("loss " + " ".join(f"{x / seen:.3f}" for x in sums))
                if save is not None and (stop or runtime.due(step + 1, steps)):
                    save(
                        epoch,
                        step + 1,
                        {
                            "sums": sums,
                            "steps": seen,
                            "images": images_seen,
                            "seconds": prior_seconds + time.perf_counter() - start,
                        },
                    )
                if stop:
                    raise KeyboardInterrupt
        runtime.dist.sync_state(
            [*self.models, *self.adapters, *self.aux_heads], [s for s in self.scores if s is not None]
        )
        if not self.frozen:
            self.refresh_masks()
        elapsed = prior_seconds + time.perf_counter() - start
        return {
            "epoch": epoch,
            "losses": [x / max(seen, 1) for x in (sums or [])],
            "seconds": elapsed,
            "steps": seen,
            "images": images_seen,
            "images_per_s": images_seen / max(elapsed, 1e-9),
        }

    # ---------------------------------------------------------------- student phase
    def release(self) -> None:
        """Remove the joint phase's hooks, so copies made afterwards carry none of them."""
        for masks in self.masks:
            masks.remove()
        for tap in [*self.taps, *([self.teacher_tap] if self.teacher_tap is not None else [])]:
            tap.remove()

    def frozen_model(self, j: int, example: torch.Tensor | None = None) -> nn.Module:
        """An independent copy of model j with its final hard mask baked into fresh hooks, or,
        given an ``example`` input, physically shrunk to that mask (the same function at its
        width's cost: what a TA teaching the student phase needs when nothing reads its features)."""
        self.release()
        clone = copy.deepcopy(self.models[j]).eval()
        mask = self.state.hard_masks[j].detach().clone()
        if example is not None:  # traced on the model's device (the stage's example is on the CPU)
            clone = shrink(clone, self.index, mask.cpu(), example.to(next(clone.parameters()).device))
        else:
            ChannelMasks(clone, self.index).install().set(mask)
        for p in clone.parameters():
            p.requires_grad_(False)
        return clone

    def frozen_heads(self, j: int) -> nn.ModuleList | None:
        """Model j's HSAKD heads as a teacher's (eval mode, no gradient); None without HSAKD."""
        return frozen_heads(self.aux_heads[j]) if self.aux_heads else None

    def extract_student(self) -> tuple[nn.Module, torch.Tensor]:
        """The student with its own copy of the weights and its final (frozen) mask."""
        self.release()
        return copy.deepcopy(self.models[0]), self.state.hard_masks[0].detach().clone()
