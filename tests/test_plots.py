"""PNG plots: latency per batch (run) and accuracy vs latency (several runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cascadec.plots import latency_plot, pareto_front, pareto_plot, run_label, student_p50

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(p50, compute=False):
    out = {"p50_ms": p50, "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.6, "throughput": 1000 / p50}
    if compute:  # GPU backends: CUDA-event compute time under the host latency
        out.update(compute_p50_ms=p50 * 0.7, compute_p90_ms=p50 * 0.8, compute_p99_ms=p50 * 0.9)
    return out


def report(model, recipe, acc, p50, gpu_p50=None):
    lat = {
        "teacher": {"1": row(2 * p50), "8": row(10 * p50), "32": row(35 * p50)},
        "student": {"1": row(p50), "8": row(6 * p50), "32": row(20 * p50)},
        "protocol": {"device": "cpu", "duration_s": 3.0},
    }
    latency = {"onnxruntime": lat}
    if gpu_p50 is not None:
        latency["onnxruntime-cuda"] = {
            "teacher": {"1": row(2 * gpu_p50, True), "8": row(3 * gpu_p50, True)},
            "student": {"1": row(gpu_p50, True), "8": row(2 * gpu_p50, True)},
            "protocol": {"device": "cuda", "duration_s": 3.0},
        }
    return {"run": {"model": model, "recipe": recipe}, "student": {"accuracy": acc, "flops": 1e6}, "latency": latency}


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024


@pytest.mark.slow
def test_latency_plot(tmp_path):
    path = latency_plot(report("resnet8", "quick", 0.9, 0.2), tmp_path / "latency.png")
    assert_png(path)
    two = latency_plot(report("resnet8", "quick", 0.9, 0.2, gpu_p50=0.05), tmp_path / "two.png")
    assert_png(two)  # one panel per backend: the figure is wider than the single-backend one
    from PIL import Image

    assert Image.open(two).size[0] > 1.5 * Image.open(path).size[0]
    assert latency_plot({"run": {}}, tmp_path / "none.png") is None  # no latency yet: nothing to draw


def test_pareto_front():
    # (latency, accuracy): (2, .80) is dominated by (1, .85)
    assert pareto_front([(1, 0.85), (2, 0.80), (3, 0.90), (0.5, 0.70)]) == [3, 0, 2]


def test_student_p50_picks_the_backend():
    r = report("resnet8", "quick", 0.9, 0.2, gpu_p50=0.05)
    assert student_p50(r) == pytest.approx(0.2)  # onnxruntime first
    assert student_p50(r, "8", "onnxruntime-cuda") == pytest.approx(0.1)
    assert student_p50(r, "32", "onnxruntime-cuda") is None and student_p50(r, "1", "tensorrt") is None


def test_run_label_tells_sweep_runs_apart():
    assert (
        run_label({"run": {"dir": "/x/runs/r60", "model": "m", "recipe": "q", "target_description": "60% fewer FLOPs"}})
        == "r60 (60% fewer FLOPs)"
    )
    assert run_label({"run": {"model": "m", "recipe": "q"}}) == "m / q"


def test_pareto_plot(tmp_path):
    reports = [
        report("resnet8", f"r{i}", acc, p50) for i, (acc, p50) in enumerate([(0.85, 1), (0.8, 2), (0.9, 3), (0.7, 0.5)])
    ]
    reports.append({"run": {"model": "x", "recipe": "no-latency"}, "student": {"accuracy": 0.5}})
    assert_png(pareto_plot(reports, tmp_path / "pareto.png"))
    assert_png(pareto_plot(reports, tmp_path / "pareto-bs8.png", backend="onnxruntime", batch="8"))


def _edited_copy(run: Path, to: Path, **sections: dict) -> Path:
    """A copy of a finished run whose report.json has these sections' keys changed."""
    shutil.copytree(run, to)
    report = json.loads((to / "report.json").read_text())
    for section, values in sections.items():
        report[section].update(values)
    (to / "report.json").write_text(json.dumps(report))
    return to


@pytest.mark.slow
def test_cli_report_and_profile_write_plots(cli, copy_run, tmp_path):
    run_a = copy_run("a")
    run_b = _edited_copy(run_a, tmp_path / "b", student={"accuracy": 0.01})
    result = cli("report", run_a, run_b, "--out", tmp_path / "pareto.png")
    assert result.code == 0, result.err
    assert "cifar_resnet8" in result.out and "accuracy" in result.out
    assert_png(tmp_path / "pareto.png")
    assert cli("report", run_a, "--out", tmp_path / "p.txt").code == 2
    result = cli("report", run_a, run_b, "--backend", "ort", "--batch", "2", "--out", tmp_path / "p2.png")
    assert result.code == 0, result.err
    assert "bs=2, onnxruntime" in result.out.replace("\n", "")
    assert cli("report", run_a, "--backend", "junk").code == 2

    result = cli("profile", run_a, "--batch", "1,2")
    assert result.code == 0, result.err
    assert_png(run_a / "latency.png")


@pytest.mark.slow
def test_report_retimes_side_by_side_groups_by_teacher_and_draws_it(cli, copy_run, tmp_path):
    """Runs measured minutes apart are timed again in the same rounds; the teacher is the
    reference; runs on another data set or teacher get their own front; --no-remeasure reads
    what each run stored and says so."""
    from cascadec.compare import compare_runs

    run_a = copy_run("ra")
    run_b = _edited_copy(run_a, tmp_path / "rb", student={"accuracy": 0.5})
    rep = json.loads((run_b / "report.json").read_text())

    both = compare_runs([run_a, run_b])
    assert both.remeasured and "re-timed side by side" in both.source
    assert len(both.groups) == 1 and len(both.teachers) == 1  # one data set, one teacher
    assert all(p.p50_ms and p.p50_ms > 0 for p in [*both.students, *both.teachers])
    assert both.teachers[0].accuracy == rep["teacher"]["accuracy"]

    stored = compare_runs([run_a, run_b], remeasure=False)
    assert not stored.remeasured and "stored figures" in stored.source
    assert stored.students[0].p50_ms == rep["latency"]["onnxruntime"]["student"]["1"]["p50_ms"]

    run_c = _edited_copy(run_a, tmp_path / "rc", teacher={"accuracy": 0.25})  # another teacher: its own group
    (run_c / "student.onnx").unlink()  # and its files are gone: the stored figures, said so
    three = compare_runs([run_a, run_b, run_c])
    assert len(three.groups) == 2 and len(three.teachers) == 2 and not three.remeasured
    assert "student.onnx is missing" in three.source

    result = cli("report", run_a, run_b, run_c, "--out", tmp_path / "groups.png")
    assert result.code == 0, result.err
    text = result.out.replace("\n", "")
    assert "teacher" in text and "data / teacher" in text and "stored figures" in text
    assert_png(tmp_path / "groups.png")
    result = cli("report", run_a, run_b, "--out", tmp_path / "two.png")
    assert result.code == 0 and "re-timed side by side" in result.out.replace("\n", " ")
