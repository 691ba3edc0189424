"""One writer per run directory and per cache entry, across processes.

An advisory ``flock`` on a lock file: the kernel releases it when the holding process dies,
however it dies (``kill -9`` included), so a crashed run never leaves a stale lock that blocks
``--resume``. The lock file's content (pid, host, command, time) is only there for the message
a refused process prints; whether the lock is held is decided by the kernel, never by that
content.

Locks are re-entrant within a process (the CLI's in-process tests, ``compress`` then ``report``
on the same directory): a second request for a path this process already holds returns the
same lock. On platforms without ``fcntl`` (Windows) locking is a no-op, and the docs say so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cascadec.errors import UserError
from cascadec.progress import log

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per run directory is then the user's job
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".cascadec.lock"
# the concurrency tests' barrier (hold_point): "NAME:FOLDER"; never set in a real run
HOLD_ENV = "CASCADEC_HOLD_AT"
HOLD_TIMEOUT_S = 600.0

_HELD: dict[str, list[int]] = {}  # resolved lock-file path -> [open descriptor, holders in this process]


def _holder(path: Path) -> str:
    """Who holds ``path``, in words, from what the holder wrote into it (best effort)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    command = " ".join(str(a) for a in info.get("command", []))[:120]
    return f"process {info['pid']} on {info.get('host', '?')} ({command}, since {info.get('since', '?')})"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _record(fd: int) -> None:
    """Write who holds the lock; only for messages, so a failure here is not an error."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": sys.argv,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass


def _open(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise UserError(f"cannot create lock file {path}: {exc.strerror or exc}") from None


def acquire(path: str | os.PathLike[str], *, what: str) -> None:
    """Hold the lock at ``path`` for the rest of this process, or raise a one-line UserError
    naming ``what`` is in use and by whom. Re-entrant within a process."""
    if fcntl is None:
        return
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    fd = _open(path)
    if not _try_lock(fd):
        os.close(fd)
        raise UserError(f"{what} is in use by {_holder(path)}; wait for it to finish")
    _record(fd)
    _HELD[key] = [fd, 1]


def release(path: str | os.PathLike[str]) -> None:
    """Give up one hold of the lock; the last one in this process drops it (the kernel drops
    it anyway when the process ends)."""
    key = str(Path(path).resolve())
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _HELD[key]
        os.close(entry[0])  # closing the descriptor drops the flock


def holds(path: str | os.PathLike[str]) -> bool:
    return str(Path(path).resolve()) in _HELD


@contextmanager
def waiting(path: str | os.PathLike[str], *, what: str, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the lock at ``path`` for the block, waiting (and saying so once) while another
    process holds it: for shared entries such as a cached teacher, where the second process
    should reuse the first one's work rather than fail."""
    if fcntl is None:
        yield
        return
    path = Path(path)
    fd = _open(path)
    try:
        if not _try_lock(fd):
            log(f"{what} is being written by {_holder(path)}; waiting for it")
            while not _try_lock(fd):
                time.sleep(poll_s)
        _record(fd)
        yield
    finally:
        os.close(fd)


def hold_point(name: str) -> None:
    """A barrier the concurrency tests place a process at, so that they do not race start-up
    times (issue 31): with ``CASCADEC_HOLD_AT=NAME:FOLDER`` the process writes
    ``FOLDER/NAME.reached`` (its pid) when it gets here and waits until ``FOLDER/NAME.release``
    exists (and passes at once after that). The points: ``run-locked`` (a new run directory's
    manifest written under its lock), ``teacher-cache`` (the teacher cache entry's lock taken,
    nothing checked or trained yet), ``checkpoint-saved`` (rank 0 of a distributed run has written
    a checkpoint; the other ranks wait for it). Without the variable, as in every real run, nothing
    happens."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    point, _, folder = spec.partition(":")
    if point != name or not folder:
        return
    where = Path(folder)
    (where / f"{name}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not (where / f"{name}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
