"""report.md (for people) and the console summary, rendered from report.json's dict.

Every section is optional, because a report is rewritten after each stage and must render
before latency (or parity) exists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table

from cascadec.errors import UserError
from cascadec.formatting import (
    MISSING,
    accuracy_change,
    as_number,
    fmt_accuracy,
    fmt_float,
    fmt_flops,
    fmt_ms,
    fmt_ms_label,
    fmt_params,
    get_path,
    ratio_change,
    speedup,
    speedup_range,
)
from cascadec.profile.results import ProfileResult
from cascadec.prune.method import PruneMethod, get_method
from cascadec.quantize.present import quantize_md, quantize_summary_rows
from cascadec.verify.present import conditioning_verdict, float64_verdict


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


def _method(report: Mapping) -> PruneMethod:
    """The run's pruning method, whose hooks add its own rows and notes; the neutral base for a
    report without one (or from a method this installation does not know)."""
    name = (report.get("run") or {}).get("method") if isinstance(report.get("run"), Mapping) else None
    try:
        return get_method(str(name)) if name else PruneMethod()
    except UserError:
        return PruneMethod()


def _summary_md(report: Mapping) -> list[str]:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    rows = [
        [
            "Accuracy",
            fmt_accuracy(t.get("accuracy")),
            fmt_accuracy(s.get("accuracy")),
            accuracy_change(t.get("accuracy"), s.get("accuracy")),
        ],
        ["FLOPs", fmt_flops(t.get("flops")), fmt_flops(s.get("flops")), ratio_change(t.get("flops"), s.get("flops"))],
        [
            "Params",
            fmt_params(t.get("params")),
            fmt_params(s.get("params")),
            ratio_change(t.get("params"), s.get("params")),
        ],
    ]
    method = _method(report)
    rows[2:2] = method.summary_rows(report)  # after FLOPs
    for key in ("name", "model"):
        if t.get(key) or s.get(key):
            rows.insert(0, ["Model", t.get(key, MISSING), s.get(key, MISSING), ""])
            break
    rows += _latency_summary_rows(report)
    lines = ["## Summary", ""] + _md_table(["", "Teacher", "Student", "Change"], rows)
    for note in method.report_notes(report):
        lines += ["", note, ""]
    return lines


def _parity_md(parity: Mapping) -> list[str]:

    # Tolerances follow Polygraphy: an element fails when |diff| > atol and |diff|/|ref| > rtol;
    # "min atol/rtol to pass" is what each alone would need (Polygraphy's "Minimum Required Tolerance").
    header = [
        "Backend",
        "Precision",
        "Samples",
        "Max abs diff",
        "Mean abs diff",
        "Max rel diff",
        "atol / rtol",
        "Min atol to pass",
        "Min rtol to pass",
        "Top-1 agree",
        "Top-5 agree",
        "Accuracy",
        "Result",
    ]
    rows, failures, judged = [], [], []
    for name, r in parity.items():
        if not isinstance(r, Mapping):
            continue
        passed = r.get("passed")
        rows.append(
            [
                name,
                r.get("precision", MISSING),
                r.get("samples", MISSING),
                fmt_float(r.get("max_abs_diff")),
                fmt_float(r.get("mean_abs_diff")),
                fmt_float(r.get("max_rel_diff")),
                f"{fmt_float(r.get('atol'))} / {fmt_float(r.get('rtol'))}",
                fmt_float(r.get("min_atol_to_pass")),
                fmt_float(r.get("min_rtol_to_pass")),
                fmt_accuracy(r.get("top1_agreement")),
                fmt_accuracy(r.get("top5_agreement")),
                fmt_accuracy(r.get("accuracy")),
                MISSING if passed is None else ("PASS" if passed else "FAIL"),
            ]
        )
        failures += [f"- **{name}**: {f.get('message', f)}" for f in r.get("failures") or [] if isinstance(f, Mapping)]
        found = r.get("first_divergence")
        if isinstance(found, Mapping):
            if found.get("node"):
                module = f", PyTorch module `{found['torch_module']}`" if found.get("torch_module") else ""
                failures.append(
                    f"- **{name}**: first divergent layer: ONNX node `{found['node']}` ({found.get('op_type')}"
                    f"{module}), max abs diff {fmt_float(found.get('max_abs_diff'))} vs {found.get('reference')}"
                )
            else:
                failures.append(f"- **{name}**: first divergent layer not found: {found.get('error', MISSING)}")
        verdict = conditioning_verdict(name, r.get("conditioning"))
        if verdict:
            (failures if not passed else judged).append(f"- **{name}**: conditioning: {verdict}")
        verdict = float64_verdict(name, r.get("float64_judgement"))
        if verdict:
            (failures if not passed else judged).append(f"- **{name}**: {verdict}")
    lines = ["## Parity (candidate vs PyTorch)", ""] + _md_table(header, rows)
    if judged:
        lines += ["Judged against float64 (the network is ill-conditioned in float32):", "", *judged, ""]
    return lines + (["Gate failures:", "", *failures, ""] if failures else [])


def _models(per_model: Mapping) -> list[str]:
    """Model rows of one backend's latency node, teacher and student first; protocol/note aren't models."""
    names = list(ProfileResult.from_dict("", per_model).models)
    return sorted(names, key=lambda k: (k != "teacher", k != "student", k))


def _protocol_line(protocol: Any) -> str:
    if not isinstance(protocol, Mapping):
        return ""
    threads = protocol.get("threads")
    parts = [
        f"device {protocol.get('device', MISSING)}",
        f"warm-up {fmt_float(protocol.get('warmup_s'), 'g')} s",
        f"then at least {fmt_float(protocol.get('duration_s'), 'g')} s and {protocol.get('min_iters', MISSING)} runs",
        f"threads {'library default' if threads is None else threads}",
        f"timer {protocol.get('timer', MISSING)}",
    ]
    if protocol.get("cuda_graph"):
        parts.append("CUDA graph replay")
    if (protocol.get("rounds") or 1) > 1:
        parts.append(f"teacher and student alternated in {protocol['rounds']} rounds, statistics over all rounds' runs")
    line = "Protocol: " + "; ".join(parts) + "."
    return line + (f" Note: {protocol['note']}." if protocol.get("note") else "")


def _latency_md(latency: Mapping, rounds: Mapping | None = None) -> list[str]:
    """One table per backend: the spread (p50/p90/p99) and, on GPUs, host latency vs GPU compute."""
    lines = [
        "## Latency",
        "",
        "Speed-up = teacher p50 / student p50 at the same batch size (in brackets: the lowest and highest "
        "speed-up of the single rounds). Throughput = batch x 1000 / mean (inferences/s).",
        "",
    ]
    for backend, per_model in latency.items():
        if not isinstance(per_model, Mapping):
            continue
        models = _models(per_model)
        split = any(
            isinstance(get_path(per_model.get(m), b), Mapping) and "compute_p50_ms" in get_path(per_model.get(m), b)
            for m in models
            for b in _batches(per_model.get(m))
        )
        header = ["Model", "Batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "Runs", "Throughput (img/s)"]
        if split:
            header += ["GPU compute p50 ms", "GPU compute p99 ms", "Host - compute p50 ms"]
        header.append("Speed-up")
        teacher = per_model.get("teacher") if isinstance(per_model.get("teacher"), Mapping) else {}
        backend_rounds = (rounds or {}).get(backend) if isinstance((rounds or {}).get(backend), Mapping) else {}
        rows = []
        for model_name in models:
            table = per_model.get(model_name)
            for batch in _batches(table):
                row = get_path(table, batch) or {}
                speed = speedup(get_path(teacher, batch), row) if model_name == "student" else None
                cells = [
                    model_name,
                    batch,
                    fmt_ms(row.get("p50_ms")),
                    fmt_ms(row.get("p90_ms")),
                    fmt_ms(row.get("p95_ms")),
                    fmt_ms(row.get("p99_ms")),
                    fmt_ms(row.get("mean_ms")),
                    row.get("iterations", MISSING),
                    fmt_float(row.get("throughput"), ".1f"),
                ]
                if split:
                    host, compute = (
                        as_number(row.get("host_p50_ms", row.get("p50_ms"))),
                        as_number(row.get("compute_p50_ms")),
                    )
                    cells += [
                        fmt_ms(compute),
                        fmt_ms(row.get("compute_p99_ms")),
                        MISSING if host is None or compute is None else fmt_ms(host - compute),
                    ]
                spread = speedup_range(get_path(backend_rounds, batch)) if speed is not None else ""
                rows.append(cells + [MISSING if speed is None else f"{speed:.2f}x {spread}".strip()])
        lines += [f"### {backend}", ""]
        protocol = _protocol_line(per_model.get("protocol"))
        if protocol:
            lines += [protocol, ""]
        if per_model.get("note"):
            lines += [f"Note: {per_model['note']}", ""]
        if split:
            lines += [
                "Latency columns are host latency (H2D copy + compute + D2H copy, what a caller waits for, "
                'trtexec\'s "Latency"); GPU compute is CUDA-event time around the inference on its stream '
                '(trtexec\'s "GPU Compute Time").',
                "",
            ]
        lines += _md_table(header, rows)
    return lines


def _environment_md(env: Mapping) -> list[str]:
    labels = {
        "cuda": "cuda (the CUDA runtime torch was built with)",
        "torch_threads": "torch_threads (intra-op)",
        "usable_cpus": "usable_cpus (affinity)",
    }
    rows = [
        [labels.get(k, k), MISSING if v is None else (", ".join(map(str, v)) if isinstance(v, list) else v)]
        for k, v in env.items()
        if not isinstance(v, Mapping)
    ]
    for section, values in env.items():
        if isinstance(values, Mapping):
            rows += [
                [f"{section}.{k}" if section != "versions" else k, MISSING if v is None else v]
                for k, v in values.items()
            ]
    return ["## Environment", ""] + _md_table(["Key", "Value"], rows)


def _training_md(prune: Mapping, method: PruneMethod) -> list[str]:
    """How the student was trained: the TA ladder (loud when broken), each model's accuracy per
    joint epoch and the student epochs, all on the selection split (held-out training images)."""
    lines = ["## Training (selection split: held-out training images)", ""]
    ladder = prune.get("ladder")
    if isinstance(ladder, Mapping) and ladder.get("rungs"):
        if ladder.get("broken"):
            lines += [
                f"**WARNING: the TA ladder is broken** ({'; '.join(ladder['broken'])}): a TA less accurate than "
                "the model below it cannot teach it.",
                "",
            ]
        rows = [
            [r.get("model"), fmt_float(r.get("keep"), ".2f"), fmt_accuracy(r.get("accuracy"))] for r in ladder["rungs"]
        ]
        lines += ["TA ladder at the end of the joint phase:", ""] + _md_table(
            ["Model", "Keep (of target metric)", "Accuracy"], rows
        )
    joint = prune.get("joint_epochs")
    if joint:
        names = [r.get("model") for r in (ladder or {}).get("rungs", [])] or [
            f"model {i}" for i in range(len(joint[0].get("accuracies") or []))
        ]
        rows = [
            [
                e.get("epoch"),
                *(fmt_accuracy(a) for a in (e.get("accuracies") or [])),
                "yes" if e.get("frozen") else "no",
                ", ".join(str(c) for c in e.get("mask_changes") or []),
            ]
            for e in joint
        ]
        lines += ["Joint phase:", ""] + _md_table(["Epoch", *names, "Masks frozen", "Units changed per model"], rows)
    lines += method.training_lines(prune)
    comp = prune.get("compensation")
    if isinstance(comp, Mapping) and comp.get("layers") is not None:
        lines += [
            f"Compensation before fine-tuning: {len(comp['layers'])} layer(s) refitted in "
            f"{fmt_float(comp.get('seconds'), '.1f')} s"
            + (
                f" (mean shift not corrected after {', '.join(comp['mean_not_corrected'])}: no bias or BatchNorm)"
                if comp.get("mean_not_corrected")
                else ""
            )
            + ".",
            "",
        ]
    for phase in ("student_epochs", "fine_tune_epochs"):
        epochs = prune.get(phase)
        if epochs:
            rows = [
                [
                    "start" if e.get("epoch") == -1 else e.get("epoch"),
                    e.get("teacher") or "",
                    fmt_accuracy(e.get("student_accuracy")),
                    "yes" if e.get("kept") else "",
                ]
                for e in epochs
            ]
            title = "Student phase" if phase == "student_epochs" else "Fine-tuning"
            lines += [f"{title} (the epoch marked *kept* ships):", ""] + _md_table(
                ["Epoch", "Teacher", "Accuracy", "Kept"], rows
            )
    return lines if len(lines) > 2 else []


# prune.latency.ranking in words (LatencyModel.unit_weights)
_RANKING_WORDS = {
    "per_ms_per_flop": "per millisecond per FLOP (prune.latency.ranking: per_ms_per_flop)",
    "per_ms": "per millisecond (prune.latency.ranking: per_ms)",
    "importance": "alone (prune.latency.ranking: importance)",
}


def _latency_target_md(check: Mapping, prediction: Mapping, refine: list | None = None) -> list[str]:
    """Predicted against measured for a latency target (stages.check_latency_target), and the
    measured re-solves that set the student's budget (prune/latency_refine.py)."""
    table = prediction.get("table") or {}
    int8 = check.get("precision") == "int8"
    rows = [
        [
            "speed-up (FP32 teacher / INT8 student p50)" if int8 else "speed-up (teacher / student p50)",
            f"{check['target_speedup']:.2f}x",
            f"{check['predicted_speedup']:.2f}x",
            f"{check['measured_speedup']:.2f}x",
        ],
        ["student latency (ms)", "", f"{check['predicted_ms']:.3g}", f"{check['measured_ms']:.3g}"],
    ]
    tolerance = check.get("tolerance")
    gate = "report only" if tolerance is None else f"at most {tolerance:.0%} short of the target"
    lines = [f"## Latency target ({check['backend']}, batch {check['batch']}{', INT8' if int8 else ''})", ""]
    lines += _md_table(["", "target", "predicted", "measured"], rows)
    lines += [
        "",
        f"- prediction error: {check['prediction_error']:+.1%}; gate ({gate}): "
        f"{'passed' if check['passed'] else 'FAILED'}",
    ]
    if table:
        origin = "loaded from the cache" if table.get("cached") else f"built in {table.get('build_seconds', 0):.0f} s"
        block = table.get("channel_block", 1)
        lines.append(
            f"- latency table: {table.get('layers')} layers, {table.get('grid_points')} widths timed, {origin}; "
            + (f"latency steps every {block} channels, " if block > 1 else "latency smooth in width, ")
            + f"widths at multiples of {table.get('multiple', 8)}"
            + (f" and {table['narrow']} below them" if table.get("narrow") else "")
        )
    if prediction.get("ranking"):
        lines.append(
            f"- channels ranked by importance {_RANKING_WORDS.get(prediction['ranking'], prediction['ranking'])}"
        )
    if int8 and prediction.get("reference_ms") and prediction.get("base_ms"):
        lines.append(
            f"- timed in INT8 (prune.latency.precision): the unpruned network {prediction['reference_ms']:.3g} ms in "
            f"FP32, {prediction['base_ms']:.3g} ms in INT8 ({prediction['reference_ms'] / prediction['base_ms']:.2f}x "
            "from quantization alone); pruning supplied the rest"
        )
    if refine:
        tries = ", ".join(
            f"{t.get('deployed_speedup', t['measured_speedup']):.2f}x at budget {t['budget_fraction']:.3f}"
            + (" (kept)" if t.get("chosen") else "")
            for t in refine
        )
        lines.append(
            f"- measured before the masks were fixed (prune.latency.refine{', INT8 student' if int8 else ''}): {tries}"
        )
    return lines + [""]


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
    if isinstance(report.get("prune"), Mapping) and report["prune"]:
        lines += _training_md(report["prune"], _method(report))
    if isinstance(report.get("parity"), Mapping) and report["parity"]:
        lines += _parity_md(report["parity"])
    if isinstance(report.get("latency"), Mapping) and report["latency"]:
        lines += _latency_md(report["latency"], report.get("speedup_rounds"))
    if isinstance(report.get("quantize"), Mapping):
        lines += quantize_md(report["quantize"])
    if isinstance(report.get("latency_target"), Mapping):
        prune = report.get("prune") if isinstance(report.get("prune"), Mapping) else {}
        lines += _latency_target_md(
            report["latency_target"], report.get("latency_prediction") or {}, prune.get("latency_refine")
        )
    if isinstance(report.get("environment"), Mapping) and report["environment"]:
        lines += _environment_md(report["environment"])
    return "\n".join(lines).rstrip() + "\n"


