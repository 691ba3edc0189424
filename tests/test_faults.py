"""Faults during training: each ends with a clear one-line message and the right exit code,
and leaves a checkpoint that can be loaded (and resumed from)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys

import pytest
import torch
from helpers.cli import REPO_ROOT, cli_subprocess, write_recipe
from test_resume import _kill_when_training

from cascadec.train.checkpoint import load_checkpoint

TRAIN = {"joint_epochs": 2, "student_epochs": 1, "max_steps_per_epoch": 4, "checkpoint_every_steps": 1}


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "faults.yaml", train=TRAIN)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(cli, recipe, tmp_path, isolated_cache) -> None:
    out = tmp_path / "run"
    result = cli("compress", "cifar_resnet8", "--recipe", recipe, "--out", out, "--set", "train.lr=1e30")
    assert result.code == 2
    line = result.err_lines[-1]
    assert sum(entry.startswith("error:") for entry in result.err_lines) == 1 and "Traceback" not in result.err
    assert line.startswith("error: joint phase: loss became") and "NaN/inf" in line and "train.lr" in line
    assert "checkpoints/joint.safetensors" in line
    state = load_checkpoint(out / "checkpoints" / "joint.safetensors")
    assert (state["epoch"], state["step"]) >= (0, 1)  # written after a good step, before the bad one
    assert all(torch.isfinite(w).all() for w in state["trainer"]["weights"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["prune"]["status"] == "failed"


def test_full_disk_during_a_checkpoint_is_exit_2_one_line(cli, recipe, tmp_path, isolated_cache, monkeypatch) -> None:
    monkeypatch.setattr("cascadec.train.checkpoint.write_bytes_atomic", _no_space)  # the disk fills at a checkpoint
    result = cli("compress", "cifar_resnet8", "--recipe", recipe, "--out", tmp_path / "run")
    assert result.code == 2
    assert result.err_lines[-1].startswith("error: cannot write checkpoint") and "disk full" in result.err_lines[-1]
    assert "Traceback" not in result.err


def test_full_disk_while_writing_an_artifact_is_exit_2_one_line(
    cli, recipe, tmp_path, isolated_cache, monkeypatch
) -> None:
    from cascadec import stages

    monkeypatch.setattr(stages, "save_file", _no_space)  # teacher.safetensors is the first artifact
    out = tmp_path / "run"
    result = cli("compress", "cifar_resnet8", "--recipe", recipe, "--out", out)
    assert result.code == 2
    # progress lines (teacher training) come first; the error is the one line at the end
    assert result.err_lines[-1] == f"error: cannot write to run directory {out}: No space left on device"
    assert sum(line.startswith("error:") for line in result.err_lines) == 1 and "Traceback" not in result.err


def test_unwritable_out_dir_is_exit_2_one_line(cli, recipe, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("compress", "cifar_resnet8", "--recipe", recipe, "--out", blocker / "run")
    assert result.code == 2
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith(
        f"error: cannot create run directory {blocker / 'run'}"
    )


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes(recipe, tmp_path) -> None:
    env = {"CASCADEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cascadec", "compress", "cifar_resnet8", "--recipe", str(recipe), "--out", str(out)]
    proc = _kill_when_training(cmd, env, out / "checkpoints" / "joint.safetensors", sig=signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "writing a checkpoint" in err and err.strip().splitlines()[-1] == "interrupted (continue with --resume)"
    state = load_checkpoint(out / "checkpoints" / "joint.safetensors")
    assert (state["epoch"], state["step"]) > (0, 1)  # the step in progress finished and was saved
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stages"]["prune"]["status"] == "interrupted"

    resumed = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", out, "--resume", env=env)
    assert resumed.code == 0, resumed.err
    history = json.loads((out / "manifest.json").read_text())["metrics"]["prune.history"]
    assert [e["steps"] for e in history["joint"]] == [4, 4] and [e["epoch"] for e in history["student"]] == [-1, 0]
