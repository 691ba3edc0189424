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

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

MISSING = "—"


def to_jsonable(obj: Any) -> Any:
    """Make the report JSON-safe: string keys (batch 1 -> "1"), plain numbers, lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _get(report: Mapping, dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part, node.get(int(part)) if part.isdigit() else None)
    return node


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else None


def fmt_accuracy(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{100 * v:.2f}%"


def fmt_flops(value: Any) -> str:
    """MACs as MMac/GMac, the unit ptflops and the pruning papers use."""
    v = _num(value)
    if v is None:
        return MISSING
    return f"{v / 1e9:.2f} GMac" if v >= 1e9 else f"{v / 1e6:.2f} MMac"


def fmt_params(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{v / 1e6:.2f} M"


def fmt_float(value: Any, spec: str = ".3g") -> str:
    v = _num(value)
    return MISSING if v is None else format(v, spec)


def fmt_ms(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{v:.3f}"


def _ratio_change(teacher: Any, student: Any) -> str:
    t, s = _num(teacher), _num(student)
    if t is None or s is None or t <= 0:
        return MISSING
    factor = f" ({t / s:.2f}x smaller)" if s > 0 else ""
    return f"{100 * (s - t) / t:+.1f}%{factor}"


def _accuracy_change(teacher: Any, student: Any) -> str:
    t, s = _num(teacher), _num(student)
    return MISSING if t is None or s is None else f"{100 * (s - t):+.2f} pp"


def _speedup(teacher_row: Any, student_row: Any) -> float | None:
    t, s = _num(_get(teacher_row or {}, "p50_ms")), _num(_get(student_row or {}, "p50_ms"))
    return t / s if t is not None and s else None


def _batches(node: Any) -> list[str]:
    if not isinstance(node, Mapping):
        return []
    keys = [str(k) for k in node]
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _summary_md(report: Mapping) -> list[str]:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    rows = [
        ["Accuracy", fmt_accuracy(t.get("accuracy")), fmt_accuracy(s.get("accuracy")),
         _accuracy_change(t.get("accuracy"), s.get("accuracy"))],
        ["FLOPs", fmt_flops(t.get("flops")), fmt_flops(s.get("flops")), _ratio_change(t.get("flops"), s.get("flops"))],
        ["Params", fmt_params(t.get("params")), fmt_params(s.get("params")),
         _ratio_change(t.get("params"), s.get("params"))],
    ]
    for key in ("name", "model"):
        if t.get(key) or s.get(key):
            rows.insert(0, ["Model", t.get(key, MISSING), s.get(key, MISSING), ""])
            break
    return ["## Summary", ""] + _md_table(["", "Teacher", "Student", "Change"], rows)


def _parity_md(parity: Mapping) -> list[str]:
    header = ["Backend", "Samples", "Max abs diff", "Mean abs diff", "Max rel diff", "Top-1 agree",
              "Top-5 agree", "Accuracy", "Min atol to pass", "Result"]
    rows, failures = [], []
    for name, r in parity.items():
        if not isinstance(r, Mapping):
            continue
        passed = r.get("passed")
        rows.append([name, r.get("samples", MISSING), fmt_float(r.get("max_abs_diff")),
                     fmt_float(r.get("mean_abs_diff")), fmt_float(r.get("max_rel_diff")),
                     fmt_accuracy(r.get("top1_agreement")), fmt_accuracy(r.get("top5_agreement")),
                     fmt_accuracy(r.get("accuracy")), fmt_float(r.get("min_atol_to_pass")),
                     MISSING if passed is None else ("PASS" if passed else "FAIL")])
        failures += [f"- **{name}**: {f.get('message', f)}" for f in r.get("failures") or [] if isinstance(f, Mapping)]
    lines = ["## Parity (candidate vs PyTorch)", ""] + _md_table(header, rows)
    return lines + (["Gate failures:", "", *failures, ""] if failures else [])


def _latency_md(latency: Mapping) -> list[str]:
    header = ["Backend", "Model", "Batch", "p50 ms", "p90 ms", "p99 ms", "Throughput (img/s)", "Speed-up"]
    rows = []
    for backend, per_model in latency.items():
        if not isinstance(per_model, Mapping):
            continue
        teacher = per_model.get("teacher") if isinstance(per_model.get("teacher"), Mapping) else {}
        for model_name in ("teacher", "student", *[k for k in per_model if k not in ("teacher", "student")]):
            table = per_model.get(model_name)
            for batch in _batches(table):
                row = _get(table, batch) or {}
                speed = _speedup(_get(teacher, batch), row) if model_name == "student" else None
                rows.append([backend, model_name, batch, fmt_ms(row.get("p50_ms")), fmt_ms(row.get("p90_ms")),
                             fmt_ms(row.get("p99_ms")), fmt_float(row.get("throughput"), ".1f"),
                             MISSING if speed is None else f"{speed:.2f}x"])
    return ["## Latency", "", "Speed-up = teacher p50 / student p50 at the same batch size.", ""] + _md_table(
        header, rows)


def _environment_md(env: Mapping) -> list[str]:
    rows = [[k, MISSING if v is None else (", ".join(map(str, v)) if isinstance(v, list) else v)]
            for k, v in env.items() if not isinstance(v, Mapping)]
    for section, values in env.items():
        if isinstance(values, Mapping):
            rows += [[f"{section}.{k}" if section != "versions" else k, MISSING if v is None else v]
                     for k, v in values.items()]
    return ["## Environment", ""] + _md_table(["Key", "Value"], rows)


def render_markdown(report: Mapping) -> str:
    """The human-readable report; any section that is absent is simply left out."""
    lines = [f"# cascadec report{': ' + str(report['name']) if report.get('name') else ''}", ""]
    for key in ("recipe", "run_id", "created"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    if lines[-1] != "":
        lines.append("")
    if isinstance(report.get("teacher"), Mapping) or isinstance(report.get("student"), Mapping):
        lines += _summary_md(report)
    if isinstance(report.get("parity"), Mapping) and report["parity"]:
        lines += _parity_md(report["parity"])
    if isinstance(report.get("latency"), Mapping) and report["latency"]:
        lines += _latency_md(report["latency"])
    if isinstance(report.get("environment"), Mapping) and report["environment"]:
        lines += _environment_md(report["environment"])
    return "\n".join(lines).rstrip() + "\n"


def _atomic_write(path: Path, text: str) -> None:
    """Readers (a watching CI job, a resumed run) never see a half-written report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | os.PathLike[str], report: Mapping) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``run_dir``; returns both paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    _atomic_write(json_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    _atomic_write(md_path, render_markdown(data))
    return json_path, md_path


def summary_table(report: Mapping) -> Table:
    """The CLI's end-of-run table: what was gained, and whether the deployed model is faithful."""
    report = to_jsonable(report)
    t, s = report.get("teacher") or {}, report.get("student") or {}
    table = Table(title="cascadec summary")
    for col, justify in (("", "left"), ("Teacher", "right"), ("Student", "right"), ("Change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_row("Accuracy", fmt_accuracy(t.get("accuracy")), fmt_accuracy(s.get("accuracy")),
                  _accuracy_change(t.get("accuracy"), s.get("accuracy")))
    table.add_row("FLOPs", fmt_flops(t.get("flops")), fmt_flops(s.get("flops")),
                  _ratio_change(t.get("flops"), s.get("flops")))
    table.add_row("Params", fmt_params(t.get("params")), fmt_params(s.get("params")),
                  _ratio_change(t.get("params"), s.get("params")))
    for name, r in (report.get("parity") or {}).items():
        if not isinstance(r, Mapping):
            continue
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]"}.get(r.get("passed"), MISSING)
        detail = f"max|Δ| {fmt_float(r.get('max_abs_diff'))}, top-1 {fmt_accuracy(r.get('top1_agreement'))}"
        table.add_row(f"Parity ({name})", "", detail, verdict)
    cpu = _get(report, "latency.onnxruntime") or {}
    teacher_lat = cpu.get("teacher") if isinstance(cpu.get("teacher"), Mapping) else {}
    student_lat = cpu.get("student") if isinstance(cpu.get("student"), Mapping) else {}
    for batch in _batches({**teacher_lat, **student_lat}):
        speed = _speedup(teacher_lat.get(batch), student_lat.get(batch))
        table.add_row(f"CPU latency p50 (bs={batch})", _ms_label(teacher_lat.get(batch)),
                      _ms_label(student_lat.get(batch)), MISSING if speed is None else f"{speed:.2f}x faster")
    return table


def _ms_label(row: Any) -> str:
    value = _num(_get(row, "p50_ms")) if isinstance(row, Mapping) else None
    return MISSING if value is None else f"{value:.2f} ms"


__all__ = ["fmt_accuracy", "fmt_flops", "fmt_params", "render_markdown", "summary_table", "to_jsonable", "write_report"]
