"""Numbers in words, the same way in the CLI, report.md and plots: FLOPs as MMac/GMac (the
unit ptflops and the pruning papers use), accuracy as a percentage, latency in ms, and an
em dash where a value is missing (a report renders before every stage has run)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

MISSING = "—"


def get_path(report: Mapping, dotted: str) -> Any:
    """``report["a"]["b"]`` for ``"a.b"``; None where any level is missing (batch keys may be ints or strings)."""
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part, node.get(int(part)) if part.isdigit() else None)
    return node


def as_number(value: Any) -> float | None:
    """A plain float, or None for anything that is not a number (bools included)."""
    return float(value) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else None


def fmt_accuracy(value: Any) -> str:
    v = as_number(value)
    return MISSING if v is None else f"{100 * v:.2f}%"


def fmt_flops(value: Any) -> str:
    """MACs as MMac/GMac, the unit ptflops and the pruning papers use."""
    v = as_number(value)
    if v is None:
        return MISSING
    return f"{v / 1e9:.2f} GMac" if v >= 1e9 else f"{v / 1e6:.2f} MMac"


def fmt_params(value: Any) -> str:
    v = as_number(value)
    return MISSING if v is None else f"{v / 1e6:.2f} M"


def fmt_float(value: Any, spec: str = ".3g") -> str:
    v = as_number(value)
    return MISSING if v is None else format(v, spec)


def fmt_ms(value: Any) -> str:
    v = as_number(value)
    return MISSING if v is None else f"{v:.3f}"


def ratio_change(teacher: Any, student: Any) -> str:
    t, s = as_number(teacher), as_number(student)
    if t is None or s is None or t <= 0:
        return MISSING
    factor = f" ({t / s:.2f}x smaller)" if s > 0 else ""
    return f"{100 * (s - t) / t:+.1f}%{factor}"


def accuracy_change(teacher: Any, student: Any) -> str:
    t, s = as_number(teacher), as_number(student)
    return MISSING if t is None or s is None else f"{100 * (s - t):+.2f} pp"


def speedup(teacher_row: Any, student_row: Any) -> float | None:
    t, s = as_number(get_path(teacher_row or {}, "p50_ms")), as_number(get_path(student_row or {}, "p50_ms"))
    return t / s if t is not None and s else None


def speedup_range(rounds: Any) -> str:
    """``(1.05-1.20x over 3 rounds)``: how far the per-round speed-up moved; empty for one round."""
    values = [v for v in (as_number(r) for r in rounds) if v is not None] if isinstance(rounds, (list, tuple)) else []
    if len(values) < 2:
        return ""
    return f"({min(values):.2f}-{max(values):.2f}x over {len(values)} rounds)"


def fmt_ms_label(row: Any) -> str:
    """``1.23 ms`` from a latency row's p50."""
    value = as_number(get_path(row, "p50_ms")) if isinstance(row, Mapping) else None
    return MISSING if value is None else f"{value:.2f} ms"
