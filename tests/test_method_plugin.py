"""A pruning method is one module and its registration: a toy method registered here runs
through ``cascadec compress`` with its own report rows, its own network timed beside the
student and its own ``inspect`` lines, and nothing above ``prune/`` names a method."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from helpers.cli import torch_threads, write_recipe

from cascadec.prune import method as registry
from cascadec.prune.method import ExtraModel, PruneContext, PruneMethod, PruneOutcome, register_method

ROOT = Path(__file__).resolve().parents[1]


class Toy(PruneMethod):
    """Keeps the units of the first half of every group's ranking by L1 norm, no training."""

    name = "toy"
    history_keys = ("toy",)
    extra_model_labels = {"toy_twin": "Toy twin:"}

    def run(self, ctx: PruneContext) -> PruneOutcome:
        from cascadec.prune.importance import l1_importance

        scores = l1_importance(ctx.teacher, ctx.analysis.index)
        mask = ctx.analysis.solver.solve(scores, ctx.analysis.budget)
        student = copy.deepcopy(ctx.teacher)
        return PruneOutcome(student, mask, ctx.analysis, {"toy": {"kept": int(mask.sum())}}, {"toy": {"v": 1}})

    def finish_metrics(self, metrics, student, val_loader, device) -> None:
        metrics["student.toy_score"] = 42.0

    def student_report(self, metrics):
        return {"toy_score": metrics.get("student.toy_score")}

    def extra_models(self, teacher, sample, metrics):
        return [ExtraModel("toy_twin", copy.deepcopy(teacher), {"what": "the teacher again"})]

    def summary_rows(self, report):
        return [["Toy score", "", str(report["student"]["toy_score"]), ""]]

    def report_notes(self, report):
        return ["The toy method trains nothing."]

    def training_lines(self, prune):
        return [f"Toy kept {prune['toy']['kept']} units.", ""]

    def preview(self, model, example, recipe):
        return {"units": sum(p.numel() for p in model.parameters()) > 0}

    def preview_lines(self, preview, inspected):
        return [f"toy preview: {preview['units']}"]


@pytest.fixture
def toy():
    register_method(Toy)
    yield Toy
    registry._REGISTRY.pop("toy", None)


@pytest.mark.slow
def test_a_registered_method_runs_through_compress(toy, cli, tmp_path, tiny_recipe, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))  # the session's teacher
    out = tmp_path / "toy"
    with torch_threads(1):
        result = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out, "--set", "prune.method=toy")
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["method"] == "toy"
    assert report["student"]["toy_score"] == 42.0 and 0 < report["student"]["flops"] < report["teacher"]["flops"]
    assert report["prune"]["toy"]["kept"] > 0  # the method's history key is kept
    assert (out / "toy_twin.onnx").is_file() and report["latency"]["onnxruntime"]["toy_twin"]
    md = (out / "report.md").read_text()
    assert "Toy score" in md and "The toy method trains nothing." in md and "Toy kept" in md
    assert "Toy twin: CPU latency" in md  # its network, timed beside the student
    assert json.loads((out / "student.widths.json").read_text())["toy"] == {"v": 1}
    recipe = write_recipe(tmp_path / "toy.yaml", prune={"method": "toy"})
    r = cli("inspect", "cifar_resnet8", "--recipe", recipe)
    assert r.code == 0 and "toy preview: True" in r.out


def test_an_unregistered_method_is_refused_with_the_known_ones(toy, cli, tmp_path):
    r = cli("inspect", "cifar_resnet8", "--recipe", write_recipe(tmp_path / "r.yaml", prune={"method": "nonesuch"}))
    assert r.code == 2 and "prune.method" in r.err and "'toy'" in r.err and "'cascade'" in r.err


def test_the_schema_and_the_cli_need_no_torch_to_name_the_methods():
    """`cascadec --help` and `recipes list` stay fast: neither the registry module nor a recipe
    check imports torch or a method's module."""
    import subprocess
    import sys

    code = (
        "import sys; import cascadec.cli; from cascadec.recipe import load_recipe; load_recipe('fmnist_quick'); "
        "print(sorted(m for m in ('torch', 'cascadec.prune.methods', 'torch_pruning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_above_prune_names_a_method():
    """The issue's check: the stages, the report and the CLI hold no method-specific branch."""
    pattern = re.compile(r"fbs|\bcap\b|hsakd", re.IGNORECASE)
    for name in ("stages.py", "report.py", "report_render.py", "cli.py"):
        text = (ROOT / "cascadec" / name).read_text()
        hits = [line for line in text.splitlines() if pattern.search(line)]
        assert not hits, f"{name}: {hits}"


def test_every_built_in_method_is_registered_with_its_hooks():
    names = registry.method_names()
    assert names[:4] == ["cascade", "oneshot", "cap", "fbs"]
    assert tuple(names[:4]) == registry.BUILTIN_METHODS == tuple(registry.known_method_names()[:4])
    fbs = registry.get_method("fbs")
    assert "static_equivalent" in fbs.extra_model_labels
    assert registry.get_method("cap").history_keys == ("cap",)
    x = torch.zeros(1)
    assert registry.get_method("oneshot").extra_models(torch.nn.Identity(), x, {}) == []
