"""The run directory: the contract between stages, and what makes resume possible.

Layout (all pickle-free)::

    runs/<model>-<recipe>/
      recipe.yaml              the resolved recipe (after --set, --data, --weights)
      manifest.json            versions, command, per-stage status and timings, metrics
      teacher.safetensors      the teacher's weights (its architecture is the recipe's model)
      student.widths.json      the student's width spec (removed channels per group)
      student.safetensors      the student's weights
      checkpoints/             while the prune stage runs: joint.safetensors, student.safetensors
                               (training state for --resume; removed when the stage finishes)
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

from cascadec.errors import UserError, first_line
from cascadec.fileio import write_json_atomic
from cascadec.recipe import Recipe, recipe_to_yaml, validate_recipe
from cascadec.train.distributed import Dist

MANIFEST_FORMAT = "cascadec-run/1"


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


def git_commit() -> str | None:
    """The source commit (with '+dirty' for local changes), so results name the code that made them."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
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

    # ------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: Path, recipe: Recipe, *, resume: bool = False, command: list[str] | None = None) -> RunDir:
        path = Path(path)
        manifest_path = path / "manifest.json"
        digest = recipe_digest(recipe)
        if manifest_path.exists():
            run = cls.open(path)
            status = run.manifest.get("status")
            if not resume:
                if status == "finished":
                    raise UserError(f"{path} holds a finished run; choose another run directory (--out) or delete it")
                raise UserError(
                    f"{path} holds an unfinished run; resume it (--resume) or choose another run directory (--out)"
                )
            if run.manifest.get("recipe_digest") != digest:
                raise UserError(
                    f"{path}: resuming with a different recipe than the run was started with; choose another run directory"
                )
            run.manifest["status"] = "running"
            run.manifest.setdefault("resumed", []).append(_now())
            run.save()
            return run
        if path.exists() and not path.is_dir():
            raise UserError(f"run directory {path} is a file, not a directory")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and is not a cascadec run directory; choose another run directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK):
            raise UserError(f"run directory {path} is not writable")
        try:
            (path / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        except OSError as exc:  # read-only mount, full disk, quota: os.access cannot tell
            raise UserError(f"cannot write to run directory {path}: {exc.strerror or exc}") from None
        manifest = {
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
        run = cls(path, manifest)
        run.save()
        return run

    @classmethod
    def open(cls, path: Path, *, writable: bool = True) -> RunDir:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not path.is_dir():
            raise UserError(f"run directory not found: {path}")
        if not manifest_path.is_file():
            raise UserError(f"{path} is not a cascadec run directory (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{manifest_path}: corrupted manifest") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{manifest_path}: not a cascadec manifest")
        for key in ("stages", "metrics"):
            if not isinstance(manifest.get(key), dict):
                raise UserError(f"{manifest_path}: corrupted manifest ({key!r} missing or not a mapping)")
        return cls(path, manifest, writable=writable)

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
        """Time a stage and record its outcome; the yielded dict is stored with it."""
        info: dict[str, Any] = {"status": "running", "started": _now()}
        self.manifest["stages"][name] = info
        self.save()
        start = time.perf_counter()
        try:
            yield info
        except BaseException as exc:
            info["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            info["error"] = first_line(exc)
            info["seconds"] = round(time.perf_counter() - start, 3)
            self.save()
            raise
        info["status"] = "done"
        info["seconds"] = round(time.perf_counter() - start, 3)
        self.save()

    def finish(self, status: str = "finished") -> None:
        self.manifest["status"] = status
        self.manifest["finished"] = _now()
        self.save()


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
