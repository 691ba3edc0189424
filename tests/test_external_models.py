"""Models from outside the registry: user code (file.py:builder, package.module:builder) and
timm/NAME, from the CLI, through compress and a fresh-process reload."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers.cli import REPO_ROOT, write_recipe

from cascadec.errors import UserError
from cascadec.models import create_model

NETS = textwrap.dedent("""
    import torch.nn as nn

    def build(num_classes=10, in_channels=3, width=8):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def not_a_model(num_classes=10):
        return 42

    def broken(num_classes=10):
        raise RuntimeError("the user's bug\\nsecond line")
""")


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


@pytest.mark.slow
def test_user_code_compresses_and_reloads_in_a_fresh_process(cli, nets, tmp_path, isolated_cache, monkeypatch):
    recipe = write_recipe(tmp_path / "tiny.yaml", model={"name": "cifar_resnet8"})
    monkeypatch.chdir(tmp_path)  # a relative builder path, as a user types it
    out = tmp_path / "run"
    result = cli("compress", "nets.py:build", "--recipe", recipe, "--out", out, "--set", "model.options.width=16")
    assert result.code == 0, result.err
    spec = json.loads((out / "student.widths.json").read_text())
    assert spec["model"] == f"{nets.resolve()}:build" and spec["model_kwargs"]["options"] == {"width": 16}
    script = "import sys; from cascadec.prune.spec import load_student; m, _ = load_student(sys.argv[1]); print(type(m).__name__)"
    reload = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert reload.returncode == 0 and reload.stdout.strip() == "Sequential", reload.stderr


def test_module_builders_get_num_classes_and_are_adapted_to_the_channels():
    model = create_model("torchvision.models:resnet18", num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("missing.py:build", "not found"),
        ("NETS:nothing", "has no callable 'nothing'"),
        ("NETS:not_a_model", "returned a int, not a torch.nn.Module"),
        ("NETS:broken", "the builder failed (RuntimeError: the user's bug)"),
        ("no_such_package_xyz.mod:build", "importing no_such_package_xyz.mod failed"),
        (":build", "expected file.py:builder"),
    ],
)
def test_user_code_errors_are_one_line(nets, name, needle):
    with pytest.raises(UserError) as refused:
        create_model(name.replace("NETS", str(nets)), num_classes=3)
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_options_are_refused_for_registry_models():
    with pytest.raises(UserError, match="model.options apply to timm/"):
        create_model("cifar_resnet8", options={"width": 3})


@pytest.mark.slow
def test_timm_models_by_name(cli):
    pytest.importorskip("timm")
    result = cli("inspect", "timm/resnet18", "--image-size", "64", "--num-classes", "5", "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert info["model"] == "timm/resnet18" and info["groups"] and info["prunable_units"] > 0
    model = create_model("timm/resnet18", num_classes=5, in_channels=1)
    assert model.get_classifier().out_features == 5 and model.conv1.in_channels == 1
    with pytest.raises(UserError, match="did you mean timm/resnet18"):
        create_model("timm/resnet18x")


def test_timm_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(UserError, match=r"timm is not installed: pip install 'cascadec\[timm\]'"):
        create_model("timm/resnet18")


def test_models_list_says_where_names_come_from(cli):
    result = cli("models", "list", "--source", "cifar_resnet8")
    assert result.code == 0 and result.out.split() == ["cifar_resnet8", "cascadec"]
    assert "torchvision" in cli("models", "list", "--source", "resnet50").out
    pytest.importorskip("timm")
    listed = cli("models", "list", "--timm", "resnet18d").out.split()
    assert "timm/resnet18d" in listed
