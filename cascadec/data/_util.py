"""Helpers shared by the dataset builders."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: UserError messages must stay one line."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
