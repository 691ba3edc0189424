"""Mid-training resume: a ``compress`` killed with SIGKILL in the prune stage continues with
``--resume`` from its last checkpoint and ends exactly where an uninterrupted run ends
(same steps, same masks, same accuracy: CPU training here is deterministic, and the
checkpoint holds weights, optimisers, scheduler, scores, RNG states and the data position)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import REPO_ROOT, cli_subprocess, write_recipe

from cascadec.train.checkpoint import load_checkpoint

# 4 batches per epoch (64 images, batch 16), 2 joint + 2 student epochs, a checkpoint after every step
TRAIN = {"joint_epochs": 2, "student_epochs": 2, "max_steps_per_epoch": 4, "checkpoint_every_steps": 1}


@pytest.fixture(scope="module")
def resume_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(root / "resume.yaml", train=TRAIN)
    env = {"CASCADEC_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    reference = root / "reference"
    result = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", reference, env=env)
    assert result.code == 0, result.err
    return root, recipe, env, reference


def _history(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["metrics"]["prune.history"]


def _steps(history: dict) -> tuple[list[int], int]:
    return [e["steps"] for e in history["joint"]], len([e for e in history["student"] if e["epoch"] >= 0])


def _kill_when_training(
    cmd: list[str], env: dict, checkpoint: Path, *, sig: int, min_step: int = 1
) -> subprocess.Popen:
    """Start ``cmd``, wait until ``checkpoint`` records a position past step ``min_step`` of the
    joint phase (the run is mid-training), then send ``sig``."""
    full_env = {**os.environ, "COLUMNS": "80", "CASCADEC_NO_PROGRESS": "1", **env}
    proc = subprocess.Popen(
        cmd, env=full_env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no mid-training checkpoint within 240 s"
        # atomic writes: a checkpoint that exists is always complete (a UserError here fails the test)
        state = load_checkpoint(checkpoint) if checkpoint.exists() else None
        if state is not None and (state["epoch"], state["step"]) >= (0, min_step):
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(resume_env) -> None:
    root, recipe, env, reference = resume_env
    out = root / "killed"
    cmd = [sys.executable, "-m", "cascadec", "compress", "cifar_resnet8", "--recipe", str(recipe), "--out", str(out)]
    proc = _kill_when_training(cmd, env, out / "checkpoints" / "joint.safetensors", sig=signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["prune"]["status"] == "running"  # killed inside the prune stage
    assert not (out / "student.widths.json").exists()

    resumed = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", out, "--resume", env=env)
    assert resumed.code == 0, resumed.err
    assert "resuming at epoch" in resumed.err
    assert _steps(_history(out)) == _steps(_history(reference)) == ([4, 4], 2)
    # equivalent final masks: the same channels removed from every group
    widths = json.loads((out / "student.widths.json").read_text())
    expected = json.loads((reference / "student.widths.json").read_text())
    assert widths["removed_channels"] == expected["removed_channels"]
    done = json.loads((out / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    assert done["metrics"]["student.accuracy"] == ref["metrics"]["student.accuracy"]
    assert [e["student_accuracy"] for e in _history(out)["student"]] == [
        e["student_accuracy"] for e in _history(reference)["student"]
    ]
    assert done["status"] == "finished" and len(done["resumed"]) == 1
    assert not (out / "checkpoints").exists()  # removed once the prune stage is done
    # what docs/run-directory.md ("Resuming") promises: on CPU the resumed student is bit-identical to the uninterrupted one
    for name in ("student.safetensors", "student.widths.json", "teacher.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------- in process, both methods


class _StopAfter:
    """Simulates a Ctrl-C after ``steps`` optimiser steps (the flag the SIGINT handler sets)."""

    def __init__(self, runtime, steps: int) -> None:
        self.runtime, self.left = runtime, steps
        self._step = runtime.backward_step
        runtime.backward_step = self

    def __call__(self, *args, **kwargs):
        self._step(*args, **kwargs)
        self.left -= 1
        if self.left == 0:
            self.runtime.stop.requested = True


@pytest.mark.parametrize(
    "method, stop_after",
    [("cascade", 4), ("cascade", 7), ("oneshot", 5), ("cascade-hsakd", 4), ("cascade-hsakd", 7), ("fbs", 5)],
)
@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(method, stop_after, tmp_path, monkeypatch) -> None:
    """Library level: stop after N steps (mid joint phase / in the student phase / mid
    fine-tune), resume from the checkpoint in a fresh Runtime, get bit-identical results."""
    import copy

    import torch

    from cascadec.data.loaders import make_loaders
    from cascadec.data.synthetic import build
    from cascadec.models import create_model
    from cascadec.prune.methods import prune_model
    from cascadec.recipe import Recipe
    from cascadec.train.runtime import Runtime

    monkeypatch.setenv("CASCADEC_CACHE", str(tmp_path / "cache"))  # HSAKD's teacher heads
    prune_method, _, distill = method.partition("-")
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "model": {"name": "cifar_resnet8"},
            "data": {"name": "synthetic", "batch_size": 8},
            "prune": {"method": prune_method, "target": {"flops_reduction": 0.5}, "importance_batches": 1},
            "cascade": {"num_tas": 1},
            "distill": {"method": distill or "kl"},
            "train": {"joint_epochs": 2, "student_epochs": 1, "max_steps_per_epoch": 3},
        }
    )
    bundle = build(None, image_size=16, download=False, seed=0, train_size=32, val_size=16)
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=3).eval()
    example = torch.zeros(1, 3, 16, 16)
    cpu = torch.device("cpu")

    def run(directory, stop: int | None = None):
        train, _, val = make_loaders(bundle, recipe, cpu)  # val: the selection split
        runtime = Runtime(device=cpu, checkpoint_dir=directory)
        if stop is not None:
            _StopAfter(runtime, stop)
        torch.manual_seed(0)
        return prune_model(copy.deepcopy(teacher), recipe, train, val, example, cpu, runtime)

    reference = run(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", stop=stop_after)
    assert any((tmp_path / "resumed").glob("*.safetensors"))
    resumed = run(tmp_path / "resumed")
    if reference.mask is None:  # FBS: nothing removed
        assert resumed.mask is None
    else:
        assert torch.equal(reference.mask.cpu(), resumed.mask.cpu())
    for (name, a), b in zip(reference.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    phases = ("joint", "student") if prune_method == "cascade" else ("fine_tune",)
    for phase in phases:
        assert [e.get("steps", e.get("loss")) for e in reference.history[phase]] == [
            e.get("steps", e.get("loss")) for e in resumed.history[phase]
        ]
