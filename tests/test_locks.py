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


def _held_at(point: str, barrier: Path) -> dict:
    """Environment that stops a process at ``locks.hold_point(point)`` until ``_release``."""
    barrier.mkdir(parents=True, exist_ok=True)
    return {locks.HOLD_ENV: f"{point}:{barrier}"}


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit {proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.02)


def _release(point: str, barrier: Path) -> None:
    (barrier / f"{point}.release").write_text("go")


def test_hold_point_is_inert_without_the_variable_and_waits_with_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(locks.HOLD_ENV, raising=False)
    locks.hold_point("run-locked")  # returns at once: no variable
    monkeypatch.setenv(locks.HOLD_ENV, f"other:{tmp_path}")
    locks.hold_point("run-locked")  # another point: returns at once
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(locks.HOLD_ENV, f"run-locked:{tmp_path}")
    monkeypatch.setattr(locks, "HOLD_TIMEOUT_S", 0.2)
    started = time.monotonic()
    locks.hold_point("run-locked")  # no release file: waits until the (shortened) timeout
    assert time.monotonic() - started >= 0.2
    assert (tmp_path / "run-locked.reached").read_text() == str(os.getpid())


@pytest.mark.slow
def test_two_compress_processes_on_one_directory(tmp_path) -> None:
    """The second is refused with exit 2 while the first holds the directory, without touching
    a byte of it, and the first then finishes. The first is held at a barrier with the lock taken
    (``locks.hold_point``), so the outcome never depends on start-up times."""
    recipe = write_recipe(tmp_path / "tiny.yaml")
    env = {"CASCADEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out, barrier = tmp_path / "shared", tmp_path / "barrier"
    first = _compress(recipe, out, {**env, **_held_at("run-locked", barrier)}, "--resume")
    try:
        _wait_for(barrier / "run-locked.reached", first, "the first writer's lock")
        before = _snapshot(out)
        second = cli_subprocess("compress", "cifar_resnet8", "--recipe", recipe, "--out", out, "--resume", env=env)
        after = _snapshot(out)  # the first is still held: any change is the second's
    finally:
        _release("run-locked", barrier)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.code == 2 and f"in use by process {first.pid}" in second.err and "Traceback" not in second.err
    assert before and after == before
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert (out / "student.safetensors").is_file()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its modification time (ns) and contents."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_two_processes_need_one_teacher_cache_entry(tmp_path) -> None:
    """Both finish; the teacher is trained once and the other process loads what was written.
    The first is held inside the cache entry's lock before it looks at the cache; the second
    must then say it waits (without the lock it would train a teacher of its own, every time)."""
    recipe = write_recipe(tmp_path / "tiny.yaml")
    env = {"CASCADEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    barrier = tmp_path / "barrier"
    first = _compress(recipe, tmp_path / "run0", {**env, **_held_at("teacher-cache", barrier)})
    log = tmp_path / "second.err"
    try:
        _wait_for(barrier / "teacher-cache.reached", first, "the first process's cache lock")
        with open(log, "w") as err_file:
            second = subprocess.Popen(
                compress_command(recipe, tmp_path / "run1"),
                env={**os.environ, "COLUMNS": "80", "CASCADEC_NO_PROGRESS": "1", **env},
                cwd=str(REPO_ROOT),
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                text=True,
            )
        deadline = time.monotonic() + 180
        while "waiting for it" not in log.read_text():
            assert second.poll() is None, f"the second process did not wait for the lock: {log.read_text()}"
            assert time.monotonic() < deadline, "the second process never reached the cache lock"
            time.sleep(0.05)
    finally:
        _release("teacher-cache", barrier)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.wait(timeout=300) == 0, log.read_text()
    errs = [first_err, log.read_text()]
    trained = sum("teacher: no weights given; training" in err for err in errs)
    loaded = sum("teacher: loaded from cache" in err for err in errs)
    assert (trained, loaded) == (1, 1), errs
    assert "teacher: no weights given; training" in first_err  # the held one trained, the other waited
    a, b = (tmp_path / f"run{i}" / "teacher.safetensors" for i in range(2))
    assert a.read_bytes() == b.read_bytes()
    assert len(list((tmp_path / "cache" / "teachers").glob("*.safetensors"))) == 1
