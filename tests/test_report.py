"""report.json keeps its fixed keys; report.md and the CLI table render any subset of sections."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console
from rich.table import Table

from cascadec.envinfo import environment
from cascadec.formatting import fmt_accuracy, fmt_flops, fmt_params
from cascadec.profile.protocol import Timing, protocol_record, summarize
from cascadec.report import write_report
from cascadec.report_render import render_markdown, summary_table
from cascadec.verify.compare import compare_outputs
from cascadec.verify.gates import Gate


def latency(p50: float) -> dict:
    # int batch keys, as profile_onnx returns them; the writer must turn them into strings
    return {b: summarize(np.array([p50 * b, p50 * b * 1.1, p50 * b * 1.3]), b) for b in (1, 8, 32)}


def gpu_latency(p50: float) -> dict:
    """Host latency = compute + 0.25 ms of copies, as measure_device would report it."""
    out = {}
    for b in (1, 8):
        compute = np.array([p50 * b, p50 * b * 1.1, p50 * b * 1.3])
        out[b] = summarize(compute + 0.25, b, compute_ms=compute)
    return out


def full_report() -> dict:
    ref = np.random.default_rng(0).standard_normal((20, 10))
    parity = compare_outputs(ref, ref + 1e-6, np.arange(20) % 10)
    failures = Gate().check(parity)
    return {
        "name": "resnet18-demo",
        "teacher": {"flops": 1.82e9, "params": 11.69e6, "accuracy": 0.6976},
        "student": {"flops": 0.91e9, "params": 5.2e6, "accuracy": 0.6912},
        "parity": {"onnxruntime": {**parity, "passed": not failures, "failures": failures}},
        "latency": {"onnxruntime": {"teacher": latency(4.0), "student": latency(2.0)}},
        "environment": environment(),
    }


def test_write_report_files_and_fixed_keys(tmp_path):
    json_path, md_path = write_report(tmp_path / "run", full_report())
    assert json_path == tmp_path / "run" / "report.json" and md_path == tmp_path / "run" / "report.md"
    data = json.loads(json_path.read_text())
    for who in ("teacher", "student"):
        for key in ("flops", "params", "accuracy"):
            assert isinstance(data[who][key], float)
    assert 0 <= data["student"]["accuracy"] <= 1
    p = data["parity"]["onnxruntime"]
    assert p["passed"] is True and p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    for who in ("teacher", "student"):
        for batch in ("1", "8", "32"):
            row = data["latency"]["onnxruntime"][who][batch]
            assert {"p50_ms", "p90_ms", "p99_ms", "throughput"} <= set(row)
    assert (
        data["latency"]["onnxruntime"]["student"]["1"]["p50_ms"]
        < data["latency"]["onnxruntime"]["teacher"]["1"]["p50_ms"]
    )
    assert "versions" in data["environment"]


def test_markdown_tables(tmp_path):
    _, md_path = write_report(tmp_path, full_report())
    md = md_path.read_text()
    for heading in ("# cascadec report: resnet18-demo", "## Summary", "## Parity", "## Latency", "## Environment"):
        assert heading in md
    assert "| Accuracy | 69.76% | 69.12% | -0.64 pp |" in md
    assert "1.82 GMac" in md and "910.00 MMac" in md and "11.69 M" in md
    parity_md = md.split("## Parity", 1)[1].split("## Latency", 1)[0]
    parity_rows = [ln for ln in parity_md.splitlines() if ln.startswith("| onnxruntime |")]
    assert len(parity_rows) == 1 and "| 20 |" in parity_rows[0] and "PASS" in parity_rows[0]
    latency_md = md.split("### onnxruntime", 1)[1].split("##", 1)[0]
    lines = [ln for ln in latency_md.splitlines() if ln.startswith("| student |")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["1", "8", "32"]  # numeric batch order
    assert all(ln.rstrip().endswith("| 2.00x |") for ln in lines)
    assert "| student | 1 | 2.200 | 2.520 | 2.560 | 2.592 | 2.267 | 3 | 441.2 | 2.00x |" in md  # p50..p99, mean, runs
    assert "| CPU latency p50 (bs=1) | 4.40 ms | 2.20 ms | 2.00x faster |" in md  # speed-up in the summary too
    assert "| torch |" in md  # environment versions table
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)


def test_markdown_tolerates_missing_sections(tmp_path):
    _, md_path = write_report(tmp_path, {"teacher": {"flops": 40.8e6, "params": 0.27e6, "accuracy": 0.9163}})
    md = md_path.read_text()
    assert "## Summary" in md and "40.80 MMac" in md and "91.63%" in md
    assert "## Latency" not in md and "## Parity" not in md
    assert "| Accuracy | 91.63% | — | — |" in md
    assert render_markdown({}).startswith("# cascadec report")
    partial = {"latency": {"onnxruntime": {"student": latency(1.0)}}}  # no teacher: no speed-up
    assert "## Latency" in render_markdown(partial)


def test_gpu_backend_table_splits_host_and_compute():
    report = full_report()
    report["latency"]["onnxruntime-cuda"] = {
        "teacher": gpu_latency(1.0),
        "student": gpu_latency(0.5),
        "protocol": protocol_record(
            backend="onnxruntime-cuda", device="cuda", timing=Timing(warmup_s=0.2, min_duration_s=3.0, min_iters=10)
        ),
    }
    md = render_markdown(report)
    cuda_md = md.split("### onnxruntime-cuda", 1)[1]
    assert "Protocol: device cuda; warm-up 0.2 s; then at least 3 s and 10 runs" in cuda_md
    assert "GPU compute p50 ms" in cuda_md and "host latency" in cuda_md.lower()
    # student bs=1: compute p50 0.55 ms, host p50 0.80 ms (0.25 ms of copies); speed-up (1.10 + .25) / 0.80 host
    row = next(ln for ln in cuda_md.splitlines() if ln.startswith("| student | 1 |"))
    assert "| 0.800 |" in row and "| 0.550 |" in row and "| 0.250 |" in row and row.rstrip().endswith("| 1.69x |")
    assert "GPU compute" not in md.split("### onnxruntime-cuda", 1)[0]  # the CPU table has no split
    console = Console(record=True, width=140)
    console.print(summary_table(report))
    text = console.export_text()
    assert "CPU latency p50 (bs=1)" in text and "onnxruntime-cuda latency p50 (bs=8)" in text and "1.69x faster" in text


def test_failed_parity_lists_failures(tmp_path):
    report = full_report()
    ref = np.eye(10)
    bad = compare_outputs(ref, ref[::-1].copy())
    report["parity"]["onnxruntime"] = {**bad, "passed": False, "failures": Gate().check(bad)}
    md = render_markdown(report)
    assert "FAIL" in md and "Gate failures:" in md and "top1_agreement" in md


def test_summary_table():
    table = summary_table(full_report())
    assert isinstance(table, Table)
    console = Console(record=True, width=140)
    console.print(table)
    text = console.export_text()
    for needle in (
        "Accuracy",
        "69.76%",
        "FLOPs",
        "Params",
        "Parity (onnxruntime)",
        "PASS",
        "CPU latency p50 (bs=1)",
        "2.00x faster",
    ):
        assert needle in text
    slower = full_report()
    slower["latency"]["onnxruntime"]["student"] = latency(8.0)  # a student slower than its teacher says so
    assert "| CPU latency p50 (bs=1) | 4.40 ms | 8.80 ms | 2.00x slower |" in render_markdown(slower)
    empty = Console(record=True, width=140)
    empty.print(summary_table({}))
    assert "Accuracy" in empty.export_text()


def test_formatters():
    assert fmt_accuracy(0.5) == "50.00%" and fmt_accuracy(None) == "—"
    assert fmt_flops(4.1e9) == "4.10 GMac" and fmt_flops(5.5e5) == "0.55 MMac"
    assert fmt_params(25_557_032) == "25.56 M"


def test_environment_fields():
    env = environment()
    assert env["cpu"] and env["logical_cores"] >= 1 and env["torch_threads"] >= 1
    assert {"torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "torch_pruning", "tensorrt"} <= set(
        env["versions"]
    )
    assert env["versions"]["torch"] and env["python"] and env["platform"]
    assert {"gpu", "gpu_driver", "cuda", "cudnn", "gpu_compute_capability", "gpu_memory_gb"} <= set(env)
    assert env["physical_cores"] is None or 1 <= env["physical_cores"] <= env["logical_cores"]
    assert env["ram_gb"] > 0 and env["usable_cpus"] >= 1
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    json.dumps(env)


def test_training_section_shows_the_ladder_and_warns_when_it_is_broken():
    prune = {
        "ladder": {
            "rungs": [
                {"model": "student", "keep": 0.5, "accuracy": 0.80},
                {"model": "TA1", "keep": 0.75, "accuracy": 0.33},
                {"model": "TA2", "keep": 1.0, "accuracy": 0.90},
            ],
            "broken": ["TA1 0.3300 < student 0.8000"],
            "healthy": False,
        },
        "joint_epochs": [
            {"epoch": 0, "accuracies": [0.7, 0.3, 0.9], "mask_changes": [12, 30, 0], "frozen": False},
            {"epoch": 1, "accuracies": [0.8, 0.33, 0.9], "mask_changes": [0, 0, 0], "frozen": True},
        ],
        "student_epochs": [
            {"epoch": -1, "teacher": None, "student_accuracy": 0.8, "kept": False},
            {"epoch": 0, "teacher": "TA2 (keep 1.00)", "student_accuracy": 0.85, "kept": True},
        ],
    }
    md = render_markdown({"teacher": {"accuracy": 0.92}, "student": {"accuracy": 0.85}, "prune": prune})
    assert "**WARNING: the TA ladder is broken** (TA1 0.3300 < student 0.8000)" in md
    assert "| TA1 | 0.75 | 33.00% |" in md
    assert "| 1 | 80.00% | 33.00% | 90.00% | yes | 0, 0, 0 |" in md
    assert "| start |  | 80.00% |  |" in md and "| 0 | TA2 (keep 1.00) | 85.00% | yes |" in md
    healthy = {**prune, "ladder": {**prune["ladder"], "broken": [], "healthy": True}}
    assert "WARNING" not in render_markdown({"prune": healthy})
