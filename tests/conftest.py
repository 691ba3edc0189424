"""Shared fixtures: run the CLI in-process, a tiny synthetic recipe, and one finished tiny run.

Other test modules may add fixtures here; keep each one cheap unless it is session-scoped.
Plain helpers (no fixtures) live in ``tests/helpers/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.cli import CliResult, invoke_cli, torch_threads, write_recipe


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli("compress", ...)`` -> CliResult, via ``cascadec.cli.main`` and capsys (torch
    single-threaded: see ``helpers.cli.torch_threads``).

    Output width is pinned to 80 columns (what a pipe or CI log gets) so results do not
    depend on the terminal pytest runs in; a test may ``monkeypatch.setenv("COLUMNS", ...)``.
    """
    from cascadec.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("CASCADEC_NO_PROGRESS", "1")

    def run(*args) -> CliResult:
        capsys.readouterr()
        with torch_threads(1):
            code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the teacher cache at a temporary directory."""
    cache = tmp_path / "cascadec-cache"
    monkeypatch.setenv("CASCADEC_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A teacher cache shared by the session's tiny runs (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("cascadec-cache")


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    """Path of the tiny synthetic recipe (YAML)."""
    return write_recipe(tmp_path_factory.mktemp("recipes") / "tiny_synthetic.yaml")


@dataclass
class FinishedRun:
    path: Path
    recipe: Path
    cache: Path
    result: CliResult
    seconds: float


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_recipe, session_cache) -> FinishedRun:
    """One tiny ``cascadec compress`` run, finished. Treat it as read-only: tests that
    change a run (resume, verify, profile) work on a copy (``copy_run``)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADEC_CACHE", str(session_cache))
        mp.setenv("CASCADEC_NO_PROGRESS", "1")
        mp.setenv("COLUMNS", "80")
        start = time.perf_counter()
        result = invoke_cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out)
        seconds = time.perf_counter() - start
    if result.code != 0:
        pytest.fail(f"tiny compress run failed with exit code {result.code}:\n{result.err}")
    return FinishedRun(out, tiny_recipe, session_cache, result, seconds)


@pytest.fixture
def copy_run(finished_run, tmp_path):
    """A private copy of the finished tiny run, for tests that modify it."""
    import shutil

    def make(name: str = "run") -> Path:
        dest = tmp_path / name
        shutil.copytree(finished_run.path, dest)
        return dest

    return make