def summary_table(report: Mapping) -> Table:
    """The CLI's end-of-run table: what was gained, and whether the deployed model is faithful."""
    report = to_jsonable(report)
    t, s = report.get("teacher") or {}, report.get("student") or {}
    table = Table(title="cascadec summary")
    for col, justify in (("", "left"), ("Teacher", "right"), ("Student", "right"), ("Change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_row(
        "Accuracy",
        fmt_accuracy(t.get("accuracy")),
        fmt_accuracy(s.get("accuracy")),
        accuracy_change(t.get("accuracy"), s.get("accuracy")),
    )
    table.add_row(
        "FLOPs", fmt_flops(t.get("flops")), fmt_flops(s.get("flops")), ratio_change(t.get("flops"), s.get("flops"))
    )
    for row in _method(report).summary_rows(report):
        table.add_row(*row)
    table.add_row(
        "Params",
        fmt_params(t.get("params")),
        fmt_params(s.get("params")),
        ratio_change(t.get("params"), s.get("params")),
    )
    for name, r in (report.get("parity") or {}).items():
        if not isinstance(r, Mapping):
            continue
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]"}.get(r.get("passed"), MISSING)
        detail = f"max|Δ| {fmt_float(r.get('max_abs_diff'))}, top-1 {fmt_accuracy(r.get('top1_agreement'))}"
        table.add_row(f"Parity ({name})", "", detail, verdict)
    for row in _latency_summary_rows(report):
        table.add_row(*row)
    if isinstance(report.get("quantize"), Mapping):
        for row in quantize_summary_rows(report["quantize"]):
            table.add_row(*row)
    return table


def _latency_summary_rows(report: Mapping) -> list[list[str]]:
    """Teacher/student p50 and the speed-up per backend and batch, for both summaries."""
    rows = []
    for backend, node in (report.get("latency") or {}).items():
        if not isinstance(node, Mapping):
            continue
        teacher_lat = node.get("teacher") if isinstance(node.get("teacher"), Mapping) else {}
        # "CPU latency" for the compress stage's onnxruntime rows, as the README's demo output shows
        what = "CPU latency" if backend == "onnxruntime" else f"{backend} latency"
        timed = [("student", "speedup_rounds", what)] + [
            (name, f"{name}_speedup_rounds", f"{label} {what}")  # the method's networks timed beside the student
            for name, label in _method(report).extra_model_labels.items()
        ]
        for key, rounds_key, label in timed:
            other = node.get(key)
            if not isinstance(other, Mapping):
                continue
            rounds = (report.get(rounds_key) or {}).get(backend)
            rounds = rounds if isinstance(rounds, Mapping) else {}
            for batch in _batches({**teacher_lat, **other}):
                teacher_row, student_row = get_path(teacher_lat, batch), get_path(other, batch)
                speed = speedup(teacher_row, student_row)
                change = (
                    MISSING if speed is None else f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
                )
                spread = speedup_range(get_path(rounds, batch)) if speed is not None else ""
                rows.append(
                    [
                        f"{label} p50 (bs={batch})",
                        fmt_ms_label(teacher_row),
                        fmt_ms_label(student_row),
                        f"{change} {spread}".strip(),
                    ]
                )
    return rows
