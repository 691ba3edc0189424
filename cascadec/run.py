"""The run directory: the contract between stages, and what makes resume possible.

Layout (all pickle-free)::

    runs/<model>-<recipe>/
      recipe.yaml              the resolved recipe (after --set, --data, --weights)
      manifest.json            versions, command, per-stage status and timings, metrics
      teacher.safetensors      the teacher's weights (its architecture is the recipe's model)
      student.widths.json      the student's width spec (removed channels per group)
      student.safetensors      the student's weights
      checkpoints/             while the prune stage runs: joint.safetensors, student.safetensors
                               (training state for --resume; removed when the stage finishes);
                               while QAT runs: qat.<flavour>.safetensors (removed once its file is written)
      teacher.onnx, student.onnx
      report.json, report.md

A finished run is never overwritten: a second ``compress`` into the same directory is
refused unless ``--resume`` (which skips finished stages and continues an unfinished prune
stage from its last checkpoint) is given.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cascadec import locks
from cascadec.errors import UserError, first_line
from cascadec.fileio import write_json_atomic
from cascadec.locks import LOCK_NAME
from cascadec.recipe import Recipe, recipe_to_yaml, validate_recipe
from cascadec.train.distributed import Dist

MANIFEST_FORMAT = "cascadec-run/1"
CHECKPOINTS = "checkpoints"  # RUN/checkpoints: training state of an unfinished stage (the layout above)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in (
        "cascadec",
        "torch",
        "torchvision",
        "torch-pruning",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "onnxslim",
        "numpy",
        "tensorrt",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    commit = git_commit()
    if commit:
        out["cascadec_commit"] = commit
    return out


def git_commit(ignore: tuple[str, ...] = ()) -> str | None:
    """The source commit (with '+dirty' for local changes), so results name the code that made them.
    ``ignore``: paths whose changes do not count (a benchmark's own results files, which the run
    before it left uncommitted)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [f":(exclude){path}" for path in ignore],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if sha and dirty else (sha or None)


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: Path, manifest: dict[str, Any], *, writable: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        # ranks other than 0 of a distributed run read the run directory but never write it:
        # their manifest changes stay in memory and stages skip artifact writes
        self.writable = writable
        self._locked = False  # whether this object holds the directory's writer lock (see lock())
        self.was_finished = False  # a resume of a finished run: its outcome must never downgrade it

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ one writer at a time
    def lock(self) -> None:
        """Become the directory's one writing process (cascadec.locks), or raise a one-line
        UserError naming the process that is. Every writer takes it before its first write."""
        if not self._locked:
            locks.acquire(self.path / LOCK_NAME, what=f"run directory {self.path}")
            self._locked = True

    def release(self) -> None:
        """Let another process write here (the kernel also releases the lock when this one ends)."""
        if self._locked:
            locks.release(self.path / LOCK_NAME)
            self._locked = False

    # ------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: Path, recipe: Recipe, *, resume: bool = False, command: list[str] | None = None) -> RunDir:
        """A new run directory, or (``resume``) the unfinished one at ``path``; either way locked
        for this process before anything in it is written or trusted."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        digest = recipe_digest(recipe)
        if path.exists() and not path.is_dir():
            raise UserError(f"run directory {path} is a file, not a directory")
        if path.exists() and not manifest_path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise UserError(f"{path} exists and is not a cascadec run directory; choose another run directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK):
            raise UserError(f"run directory {path} is not writable")
        run = cls(path, {}, writable=True)
        run.lock()  # a second process starting on the same directory stops here, before any write
        try:
            if manifest_path.exists():
                run.manifest = _read_manifest(path)
                run._resume(recipe, digest, resume)
            else:
                run._start(recipe, digest, command)
            locks.hold_point("run-locked")
        except BaseException:
            run.release()
            raise
        return run

    def _resume(self, recipe: Recipe, digest: str, resume: bool) -> None:
        status = self.manifest.get("status")
        if not resume:
            if status == "finished":
                raise UserError(f"{self.path} holds a finished run; choose another run directory (--out) or delete it")
            raise UserError(
                f"{self.path} holds an unfinished run; resume it (--resume) or choose another run directory (--out)"
            )
        if self.manifest.get("recipe_digest") != digest:
            raise UserError(
                f"{self.path}: resuming with a different recipe than the run was started with; choose another run directory"
            )
        self.was_finished = status == "finished"
        if not self.was_finished:  # a finished run stays finished even if this process is killed
            self.manifest["status"] = "running"
        self.manifest.setdefault("resumed", []).append(_now())
        self.save()

    def _start(self, recipe: Recipe, digest: str, command: list[str] | None) -> None:
        try:
            (self.path / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        except OSError as exc:  # read-only mount, full disk, quota: os.access cannot tell
            raise UserError(f"cannot write to run directory {self.path}: {exc.strerror or exc}") from None
        self.manifest = {
            "format": MANIFEST_FORMAT,
            "created": _now(),
            "command": command or sys.argv,
            "recipe": recipe.name,
            "recipe_digest": digest,
            "versions": library_versions(),
            "status": "running",
            "stages": {},
            "metrics": {},
        }
        self.save()

    @classmethod
    def open(cls, path: Path, *, writable: bool = True) -> RunDir:
        """An existing run directory. ``writable`` (the default) takes the writer lock first, so
        that what is read is what the last writer finished; read-only opens never wait or lock."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"run directory not found: {path}")
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path} is not a cascadec run directory (no manifest.json)")
        run = cls(path, {}, writable=writable)
        if writable:
            run.lock()
        try:
            run.manifest = _read_manifest(path)
        except BaseException:
            run.release()
            raise
        return run

    # ------------------------------------------------------------ contents
    def recipe(self) -> Recipe:
        path = self.path / "recipe.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: missing") from None
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
            raise UserError(f"{path}: malformed YAML") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return validate_recipe(data if isinstance(data, dict) else {}, str(path))

    def file(self, name: str) -> Path:
        return self.path / name

    def save(self) -> None:
        if self.writable:
            write_json_atomic(self.path / "manifest.json", self.manifest)

    def is_done(self, stage: str) -> bool:
        return self.manifest["stages"].get(stage, {}).get("status") == "done"

    def record(self, key: str, value: Any) -> None:
        self.manifest["metrics"][key] = value
        self.save()

    def metric(self, key: str, default: Any = None) -> Any:
        return self.manifest["metrics"].get(key, default)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage and record its outcome; the yielded dict is stored with it.

        Re-running a stage that was done (``verify`` or ``profile`` on a finished run) and
        failing keeps the done record and its artifacts' meaning: the failed attempt is stored
        under ``last_attempt`` instead of replacing it."""
        previous = self.manifest["stages"].get(name)
        info: dict[str, Any] = {"status": "running", "started": _now()}
        if not (isinstance(previous, dict) and previous.get("status") == "done"):
            previous = None
            self.manifest["stages"][name] = info
            self.save()
        start = time.perf_counter()
        try:
            yield info
        except BaseException as exc:
            info["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            info["error"] = first_line(exc)
            info["seconds"] = round(time.perf_counter() - start, 3)
            if previous is not None:
                previous["last_attempt"] = info
            self.save()
            raise
        info["status"] = "done"
        info["seconds"] = round(time.perf_counter() - start, 3)
        self.manifest["stages"][name] = info
        self.save()

    def finish(self, status: str = "finished") -> None:
        """Record how the run ended and let other processes write here again. A resume of a
        finished run that fails (a damaged artifact, Ctrl-C) records that, and stays finished:
        its artifacts are still the ones that finished."""
        if self.was_finished and status != "finished":
            self.manifest["status"] = "finished"
            self.manifest["last_resume"] = {"status": status, "at": _now()}
        else:
            self.manifest["status"] = status
            self.manifest["finished"] = _now()
        try:
            self.save()
        finally:
            self.release()


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def open_run(dist: Dist, path: Path, recipe: Recipe, resume: bool, command: list[str] | None) -> RunDir:
    """Rank 0 creates (or resumes) the run directory; the other ranks open it read-only. A refusal
    on rank 0 is sent to every rank, so all of them stop with the same one-line error."""
    if not dist.active:
        return RunDir.create(path, recipe, resume=resume, command=command)
    run, error = None, None
    if dist.is_main:
        try:
            run = RunDir.create(path, recipe, resume=resume, command=command)
        except UserError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    return run if run is not None else RunDir.open(path, writable=False)


@contextmanager
def closing_run(run: RunDir) -> Iterator[RunDir]:
    """Mark the run finished, interrupted or failed as its stages end; a file system that
    refuses a write (full disk, quota, read-only) is a one-line UserError naming the run
    directory, not a traceback."""
    try:
        yield run
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            run.finish("failed")
            raise
        message = f"cannot write to run directory {run.path}: {exc.strerror or exc}"
        try:
            run.finish("failed")
        except UserError:
            pass  # the manifest cannot be written either; the first error is the one to report
        raise UserError(message) from None
    except BaseException:
        run.finish("failed")
        raise
    run.finish("finished")


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{manifest_path}: corrupted manifest") from None
    except FileNotFoundError:
        raise UserError(f"{path} is not a cascadec run directory (no manifest.json)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{manifest_path}: not a cascadec manifest")
    for key in ("stages", "metrics"):
        if not isinstance(manifest.get(key), dict):
            raise UserError(f"{manifest_path}: corrupted manifest ({key!r} missing or not a mapping)")
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
