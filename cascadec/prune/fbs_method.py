"""``prune.method: fbs``: dynamic channel gating per image (fbs.py holds the gates).

Nothing is removed, so the stages do not shrink the student; what FBS saves exists only where
a runtime skips channels per image, so the run also records the MACs per image such a runtime
would compute, and exports and times a static student of the same MACs beside the gated one
(untrained: for latency only). The report and ``cascadec inspect`` say both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cascadec.errors import UserError, first_line
from cascadec.formatting import fmt_flops, ratio_change
from cascadec.progress import log
from cascadec.prune.cost import count_macs
from cascadec.prune.fbs import build_started, effective_macs, gated_student, install_gates, static_equivalent
from cascadec.prune.method import ExtraModel, PruneContext, PruneMethod, PruneOutcome, register_method
from cascadec.prune.methods import fine_tuned

STATIC_EQUIVALENT = "static_equivalent"  # an untrained static student of the same MACs per image
EFFECTIVE_METRIC = "student.effective_flops"
EFFECTIVE_LABEL = "FLOPs per image if gated channels are skipped (FBS)"
STATIC_LABEL = "Static student, same MACs:"
NOTE = (
    "FBS keeps every channel and chooses per image which ones to compute: the saving in the row 'if gated "
    "channels are skipped' is realised only by a runtime that skips channels per image. ONNX Runtime and TensorRT compute dense "
    "convolutions, so the FLOPs row and the measured latency are what they run. The static student's rows "
    "time a statically pruned network (global L1 widths, untrained: latency only) of the FBS student's MACs "
    "per image on the same backend, in its Student column."
)


@register_method
class Fbs(PruneMethod):
    """FBS: the teacher with saliency gates (a deterministic start, so a resumed run rebuilds it
    and loads its checkpoint), trained like a one-shot student; the outcome's ``mask`` is None:
    nothing is removed, the gates choose channels per image."""

    name = "fbs"
    description = "dynamic channel gating per image (saves arithmetic only where a runtime skips channels)"
    extra_model_labels = {STATIC_EQUIVALENT: STATIC_LABEL}

    def run(self, ctx: PruneContext) -> PruneOutcome:
        start = time.perf_counter()
        recipe = ctx.recipe
        if "target" in recipe.prune.model_fields_set:
            log(f"FBS: prune.target ({recipe.prune.target.describe()}) is not used; the budget is prune.fbs.keep")
        resume = ctx.runtime.load("student") if ctx.runtime is not None else None
        student, report = build_started(ctx.teacher, recipe.prune.fbs.keep)
        outcome = fine_tuned(ctx, student.to(ctx.device), None, resume, start, {"fbs": report})
        outcome.spec = {"fbs": {k: report[k] for k in ("keep", "gated")}}
        return outcome

    # ------------------------------------------------------------ stages
    def target_description(self, recipe: Any) -> str:
        return f"FBS gates keeping {recipe.prune.fbs.keep:g} of the channels per image"

    def finish_metrics(self, metrics: dict[str, Any], student: nn.Module, val_loader: Any, device: Any) -> None:
        # FBS has no static target: its budget is prune.fbs.keep
        metrics.pop("prune.target_fraction", None)
        metrics.pop("prune.target_metric", None)
        counted = effective_macs(student, val_loader, device=device)
        metrics[EFFECTIVE_METRIC] = counted["effective_macs"]
        log(
            f"FBS: {counted['effective_macs'] / metrics['teacher.flops']:.1%} of the teacher's MACs per image where "
            f"a runtime skips the gated channels; dense backends compute {metrics['student.flops'] / metrics['teacher.flops']:.1%}"
        )

    def extra_models(self, teacher: nn.Module, sample: torch.Tensor, metrics: Mapping[str, Any]) -> list[ExtraModel]:
        effective = metrics.get(EFFECTIVE_METRIC)
        if effective is None:
            return []
        try:
            static = static_equivalent(teacher, sample, effective)
        except (UserError, RuntimeError, ValueError, IndexError) as exc:  # for timing only: never fatal
            log(f"FBS: no static student of the same MACs to time beside it ({first_line(exc)})")
            return []
        return [ExtraModel(STATIC_EQUIVALENT, static, {"flops": count_macs(static, sample), "trained": False})]

    def student_report(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        # per image, where a runtime skips gated channels
        return {"effective_flops": metrics[EFFECTIVE_METRIC]} if metrics.get(EFFECTIVE_METRIC) is not None else {}

    def restore_student(self, model: nn.Module, spec: Mapping[str, Any], path: Path) -> None:
        """The FBS gates a student was saved with, before its weights load."""
        fbs = spec.get("fbs")
        if fbs is None:
            return
        try:
            keep = float(fbs["keep"])
            pairs = [(str(conv), str(norm)) for conv, norm in fbs["gated"]]
            if not 0 < keep <= 1:
                raise ValueError(f"keep {keep} outside (0, 1]")
            install_gates(model, pairs, keep, initialise=False)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: fbs gates do not fit model ({first_line(exc)})") from None

    # ------------------------------------------------------------ report
    def summary_rows(self, report: Mapping[str, Any]) -> list[list[str]]:
        """FBS computes every channel on dense backends (the FLOPs row); this is what a runtime that
        skips the channels its gates suppress would compute, averaged over the validation images."""
        t, s = report.get("teacher") or {}, report.get("student") or {}
        e = s.get("effective_flops")
        if e is None:
            return []
        return [[EFFECTIVE_LABEL, fmt_flops(t.get("flops")), fmt_flops(e), ratio_change(t.get("flops"), e)]]

    def report_notes(self, report: Mapping[str, Any]) -> list[str]:
        return [NOTE] if (report.get("student") or {}).get("effective_flops") is not None else []

    # ------------------------------------------------------------ inspect
    def preview(self, model: nn.Module, example: torch.Tensor, recipe: Any) -> dict[str, Any]:
        """What will be gated, and the MACs per image at the start (every image keeps the same
        channels there; training makes the choice image-dependent)."""
        keep = recipe.prune.fbs.keep
        gated, pairs = gated_student(model, keep)
        start = effective_macs(gated, [(example.repeat(2, 1, 1, 1).normal_(), None)], device=example.device)
        return {
            "keep": keep,
            "gated": len(pairs),
            "dense_flops": count_macs(gated, example),
            "start_effective_flops": start["effective_macs"],
            "note": "dense backends (ONNX Runtime, TensorRT) compute every channel; the saving needs a runtime "
            "that skips channels per image",
        }

    def preview_lines(self, preview: Mapping[str, Any], inspected: Mapping[str, Any]) -> list[str]:
        return [
            f"FBS: {preview['gated']} convolutions gated, ceil({preview['keep']:g} x C) output channels per image; "
            f"{fmt_flops(preview['start_effective_flops'])} per image at the start "
            f"({preview['start_effective_flops'] / inspected['flops']:.1%} of FLOPs) where gated channels are "
            f"skipped, {fmt_flops(preview['dense_flops'])} on dense backends; {preview['note']}"
        ]
