"""One writer per run directory and per teacher cache entry, across real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.cli import REPO_ROOT, cli_subprocess, compress_command, write_recipe

from cascadec import locks
from cascadec.errors import UserError
from cascadec.recipe import load_recipe
from cascadec.run import RunDir

_HOLDER = textwrap.dedent("""
    import sys, time
    from cascadec.recipe import load_recipe
    from cascadec.run import RunDir
    run = RunDir.create(sys.argv[1], load_recipe("fmnist_quick"), resume=True)
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold(path: Path) -> subprocess.Popen:
    """A process that creates (or resumes) the run at ``path`` and keeps its lock until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CASCADEC_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.communicate(timeout=30)


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_directory_and_the_holder(tmp_path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        with pytest.raises(UserError) as refused:
            RunDir.create(run_dir, load_recipe("fmnist_quick"), resume=True)
        message = str(refused.value)
        assert f"run directory {run_dir} is in use by process {holder.pid}" in message and "\n" not in message
        with pytest.raises(UserError, match="in use by process"):
            RunDir.open(run_dir)  # verify/profile/export write report.json: refused too
        reader = RunDir.open(run_dir, writable=False)  # report and other readers are never blocked
        assert reader.manifest["status"] == "running"
    finally:
        _stop(holder)


@pytest.mark.slow
def test_sigkill_leaves_no_stale_lock(tmp_path) -> None:
    run_dir = tmp_path / "run"
    _stop(_hold(run_dir), signal.SIGKILL)
    started = time.monotonic()
    run = RunDir.create(run_dir, load_recipe("fmnist_quick"), resume=True)  # at once: the kernel dropped it
    assert time.monotonic() - started < 5
    assert run.manifest["resumed"]
    run.finish("interrupted")
    assert not locks.holds(run_dir / locks.LOCK_NAME)  # finishing lets the next writer in


def test_locks_are_reentrant_within_a_process_and_released_by_the_last_holder(tmp_path) -> None:
    path = tmp_path / "x.lock"
    locks.acquire(path, what="x")
    locks.acquire(path, what="x")
    locks.release(path)
    assert locks.holds(path)
    locks.release(path)
    assert not locks.holds(path)


@pytest.mark.slow
def test_cli_exit_2_while_another_process_writes_the_run(tmp_path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        result = cli_subprocess("verify", run_dir)
        assert result.code == 2 and len(result.err_lines) == 1, result.err
        assert result.err_lines[0].startswith(f"error: run directory {run_dir} is in use by process {holder.pid} ")
    finally:
        _stop(holder)


def _compress(recipe: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    cmd = compress_command(recipe, out, *extra)
    return subprocess.Popen(
        cmd,
        env={**os.environ, "COLUMNS": "80", "CASCADEC_NO_PROGRESS": "1", **env},
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_compress_processes_on_one_directory(tmp_path) -> None:
    """The second is refused with exit 2 while the first finishes, and what the first wrote is
    bit for bit what a lone run writes."""
    recipe = write_recipe(tmp_path / "tiny.yaml")
    env = {"CASCADEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    lone = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", tmp_path / "lone", env=env)
    assert lone.code == 0, lone.err
    out = tmp_path / "shared"
    first = _compress(recipe, out, env, "--resume")
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").exists():  # the manifest is written under the lock
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", out, "--resume", env=env)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.code == 2 and f"in use by process {first.pid}" in second.err and "Traceback" not in second.err
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    for name in ("student.safetensors", "student.widths.json", "teacher.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "lone" / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_need_one_teacher_cache_entry(tmp_path) -> None:
    """Both finish; the teacher is trained once and the other process loads what was written."""
    recipe = write_recipe(tmp_path / "tiny.yaml")
    env = {"CASCADEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    procs = [_compress(recipe, tmp_path / f"run{i}", env) for i in range(2)]
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        errs.append(err)
    trained = sum("teacher: no weights given; training" in err for err in errs)
    loaded = sum("teacher: loaded from cache" in err for err in errs)
    assert (trained, loaded) == (1, 1), errs
    a, b = (tmp_path / f"run{i}" / "teacher.safetensors" for i in range(2))
    assert a.read_bytes() == b.read_bytes()
    assert len(list((tmp_path / "cache" / "teachers").glob("*.safetensors"))) == 1
