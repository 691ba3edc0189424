"""The quantize stage in words: report.md's section and the summary table's rows.

Reads the ``quantize`` node of report.json (``QuantizeOutcome.to_dict``); imports nothing heavy,
so the CLI's summary can use it without loading ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cascadec.formatting import MISSING, accuracy_change, fmt_accuracy, fmt_ms, fmt_ms_label, get_path


def _points(drop: Any) -> str:
    return MISSING if not isinstance(drop, (int, float)) else f"{-100 * drop + 0.0:+.2f} pts"


def _speedup(value: Any) -> str:
    return MISSING if not isinstance(value, (int, float)) else f"{value:.2f}x"


def quantize_md(q: Mapping) -> list[str]:
    """## Quantization: files, accuracy (selection split and verify samples), float layers, speed-ups."""
    lines = ["## Quantization", ""]
    cal = q.get("calibration") or {}
    lib = q.get("library") or {}
    sel = q.get("selection") or {}
    lines.append(
        f"Precision {q.get('precision')}; calibration: {cal.get('images', MISSING)} {cal.get('split', 'train')} images, "
        f"method {cal.get('method', MISSING)} (onnxruntime.quantization {lib.get('onnxruntime', MISSING)}). "
        f"Accuracy budget judged on {sel.get('images', MISSING)} selection-split images "
        f"(FP32 student {fmt_accuracy(sel.get('fp32_accuracy'))})."
    )
    lines.append("")
    parity = (q.get("parity") or {}).get("backends") or {}
    ref = q.get("reference_accuracy") or {}
    header = "| File | For | Precision | Selection acc. | vs FP32 | Test acc. (verify) | vs FP32 | Top-1 agreement | Float layers | Gate |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, a in (q.get("artifacts") or {}).items():
        p = parity.get(name) or {}
        float_layers = (a.get("graph") or {}).get("float_layers")
        gate = {True: "PASS", False: "FAIL"}.get(p.get("passed"), MISSING)
        test_drop = (
            None
            if p.get("accuracy") is None or ref.get("student_fp32") is None
            else ref["student_fp32"] - p["accuracy"]
        )
        lines.append(
            f"| `{a.get('file')}` | {a.get('consumer')} | {a.get('precision')} | {fmt_accuracy(a.get('selection_accuracy'))} "
            f"| {_points(a.get('accuracy_drop'))} | {fmt_accuracy(p.get('accuracy'))} | {_points(test_drop)} "
            f"| {fmt_accuracy(p.get('top1_agreement'))} | {', '.join(float_layers) if float_layers else 'none'} | {gate} |"
        )
    lines.append("")
    if ref:
        lines.append(
            f"On the {(q.get('parity') or {}).get('samples', MISSING)} verify images: teacher FP32 "
            f"{fmt_accuracy(ref.get('teacher_fp32'))}, student FP32 {fmt_accuracy(ref.get('student_fp32'))}."
        )
        lines.append("")
    judged = [
        f"`{a.get('file')}` on {a['judged_on']}" for a in (q.get("artifacts") or {}).values() if a.get("judged_on")
    ]
    if judged:
        dot = cal.get("cpu_int8_dot")
        seven = [f"`{a.get('file')}`" for a in (q.get("artifacts") or {}).values() if a.get("reduce_range")]
        lines.append(
            "Judged: "
            + "; ".join(judged)
            + "."
            + (f" This CPU's int8 dot product: {dot}." if dot else "")
            + (f" 7-bit weights (reduce_range): {', '.join(seven)}." if seven else "")
        )
        lines.append("")
    for name, a in (q.get("artifacts") or {}).items():
        sens = a.get("sensitivity")
        if sens and sens.get("reason") == "verify gate failed":
            top = ", ".join(f"{r['module']} (-{r['drop']:.4f})" for r in (sens.get("sensitivity") or [])[:5])
            lines += [f"Sensitivity ({name}, after the verify gate failed; nothing changed): {top}", ""]
        elif sens:
            kept = sens.get("kept_in_float") or []
            lines.append(
                f"Sensitivity ({name}): INT8 missed the {sens.get('budget')} budget; kept in float, most sensitive first: "
                + (
                    ", ".join(
                        f"{k['module']} (alone -{k['drop_alone']:.4f}, then {fmt_accuracy(k['accuracy_after'])})"
                        for k in kept
                    )
                    or "none"
                )
                + ("" if sens.get("met") else " (budget still not met)")
            )
            lines.append("")
        qat = a.get("qat")
        if qat:
            lines.append(
                f"QAT + KD ({name}, {qat.get('epochs')} epoch(s), lr {qat.get('lr')}): "
                f"{fmt_accuracy(qat.get('qat_selection_accuracy'))} on the selection split against PTQ's "
                f"{fmt_accuracy(qat.get('ptq_selection_accuracy'))}; shipped: {qat.get('shipped')}"
            )
            lines.append("")
        if a.get("ort_kernels") is not None:
            lines.append(
                f"ONNX Runtime's optimised graph of `{a.get('file')}` runs {a.get('ort_int8_kernels')} int8 kernels: "
                + ", ".join(f"{k} {v}" for k, v in a["ort_kernels"].items())
            )
            lines.append("")
    lat = q.get("latency")
    if isinstance(lat, Mapping):
        lines += ["### Latency (onnxruntime, CPU; teacher, student and INT8 student in interleaved rounds)", ""]
        lines.append(
            "| Batch | Teacher FP32 p50 ms | Student FP32 p50 ms | Student INT8 p50 ms | Pruning | Quantization | Combined |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        sp = lat.get("speedup") or {}
        for b in sorted((lat.get("teacher") or {}), key=lambda k: int(k)):
            lines.append(
                f"| {b} | {fmt_ms(get_path(lat, f'teacher.{b}.p50_ms'))} | {fmt_ms(get_path(lat, f'student.{b}.p50_ms'))} "
                f"| {fmt_ms(get_path(lat, f'student_int8.{b}.p50_ms'))} | {_speedup(get_path(sp, f'pruning.{b}'))} "
                f"| {_speedup(get_path(sp, f'quantization.{b}'))} | {_speedup(get_path(sp, f'combined.{b}'))} |"
            )
        lines += ["", f"FP16: {lat.get('fp16')}", ""]
    return lines


def quantize_summary_rows(q: Mapping) -> list[list[str]]:
    """Rows for the end-of-run table: each file's test accuracy and gate, and the INT8 speed-ups."""
    rows = []
    parity = (q.get("parity") or {}).get("backends") or {}
    ref = q.get("reference_accuracy") or {}
    samples = (q.get("parity") or {}).get("samples")
    for name in q.get("artifacts") or {}:
        p = parity.get(name) or {}
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]"}.get(p.get("passed"), MISSING)
        rows.append(
            [
                f"Accuracy {name} ({samples} test images)",
                fmt_accuracy(ref.get("teacher_fp32")),
                fmt_accuracy(p.get("accuracy")),
                f"{accuracy_change(ref.get('student_fp32'), p.get('accuracy'))} vs FP32 student, "
                f"top-1 {fmt_accuracy(p.get('top1_agreement'))} {verdict}",
            ]
        )
    lat = q.get("latency")
    if isinstance(lat, Mapping):
        sp = lat.get("speedup") or {}
        for b in sorted((lat.get("teacher") or {}), key=lambda k: int(k)):
            rows.append(
                [
                    f"CPU latency INT8 p50 (bs={b})",
                    fmt_ms_label(get_path(lat, f"teacher.{b}")),
                    fmt_ms_label(get_path(lat, f"student_int8.{b}")),
                    f"{_speedup(get_path(sp, f'combined.{b}'))} faster (INT8 alone {_speedup(get_path(sp, f'quantization.{b}'))})",
                ]
            )
    return rows
