"""The ``cascadec`` command as a user meets it: exit codes, one-line errors, real runs.

Exit codes (cascadec/errors.py): 0 ok, 2 bad input (one line on stderr, no traceback, no run
directory left behind as a result), 3 a parity gate failed. Most checks call
``cascadec.cli.main`` in-process; a few go through ``python -m cascadec`` to prove what a
shell sees. One tiny synthetic compress run (conftest ``finished_run``) is shared; tests that
change a run work on a copy.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
from pathlib import Path

import pytest
import yaml
from helpers.cli import TINY_RECIPE, cli_subprocess, write_recipe

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def assert_user_error(result, *needles: str, out_dir: Path | None = None) -> str:
    """Exit 2, exactly one line on stderr naming the problem, no traceback, no result."""
    assert result.code == 2, f"exit code {result.code}, stderr:\n{result.err}"
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, f"expected one line on stderr, got:\n{result.err}"
    line = result.err_lines[0]
    assert line.startswith("error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not named in: {line}"
    assert "artifacts and report.md" not in result.out
    if out_dir is not None:
        assert not out_dir.exists(), f"a run directory was left behind: {sorted(p.name for p in out_dir.iterdir())}"
    return line


def normalise(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- bad input -> exit 2, one line


@pytest.fixture
def corrupt_files(tmp_path):
    """A truncated .safetensors checkpoint of the right model and a garbage .pt file."""
    from safetensors.torch import save_file

    from cascadec.models import create_model

    good = tmp_path / "good.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_model("cifar_resnet8", num_classes=10).state_dict().items()}, str(good)
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    return {"truncated": truncated, "garbage": garbage}


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "malformed.yaml"
    path.write_text("name: malformed\nmodel:\n  name: [cifar_resnet8\ndata: {name: synthetic\n")
    return path


def _unknown_key_yaml(tmp_path: Path) -> Path:
    recipe = {**TINY_RECIPE, "prune": {**TINY_RECIPE["prune"], "bogus": 1}}
    return write_recipe(tmp_path / "unknown_key.yaml", recipe)


BAD_INPUT = {
    # id: (args builder(tmp_path, recipe) -> extra args, needles)
    "unknown-model": (lambda t, r: ["compress", "nosuchnet", "--recipe", r], ["nosuchnet"]),
    "unknown-recipe": (lambda t, r: ["compress", "cifar_resnet8", "--recipe", "no_such_recipe"], ["no_such_recipe"]),
    "malformed-yaml": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", _bad_yaml(t)],
        ["malformed.yaml", "malformed YAML"],
    ),
    "unknown-key-set": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", r, "--set", "prune.bogus=1"],
        ["prune.bogus", "unknown key"],
    ),
    "unknown-key-yaml": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", _unknown_key_yaml(t)],
        ["unknown_key.yaml", "prune.bogus", "unknown key"],
    ),
    "wrong-type": (lambda t, r: ["compress", "cifar_resnet8", "--recipe", r, "--set", "train.lr=abc"], ["train.lr"]),
    "missing-data": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", r, "--data", "/nonexistent"],
        ["/nonexistent"],
    ),
    "infeasible-target": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", r, "--set", "prune.target.flops_reduction=0.999"],
        ["infeasible"],
    ),
    "missing-weights-file": (
        lambda t, r: ["compress", "cifar_resnet8", "--recipe", r, "--weights", t / "absent.safetensors"],
        ["absent.safetensors"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, cli, tmp_path, tiny_recipe, isolated_cache):
    build, needles = BAD_INPUT[case]
    out_dir = tmp_path / "run"
    result = cli(*build(tmp_path, tiny_recipe), "--out", out_dir)
    assert_user_error(result, *needles, out_dir=out_dir)


@pytest.mark.parametrize("which", ["truncated", "garbage"])
def test_corrupted_checkpoint_exits_2_with_one_line(which, cli, tmp_path, tiny_recipe, corrupt_files, isolated_cache):
    out_dir = tmp_path / "run"
    result = cli(
        "compress", "cifar_resnet8", "--recipe", tiny_recipe, "--weights", corrupt_files[which], "--out", out_dir
    )
    assert_user_error(result, corrupt_files[which].name)
    if out_dir.exists():  # whatever is left there is not presented as a result
        manifest = json.loads((out_dir / "manifest.json").read_text())
        assert manifest["status"] != "finished"
        assert not (out_dir / "report.json").exists()


def test_corrupted_checkpoint_leaves_no_run_directory(cli, tmp_path, tiny_recipe, corrupt_files, isolated_cache):
    out_dir = tmp_path / "run"
    result = cli(
        "compress", "cifar_resnet8", "--recipe", tiny_recipe, "--weights", corrupt_files["truncated"], "--out", out_dir
    )
    assert result.code == 2
    assert not out_dir.exists()


@pytest.mark.slow
def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path, tiny_recipe):
    result = cli_subprocess(
        "compress",
        "nosuchnet",
        "--recipe",
        tiny_recipe,
        "--out",
        tmp_path / "run",
        env={"CASCADEC_CACHE": str(tmp_path / "cache")},
    )
    assert_user_error(result, "nosuchnet", out_dir=tmp_path / "run")
    assert result.out == ""


@pytest.mark.slow
def test_bad_override_in_a_fresh_process_has_no_traceback(tmp_path, tiny_recipe):
    result = cli_subprocess(
        "compress",
        "cifar_resnet8",
        "--recipe",
        tiny_recipe,
        "--set",
        "train.lr=abc",
        "--out",
        tmp_path / "run",
        env={"CASCADEC_CACHE": str(tmp_path / "cache")},
    )
    assert_user_error(result, "train.lr", tiny_recipe.name, out_dir=tmp_path / "run")


@pytest.mark.parametrize("command", ["verify", "profile", "export"])
def test_commands_on_a_non_run_directory_exit_2(command, cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    assert_user_error(cli(command, tmp_path), str(tmp_path), "not a cascadec run directory")
    assert_user_error(cli(command, tmp_path / "missing"), "not found")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_trt_without_tensorrt_exits_2(cli, finished_run):
    line = assert_user_error(cli("export", finished_run.path, "--trt"))
    assert "TensorRT" in line


def test_export_fp16_without_trt_exits_2(cli, finished_run):
    assert_user_error(cli("export", finished_run.path, "--fp16"), "--trt")


def test_tensorrt_engines_are_built_from_the_graph_that_names_their_precision(cli, copy_run):
    """--fp16: the FP16 graph (converted where missing, no data needed); --int8: the quantize stage's
    Q/DQ graph for TensorRT, never made here without its calibration and verification; one at a time."""
    from cascadec.backends.onnxruntime_backend import graph_precision
    from cascadec.commands import _typed_source
    from cascadec.errors import UserError
    from cascadec.run import RunDir

    run_dir = copy_run("typed")
    with RunDir.open(run_dir) as run:
        assert _typed_source(run, fp16=False, int8=False) == run.file("student.onnx")
        fp16 = _typed_source(run, fp16=True, int8=False)
        assert fp16 == run.file("student.fp16.onnx") and graph_precision(fp16) == "fp16"
        with pytest.raises(UserError, match="student.int8.trt.onnx: missing; run `cascadec quantize"):
            _typed_source(run, fp16=False, int8=True)
    assert_user_error(cli("export", run_dir, "--trt", "--fp16", "--int8"), "choose one")
    assert_user_error(cli("export", run_dir, "--int8-calibrator"), "--trt")


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "{run}", "--batch", "0"],
        ["verify", "{run}", "--samples", "0"],
        ["compress", "cifar_resnet8"],  # --recipe missing
        ["no-such-command"],
    ],
    ids=["profile-batch-0", "verify-samples-0", "missing-recipe", "unknown-command"],
)
def test_usage_errors_exit_2(args, cli, finished_run):
    result = cli(*[a.format(run=finished_run.path) for a in args])
    assert result.code == 2, result.err
    assert "internal error" not in result.err and "Traceback" not in result.err


# ---------------------------------------------------------------- offline pre-flight


@pytest.mark.slow
def test_dry_run_works_offline_and_shows_widths_and_target(cli, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted during --dry-run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    result = cli("compress", "resnet50", "--recipe", "imagenet_50pct", "--dry-run")
    assert result.code == 0, result.err
    assert list(tmp_path.iterdir()) == [], "a dry run must not create a run directory"
    text = normalise(result.out)
    header = re.search(
        r"resnet50 input 3x224x224: ([\d.]+) GMac, [\d.]+ M params, \d+ prunable channels in (\d+) groups", text
    )
    assert header, result.out
    rows = re.findall(r"│\s*(\S+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│", result.out)
    assert len(rows) == int(header.group(2)) > 0
    channels = [int(r[2]) for r in rows]
    kept = [int(r[3]) for r in rows]
    assert all(1 <= k <= c for k, c in zip(kept, channels))
    assert sum(kept) < sum(channels)
    target = re.search(r"target 50% fewer FLOPs: ([\d.]+) GMac \(([\d.]+)% of FLOPs\)", text)
    assert target, result.out
    assert 48.0 <= float(target.group(2)) <= 50.05
    assert float(target.group(1)) == pytest.approx(float(header.group(1)) / 2, rel=0.03)


# ---------------------------------------------------------------- listing and inspecting


def test_recipes_list_shows_every_shipped_recipe(cli, monkeypatch):
    from cascadec.recipe import list_recipes

    monkeypatch.setenv("COLUMNS", "250")
    result = cli("recipes", "list")
    assert result.code == 0, result.err
    for name in list_recipes():
        assert name in result.out
    assert "imagenet_50pct" in result.out and "fmnist_quick" in result.out
    assert "50% fewer FLOPs" in result.out and "resnet50" in result.out


def test_recipes_list_names_are_readable_at_80_columns(cli):
    from cascadec.recipe import list_recipes

    result = cli("recipes", "list")
    assert result.code == 0
    for name in list_recipes():
        assert name in result.out


def test_recipes_show_prints_the_resolved_recipe(cli, monkeypatch):
    from cascadec.recipe import load_recipe

    monkeypatch.setenv("COLUMNS", "250")
    result = cli("recipes", "show", "fmnist_quick")
    assert result.code == 0, result.err
    assert yaml.safe_load(result.out) == load_recipe("fmnist_quick").model_dump(mode="json")


def test_recipes_show_output_is_valid_yaml_at_80_columns(cli):
    from cascadec.recipe import load_recipe

    result = cli("recipes", "show", "fmnist_quick")
    assert result.code == 0
    assert yaml.safe_load(result.out) == load_recipe("fmnist_quick").model_dump(mode="json")


def test_recipes_show_unknown_recipe_exits_2(cli):
    assert_user_error(cli("recipes", "show", "no_such_recipe"), "no_such_recipe")


def test_models_list(cli):
    result = cli("models", "list")
    assert result.code == 0, result.err
    names = result.out.split()
    for name in ("resnet18", "resnet50", "mobilenet_v2", "convnext_tiny", "cifar_resnet8", "cifar_vgg16_bn"):
        assert name in names
    filtered = cli("models", "list", "mobilenet")
    assert filtered.code == 0
    assert filtered.out.split() and all("mobilenet" in n for n in filtered.out.split())


def test_inspect_shows_groups_and_frozen_layers(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # table cells must not wrap for the checks below
    result = cli("inspect", "resnet18", "--image-size", "64")
    assert result.code == 0, result.err
    text = normalise(result.out)
    assert "resnet18 input 3x64x64" in text
    assert "prunable groups" in text and "frozen groups" in text
    assert "first conv" in text and "classifier" in text


@pytest.mark.slow
def test_inspect_json_matches_counted_cost(cli):
    import torch

    from cascadec.models import create_model
    from cascadec.prune.cost import count_macs, count_params

    result = cli("inspect", "resnet18", "--image-size", "64", "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    model = create_model("resnet18")
    assert info["flops"] == pytest.approx(count_macs(model, torch.zeros(1, 3, 64, 64)))
    assert info["params"] == count_params(model)
    assert {f["root"] for f in info["frozen"]} == {"conv1", "fc"}
    assert info["groups"] and sum(g["channels"] for g in info["groups"]) == info["prunable_units"]


# ---------------------------------------------------------------- a whole tiny run


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def test_compress_end_to_end(finished_run):
    result = finished_run.result
    assert result.code == 0
    assert "Traceback" not in result.err
    assert "artifacts and report.md in" in result.out
    assert "cascadec summary" in result.out


def test_report_json_has_the_fixed_keys(finished_run):
    report = json.loads((finished_run.path / "report.json").read_text())
    flat = _flat(report)
    for key in (
        "teacher.flops",
        "teacher.params",
        "teacher.accuracy",
        "student.flops",
        "student.params",
        "student.accuracy",
        "parity.onnxruntime.max_abs_diff",
        "parity.onnxruntime.top1_agreement",
        "parity.onnxruntime.passed",
    ):
        assert key in flat, f"report.json lacks {key}"
    for who in ("teacher", "student"):
        for batch in ("1", "2"):
            for stat in ("p50_ms", "p90_ms", "p99_ms", "throughput"):
                value = flat.get(f"latency.onnxruntime.{who}.{batch}.{stat}")
                assert isinstance(value, (int, float)) and value > 0, (
                    f"latency.onnxruntime.{who}.{batch}.{stat}: {value!r}"
                )
    for who in ("teacher", "student"):
        assert 0.0 <= flat[f"{who}.accuracy"] <= 1.0
    assert 0 < flat["student.flops"] < flat["teacher.flops"]
    assert 0 < flat["student.params"] < flat["teacher.params"]
    assert flat["student.flops"] / flat["teacher.flops"] == pytest.approx(0.5, abs=0.02)
    assert flat["parity.onnxruntime.passed"] is True
    assert flat["parity.onnxruntime.max_abs_diff"] <= 1e-4
    assert 0.0 <= flat["parity.onnxruntime.top1_agreement"] <= 1.0


def test_report_md_and_artifacts(finished_run):
    run = finished_run.path
    md = (run / "report.md").read_text()
    assert "Teacher" in md and "Student" in md and "onnxruntime" in md
    for name in (
        "recipe.yaml",
        "manifest.json",
        "teacher.safetensors",
        "student.widths.json",
        "student.safetensors",
        "teacher.onnx",
        "student.onnx",
        "report.json",
        "report.md",
    ):
        assert (run / name).is_file(), f"missing {name}"
    assert not [p.name for p in run.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    spec = json.loads((run / "student.widths.json").read_text())
    assert spec["model"] == "cifar_resnet8" and spec["removed_channels"]


def test_teacher_cache_stays_in_cascadec_cache(finished_run):
    cached = list((finished_run.cache / "teachers").glob("cifar_resnet8-synthetic-*.safetensors"))
    assert len(cached) == 1


def test_compress_into_a_finished_run_is_refused(cli, finished_run):
    before = (finished_run.path / "manifest.json").read_bytes()
    result = cli("compress", "cifar_resnet8", "--recipe", finished_run.recipe, "--out", finished_run.path)
    line = assert_user_error(result, "finished run")
    assert str(finished_run.path) in line
    assert (finished_run.path / "manifest.json").read_bytes() == before


def _stage_starts(run: Path) -> dict:
    return {k: v["started"] for k, v in json.loads((run / "manifest.json").read_text())["stages"].items()}


def test_resume_of_a_finished_run_redoes_nothing(cli, copy_run, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    run = copy_run()
    starts = _stage_starts(run)
    artifacts = ("teacher.safetensors", "student.safetensors", "student.widths.json", "teacher.onnx", "student.onnx")
    mtimes = {name: (run / name).stat().st_mtime_ns for name in artifacts}
    result = cli("compress", "cifar_resnet8", "--recipe", finished_run.recipe, "--out", run, "--resume")
    assert result.code == 0, result.err
    assert _stage_starts(run) == starts, "a finished stage was run again"
    assert {name: (run / name).stat().st_mtime_ns for name in artifacts} == mtimes
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumed"]) == 1
    assert json.loads((run / "report.json").read_text())["parity"]["onnxruntime"]["passed"] is True


def test_resume_with_a_different_recipe_is_refused(cli, copy_run, finished_run):
    run = copy_run()
    result = cli(
        "compress", "cifar_resnet8", "--recipe", finished_run.recipe, "--out", run, "--resume", "--set", "train.lr=0.5"
    )
    assert_user_error(result, "different recipe")


def test_verify_a_finished_run(cli, copy_run):
    run = copy_run()
    result = cli("verify", run)
    assert result.code == 0, result.err
    assert "onnxruntime" in result.out and "yes" in result.out


def test_verify_gate_failure_exits_3_with_a_table(cli, copy_run):
    run = copy_run()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["verify"]["max_abs_diff"] = 1e-30
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = cli("verify", run)
    assert result.code == 3, result.err
    assert "Traceback" not in result.err
    assert "parity gate failed" in result.err
    assert "max_abs_diff" in result.err and "1e-30" in result.err  # what failed and what was required
    assert "NO" in result.out
    report = json.loads((run / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["passed"] is False


@pytest.mark.slow
def test_compress_gate_failure_exits_3_after_writing_the_report(cli, tmp_path, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))  # reuse the trained teacher
    run = tmp_path / "gate"
    result = cli(
        "compress", "cifar_resnet8", "--recipe", finished_run.recipe, "--out", run, "--set", "verify.max_abs_diff=1e-30"
    )
    assert result.code == 3, result.err
    assert "parity gate failed" in result.err and "max_abs_diff" in result.err
    report = json.loads((run / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["passed"] is False
    assert (run / "report.md").is_file() and (run / "student.onnx").is_file()


@pytest.mark.slow
def test_profile_a_run(cli, copy_run):
    run = copy_run()
    result = cli("profile", run, "--batch", "1")
    assert result.code == 0, result.err
    text = normalise(result.out)
    assert re.search(r"teacher │ 1 │ [\d.]+ │", text) and re.search(r"student │ 1 │ [\d.]+ │", text), result.out
    assert "speed-up" in text
    latency = json.loads((run / "report.json").read_text())["latency"]["onnxruntime"]
    assert latency["student"]["1"]["p50_ms"] > 0


@pytest.mark.slow
def test_profile_an_onnx_file(cli, finished_run):
    result = cli("profile", finished_run.path / "student.onnx", "--batch", "1")
    assert result.code == 0, result.err
    assert re.search(r"student │ 1 │ [\d.]+ │", normalise(result.out)), result.out


def test_profile_missing_onnx_file_exits_2(cli, tmp_path):
    assert_user_error(cli("profile", tmp_path / "absent.onnx", "--batch", "1"), "absent.onnx")


def test_help_shows_no_value_type_for_flags(cli) -> None:
    """A flag takes no value: Typer 0.29 printed ``--resume <bool>``; a valued option keeps its type."""
    for command in ("compress", "quantize", "export"):
        result = cli(command, "--help")
        assert result.code == 0
        assert "<bool>" not in result.out, result.out
    assert "<int" in cli("quantize", "--help").out  # --calib-images still says what it takes


def test_a_dry_run_for_a_gpu_on_a_machine_without_one_plans_and_says_the_run_would_stop(cli, monkeypatch, tmp_path):
    """Planning on a laptop for a cluster job is allowed (exit 0), but not silently."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    result = cli("compress", "cifar_resnet8", "--recipe", "fmnist_quick", "--device", "cuda", "--dry-run")
    assert result.code == 0, result.err
    assert "note: device 'cuda' requested but torch sees no CUDA GPU" in result.err
    assert "would stop here" in result.err and "Traceback" not in result.err
    assert "target" in result.out and list(tmp_path.iterdir()) == []
    quiet = cli("compress", "cifar_resnet8", "--recipe", "fmnist_quick", "--dry-run")
    assert quiet.code == 0 and "note:" not in quiet.err
