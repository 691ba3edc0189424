"""Hostile input found by hand (issue 11): each is exit 2 with one line naming the problem,
nothing is written outside the run directory and the cache, and nothing finished is downgraded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cascadec.teacher import cache_path


def _one_line_error(result, *needles: str) -> str:
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err and "internal error" not in result.err
    line = result.err_lines[-1]
    assert line.startswith("error: ") and sum(entry.startswith("error:") for entry in result.err_lines) == 1
    for needle in needles:
        assert needle in line, line
    return line


def _tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["x/../../../esc", "../esc", ".hidden", "a" * 200, "a\\..\\b"])
def test_a_recipe_name_cannot_leave_runs(cli, tiny_recipe, tmp_path, monkeypatch, isolated_cache, name) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    result = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--set", f"name={name}")
    _one_line_error(result, "recipe name")
    assert _tree(tmp_path) == before  # nothing written anywhere, runs/ included


def test_a_model_name_is_one_path_component_of_the_default_run_directory() -> None:
    from cascadec.recipe import load_recipe
    from cascadec.stages import default_out

    for model in ("timm/resnet50", "../../x", "/etc/passwd", "my_nets.py:build"):
        out = default_out(model, load_recipe("fmnist_quick"))
        assert out.parent == Path("runs") and len(out.parts) == 2 and not out.name.startswith("."), out


def test_common_keys_in_data_options_are_refused(cli, tiny_recipe) -> None:
    result = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--set", "data.options.seed=3", "--dry-run")
    _one_line_error(result, "data.options", "train.seed")


def test_a_damaged_teacher_of_a_finished_run_is_named_and_the_run_stays_finished(cli, copy_run, finished_run) -> None:
    run = copy_run()
    teacher = run / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:100])
    os.environ["CASCADEC_CACHE"] = str(finished_run.cache)
    try:
        result = cli("compress", "cifar_resnet8", "--recipe", finished_run.recipe, "--out", run, "--resume")
    finally:
        del os.environ["CASCADEC_CACHE"]
    _one_line_error(result, str(teacher), "damaged teacher weights")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["last_resume"]["status"] == "failed"


@pytest.mark.slow
def test_a_damaged_teacher_cache_entry_is_named_retrained_and_replaced(cli, tiny_recipe, tmp_path, isolated_cache):
    from cascadec.data.loaders import load_data, model_kwargs
    from cascadec.recipe import load_recipe

    recipe = load_recipe(str(tiny_recipe))
    entry = cache_path(recipe, model_kwargs(recipe, load_data(recipe)))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"not a safetensors file")
    result = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert f"teacher: cache {entry} is damaged" in result.err and "training the teacher again" in result.err
    from safetensors.torch import load_file

    assert load_file(str(entry))  # replaced by a whole, loadable entry
    wrong = {"w": torch.zeros(1)}  # a loadable file that is not this teacher
    save_file(wrong, str(entry))
    again = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", tmp_path / "run2")
    assert again.code == 0 and f"teacher: cache {entry} is damaged" in again.err


def test_verify_refuses_overrides_that_cannot_apply_to_a_finished_run(cli, copy_run) -> None:
    run = copy_run()
    result = cli("verify", run, "--set", "model.name=resnet50")
    _one_line_error(result, "model.name", "cannot apply to a finished run")
    result = cli("verify", run, "--set", "prune.target.flops_reduction=0.9")
    _one_line_error(result, "prune.target.flops_reduction")


def test_nan_weights_are_named_as_such(cli, copy_run) -> None:
    from safetensors.torch import load_file

    run = copy_run()
    weights = load_file(str(run / "student.safetensors"))
    name = next(k for k in weights if k.endswith("conv1.weight"))
    weights[name][0].fill_(float("nan"))
    save_file(weights, str(run / "student.safetensors"))
    result = cli("verify", run)
    assert result.code == 3, result.err
    assert "RuntimeWarning" not in result.err and "Traceback" not in result.err
    assert f"weights hold NaN/inf ({name})" in result.err
    assert "itself departs from the exact result" not in result.err  # no misleading diagnosis


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo cascadec-test-pwned > /dev/null",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_asks_to_run_code_is_refused_and_named(tmp_path, writer) -> None:
    import pickle

    from cascadec.errors import UserError
    from cascadec.models.weights import read_state_dict

    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"conv.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": _RunsCode()}, protocol=4))
    with pytest.raises(UserError) as refused:
        read_state_dict(path)
    message = str(refused.value)
    assert "asks to run code when loaded" in message and "system" in message and "was not loaded" in message
    assert "weights_only" not in message and "\n" not in message


def test_recipe_weights_for_another_model_are_refused_before_any_work(cli, tmp_path, monkeypatch) -> None:
    from cascadec.stages import RANDOM_WEIGHTS, prepare_recipe

    monkeypatch.chdir(tmp_path)
    result = cli("compress", "cifar_resnet20", "--recipe", "fmnist_quick")
    _one_line_error(result, "brings weights for cifar_resnet8", "--weights", "teacher.train_epochs")
    assert not (tmp_path / "runs").exists()
    assert prepare_recipe("cifar_resnet20", "fmnist_quick", weights=RANDOM_WEIGHTS).model.weights is None
    assert cli("compress", "cifar_resnet20", "--recipe", "fmnist_quick", "--dry-run").code == 0  # dry runs need none
