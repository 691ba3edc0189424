"""Atomic writes: every artifact in a run directory is either the old file or the new one.

A crash, Ctrl-C or a full disk mid-write must never leave half a manifest, report,
checkpoint or model behind, because ``--resume`` and the stages after it trust what they
read. One protocol for all of them: write a fresh temp file next to ``NAME`` (a unique
``.NAME.*.tmp`` created with ``O_EXCL``, so a file or symlink planted there is never followed),
``fsync`` it, ``os.replace`` it over ``NAME`` (atomic on POSIX and Windows) and ``fsync`` the
directory, so the new file survives a power cut and not just a crash; on failure the temp file
is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cascadec.errors import UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield the temp path to write; on a clean exit it replaces ``path``, on an error it is removed.

    For writers that need a path (``onnx.save_model``, ``safetensors.torch.save_file``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written temp file is useless; free its space
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], payload: bytes, *, durable: bool = True) -> None:
    with replacing(path, durable=durable) as tmp:
        tmp.write_bytes(payload)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """JSON (non-JSON values as ``str``); a file system refusal is a one-line UserError naming the file."""
    try:
        write_text_atomic(path, json.dumps(data, indent=indent, default=str, sort_keys=sort_keys) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
