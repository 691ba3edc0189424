"""Helpers shared by the CLI/run tests: the tiny synthetic recipe and ways to run the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

# A cifar_resnet8 compress run on synthetic data that finishes in seconds on 2 CPU cores.
# The recipe's data section cannot pass synthetic sizes (train_size/val_size), so the
# defaults (512/128 images) are cut down with train_limit/val_limit.
TINY_RECIPE: dict = {
    "name": "tiny_synthetic",
    "description": "cifar_resnet8 on synthetic data, a few steps of everything (tests)",
    "model": {"name": "cifar_resnet8"},
    "data": {"name": "synthetic", "train_limit": 64, "val_limit": 32, "batch_size": 16},
    "teacher": {"train_epochs": 1, "lr": 0.05},
    "prune": {"method": "cascade", "target": {"flops_reduction": 0.5}, "importance_batches": 1},
    "cascade": {"num_tas": 1},
    "train": {"joint_epochs": 1, "student_epochs": 1, "max_steps_per_epoch": 2},
    "verify": {"samples": 32},
    "profile": {"batches": [1, 2], "duration_s": 0.05, "warmup_s": 0.01, "min_iters": 2},
}


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def write_recipe(path: Path, data: dict | None = None, **sections) -> Path:
    """Write TINY_RECIPE (or ``data``) to ``path``, with top-level sections updated."""
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or TINY_RECIPE).items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch with ``n`` intra-op threads for a block.

    On a 2-core machine shared with other work, torch's default (one thread per core) makes
    small models several times slower than one thread (threads spin waiting for each other),
    so heavy in-process test work runs single-threaded.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invoke_cli(*args: str) -> CliResult:
    """``cascadec.cli.main`` in this process, stdout/stderr captured without pytest's capsys
    (usable from module- and session-scoped fixtures)."""
    from cascadec.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch_threads(1):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def compress_command(recipe: Path | str, out: Path | str, *extra: str, model: str = "cifar_resnet8") -> list[str]:
    """``python -m cascadec compress MODEL --recipe RECIPE --out OUT ...``, for tests and scripts that
    start (and race, kill or time) real compress processes."""
    return [sys.executable, "-m", "cascadec", "compress", model, "--recipe", str(recipe), "--out", str(out), *extra]


def cli_subprocess(*args: str, env: dict | None = None, timeout: float = 300) -> CliResult:
    """``python -m cascadec ARGS`` in a fresh interpreter: what a shell user sees."""
    full_env = {**os.environ, "COLUMNS": "80", "CASCADEC_NO_PROGRESS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "cascadec", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(REPO_ROOT),
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def kill_writer_midway(script: str, arg: Path, ready, delay: float) -> int:
    """Run ``python -c script arg``, wait until ``ready()`` says it has written once, let it write
    on for ``delay`` seconds, then SIGKILL it: a crash at an arbitrary moment of a write loop.
    Returns the exit status (``-SIGKILL``)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(arg)], env=env, cwd=str(REPO_ROOT))
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode
