"""Progress bars for long work, quiet when output is not a terminal (CI logs, pipes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)
_enabled: bool | None = None


def set_enabled(value: bool | None) -> None:
    global _enabled
    _enabled = value


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty() and not os.environ.get("CASCADEC_NO_PROGRESS")


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not enabled():
        yield from iterable
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")
        for item in iterable:
            yield item
            progress.advance(task)


class Status:
    """A progress bar whose trailing text can be updated (loss, accuracy) as work goes."""

    def __init__(self, description: str, total: int | None) -> None:
        self.progress = None
        if enabled():
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            ]
            self.progress = Progress(*columns, console=console, transient=True)
            self.task = self.progress.add_task(description, total=total, status="")

    def __enter__(self) -> Status:
        if self.progress:
            self.progress.start()
        return self

    def advance(self, status: str = "") -> None:
        if self.progress:
            self.progress.update(self.task, advance=1, status=status)

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()


def log(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)
