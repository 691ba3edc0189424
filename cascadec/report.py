"""report.json (for machines) and report.md (for people), from one nested dict.

The JSON keys are a contract read by later checks and CI:
``teacher.{flops,params,accuracy}``, ``student.{...}``,
``parity.<backend>.{max_abs_diff,top1_agreement,passed,...}`` and
``latency.<backend>.<teacher|student>.<batch>.{p50_ms,p90_ms,p99_ms,throughput,...}``
with batch keys as strings. FLOPs are MACs, accuracy a fraction in [0, 1].
Every section is optional, because a report is rewritten after each stage and
must render before latency (or parity) exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascadec.envinfo import environment
from cascadec.fileio import write_text_atomic
from cascadec.plots import write_run_plots
from cascadec.profile.results import ProfileResult
from cascadec.prune.method import get_method
from cascadec.report_render import render_markdown, to_jsonable
from cascadec.run import RunDir
from cascadec.verify.results import ParityResult


def write_report(run_dir: str | os.PathLike[str], report: Mapping) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``run_dir``; returns both paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    write_text_atomic(json_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_text_atomic(md_path, render_markdown(data))
    return json_path, md_path


def build_report(run: RunDir) -> dict:
    """Assemble report.json from the manifest; the keys are a fixed contract (docs/run-directory.md)."""
    m = run.manifest["metrics"]
    recipe = run.recipe()
    method = get_method(recipe.prune.method)
    report: dict[str, Any] = {
        "run": {
            "dir": str(run.path),
            "model": recipe.model.name,
            "recipe": recipe.name,
            "method": recipe.prune.method,
            "target": recipe.prune.target.model_dump(exclude_none=True),
            "target_description": method.target_description(recipe),
            "data": recipe.data.name,
            "stages": {k: v.get("seconds") for k, v in run.manifest["stages"].items()},
        },
        "teacher": {
            "flops": m.get("teacher.flops"),
            "params": m.get("teacher.params"),
            "accuracy": m.get("teacher.accuracy"),
        },
        "student": {
            "flops": m.get("student.flops"),
            "params": m.get("student.params"),
            "accuracy": m.get("student.accuracy"),
        },
        "environment": environment(),
        "versions": run.manifest.get("versions", {}),
    }
    if m.get("teacher.flops") and m.get("student.flops"):
        report["student"]["flops_reduction"] = 1 - m["student.flops"] / m["teacher.flops"]
        report["student"]["params_reduction"] = 1 - m["student.params"] / m["teacher.params"]
    report["student"].update(method.student_report(m))
    parity = m.get("parity")
    if parity:
        result = ParityResult.from_dict(parity)
        report["parity"] = {name: b.to_dict() for name, b in result.backends.items()}
        report["parity_samples"] = result.samples
        report["parity_torch_accuracy"] = result.torch_accuracy
    # one node per profiled backend, onnxruntime (the compress stage's) first
    profiled = sorted(
        (k.split(".", 1)[1] for k, v in m.items() if k.startswith("latency.") and isinstance(v, dict)),
        key=lambda b: (b != "onnxruntime", b),
    )
    if profiled:
        results = {b: ProfileResult.from_dict(b, m[f"latency.{b}"]) for b in profiled}
        report["latency"] = {b: r.timings() for b, r in results.items()}
        report["speedup"] = {b: r.speedup for b, r in results.items()}
        report["speedup_rounds"] = {b: r.rounds.get("student", {}) for b, r in results.items()}
        for name in method.extra_model_labels:  # the method's networks timed beside the student
            rounds = {b: r.rounds[name] for b, r in results.items() if name in r.rounds}
            if rounds:
                report[f"{name}_speedup_rounds"] = rounds
    if m.get("prune.latency"):
        report["latency_prediction"] = m["prune.latency"]
    if m.get("latency_target"):
        report["latency_target"] = m["latency_target"]
    if m.get("quantize"):
        report["quantize"] = m["quantize"]
    history = m.get("prune.history")
    if history:
        report["prune"] = history_summary(history, method.history_keys)
    return report


def history_summary(history: dict, method_keys: tuple[str, ...] = ()) -> dict:
    """What report.json keeps of the prune stage's history: the ladder, timings and per-epoch
    records, and the method's own keys (``PruneMethod.history_keys``)."""
    out = {
        k: history[k]
        for k in (
            "fractions",
            "joint_seconds",
            "mask_changed_units",
            "seconds",
            "ladder",
            "freeze_step",
            "joint_steps",
            "compensation",
            "latency_refine",
            *method_keys,
        )
        if k in history
    }
    if history.get("joint"):
        out["joint_epochs"] = [
            {k: e.get(k) for k in ("epoch", "accuracies", "mask_changes", "frozen", "seconds")}
            for e in history["joint"]
        ]
    for phase in ("student", "fine_tune"):
        if history.get(phase):
            out[f"{phase}_epochs"] = [
                {k: e[k] for k in ("epoch", "teacher", "student_accuracy", "seconds", "kept") if k in e}
                for e in history[phase]
            ]
    return out


def write_run_report(run: RunDir) -> dict:
    """report.json, report.md and latency.png of a run, from its manifest; returns the report."""
    report = build_report(run)
    write_report(run.path, report)
    write_run_plots(run.path, report)  # latency.png; logs instead of failing
    return report
