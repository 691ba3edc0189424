"""PNG plots from report.json dicts (matplotlib, Agg backend: no display needed).

* ``latency_plot(report, path)``: p50 latency vs batch size for teacher and student, one
  panel per backend, p90 (thick) and p99 (thin) drawn as upward error bars; on GPU backends
  the compute-time p50 (CUDA events) is drawn dashed under the host latency.
* ``pareto_plot(reports, path, backend=None, batch="1")``: student accuracy vs student p50 over
  several runs, the Pareto front (no other run both faster and more accurate) highlighted;
  ``comparison_plot(comparison, path)``: the same for ``cascadec report`` (``compare.py``), one
  front per group of comparable runs, each group's teacher as its reference.
* ``write_run_plots(run_dir, report)``: what the report stage calls; never fails the stage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cascadec.formatting import as_number
from cascadec.progress import log


def _pyplot():
    """matplotlib, imported on first use with the Agg backend (no display needed): it is the
    heaviest import of the package (~0.5 s) and only the plots need it, so every other command
    starts without it. The one lazy import outside tensorrt and onnxruntime-gpu."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - plt.matplotlib.ticker below

    return plt


COLORS = {"teacher": "tab:gray", "student": "tab:blue"}


def _series(per_batch: Mapping, prefix: str = "") -> tuple[list[int], list[float], list[float], list[float]]:
    rows = []
    for b, s in per_batch.items():
        if str(b).isdigit() and isinstance(s, Mapping) and as_number(s.get(f"{prefix}p50_ms")) is not None:
            p50 = as_number(s[f"{prefix}p50_ms"])
            p90 = as_number(s.get(f"{prefix}p90_ms")) or p50
            p99 = as_number(s.get(f"{prefix}p99_ms")) or p90
            rows.append((int(b), p50, p90, p99))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


def _ms_tick(value: float, _pos: int | None = None) -> str:
    """Log-axis labels at 1, 2 and 5 times a power of ten, as plain numbers (0.2, 5, 50)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5)) else ""


def _protocol_label(node: Mapping) -> str:
    proto = node.get("protocol") if isinstance(node.get("protocol"), Mapping) else {}
    parts = [str(proto["device"])] if proto.get("device") else []
    if as_number(proto.get("duration_s")) is not None:
        parts.append(f">={proto['duration_s']:g} s per batch")
    if isinstance(proto.get("threads"), int):
        parts.append(f"{proto['threads']} thread{'s' if proto['threads'] > 1 else ''}")
    if proto.get("cuda_graph"):
        parts.append("CUDA graph")
    if isinstance(proto.get("rounds"), int) and proto["rounds"] > 1:
        parts.append(f"{proto['rounds']} alternating rounds")
    return ", ".join(parts)


def latency_plot(report: Mapping, path: str | os.PathLike[str]) -> Path | None:
    """Write the latency plot; returns the path, or None when the report has no latency."""
    latency = report.get("latency") if isinstance(report, Mapping) else None
    backends = [(name, node) for name, node in (latency or {}).items() if isinstance(node, Mapping)]
    if not backends:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends), 4), squeeze=False)
    for ax, (backend, node) in zip(axes[0], backends):
        for i, model in enumerate(("teacher", "student")):
            batches, p50, p90, p99 = _series(node.get(model) or {})
            if not batches:
                continue
            color = COLORS[model]
            x = [b * (0.96 if i == 0 else 1.04) for b in batches]  # side by side, bars don't overlap
            ax.errorbar(
                x,
                p50,
                yerr=[[0] * len(p50), [h - m for h, m in zip(p99, p50)]],
                fmt="none",
                ecolor=color,
                elinewidth=0.8,
                capsize=3,
                alpha=0.7,
            )
            ax.errorbar(
                x,
                p50,
                yerr=[[0] * len(p50), [h - m for h, m in zip(p90, p50)]],
                fmt="o-",
                color=color,
                elinewidth=2.5,
                capsize=0,
                label=f"{model} p50 (bars: p90, p99)",
            )
            cb, c50, _, _ = _series(node.get(model) or {}, "compute_")
            if cb:
                ax.plot(
                    [b * (0.96 if i == 0 else 1.04) for b in cb],
                    c50,
                    "s--",
                    color=color,
                    markersize=4,
                    alpha=0.8,
                    label=f"{model} GPU compute p50",
                )
        ax.set_xscale("log", base=2)
        ticks = sorted({int(b) for m in ("teacher", "student") for b in (node.get(m) or {}) if str(b).isdigit()})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        # plain numbers (0.2, 5, 60), not 6x10^1: people read milliseconds off this axis
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(_ms_tick))
        ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FuncFormatter(_ms_tick))
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms)")
        detail = _protocol_label(node)
        ax.set_title(f"latency ({backend}{': ' + detail if detail else ''})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    run = report.get("run", {}) if isinstance(report.get("run"), Mapping) else {}
    if run.get("model"):
        fig.suptitle(f"{run.get('model')} / {run.get('recipe', '')}", fontsize=10)
    return _save(fig, path)


def student_p50(report: Mapping, batch: str = "1", backend: str | None = None) -> float | None:
    """Student p50 at ``batch`` on ``backend``, or on the first backend that has it
    (onnxruntime first) when ``backend`` is None."""
    latency = report.get("latency") or {}
    order = [backend] if backend else sorted(latency, key=lambda k: (k != "onnxruntime", k))
    for backend in order:
        node = latency.get(backend) or {}
        value = as_number(((node.get("student") or {}).get(batch) or {}).get("p50_ms"))
        if value is not None:
            return value
    return None


def run_label(report: Mapping) -> str:
    """What tells runs of a sweep apart: the run directory's name and the target (a sweep
    usually shares model and recipe), falling back to model / recipe."""
    run = report.get("run") if isinstance(report.get("run"), Mapping) else {}
    name = Path(str(run["dir"])).name if run.get("dir") else f"{run.get('model', '?')} / {run.get('recipe', '?')}"
    return f"{name} ({run['target_description']})" if run.get("target_description") else name


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, accuracy) that no other point dominates (<= latency and
    >= accuracy, strictly better in one), sorted by latency."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def pareto_plot(
    reports: Sequence[Mapping], path: str | os.PathLike[str], *, backend: str | None = None, batch: str = "1"
) -> Path:
    """Accuracy vs student p50 at ``batch`` on ``backend`` across runs, from the figures they
    stored (one front); runs without both numbers are listed as skipped. ``cascadec report``
    draws :func:`comparison_plot` instead."""
    points = [
        (run_label(r), "", as_number((r.get("student") or {}).get("accuracy")), student_p50(r, str(batch), backend))
        for r in reports
    ]
    xlabel = f"student latency p50, batch {batch}, {backend or 'onnxruntime (else first backend)'} (ms)"
    return _fronts_plot(points, [], path, xlabel=xlabel, note=None)


def comparison_plot(comparison, path: str | os.PathLike[str]) -> Path:
    """``cascadec report``'s plot (``cascadec.compare.Comparison``): one front per group of
    comparable runs (data set and teacher), each group's teacher drawn as its reference, and
    where the latencies come from written under the axes."""
    points = [(p.label, p.group, p.accuracy, p.p50_ms) for p in comparison.students]
    teachers = [(p.label, p.group, p.accuracy, p.p50_ms) for p in comparison.teachers]
    xlabel = f"latency p50, batch {comparison.batch}, {comparison.backend} (ms)"
    return _fronts_plot(points, teachers, path, xlabel=xlabel, note=f"latencies: {comparison.source}")


_GROUP_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _fronts_plot(
    points: Sequence[tuple[str, str, float | None, float | None]],
    teachers: Sequence[tuple[str, str, float | None, float | None]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    note: str | None,
) -> Path:
    """(label, group, accuracy, p50) per student: a Pareto front per group; teachers as stars."""
    drawn = [(label, group, lat, acc) for label, group, acc, lat in points if acc is not None and lat is not None]
    skipped = [label for label, _, acc, lat in points if acc is None or lat is None]
    refs = [(label, group, lat, acc) for label, group, acc, lat in teachers if acc is not None and lat is not None]
    groups = list(dict.fromkeys(g for _, g, _, _ in drawn + refs))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8 if len(groups) > 1 else 4.5))
    everything = [(lat, acc) for _, _, lat, acc in drawn + refs]
    middle = (min(p[0] for p in everything) + max(p[0] for p in everything)) / 2 if everything else 0.0
    for n, group in enumerate(groups):
        colour = _GROUP_COLOURS[n % len(_GROUP_COLOURS)]
        mine = [(lat, acc) for _, g, lat, acc in drawn if g == group]
        name = f" {group}" if len(groups) > 1 else ""
        if mine:
            front = pareto_front(mine)
            others = [i for i in range(len(mine)) if i not in front]
            ax.scatter([mine[i][0] for i in others], [100 * mine[i][1] for i in others], color="tab:gray", s=18)
            ax.plot(
                [mine[i][0] for i in front],
                [100 * mine[i][1] for i in front],
                "o-",
                color=colour,
                markersize=7,
                label=f"Pareto front{name}",
            )
        for _, g, lat, acc in refs:
            if g == group:
                ax.scatter([lat], [100 * acc], marker="*", s=160, color=colour, edgecolor="black", zorder=3,
                           label=f"teacher{name}")  # fmt: skip
    for label, _, lat, acc in drawn + refs:
        right_half = lat > middle  # labels point inwards so none runs off the axes
        ax.annotate(
            label,
            (lat, 100 * acc),
            textcoords="offset points",
            xytext=(-5 if right_half else 5, 5),
            ha="right" if right_half else "left",
            fontsize=7,
        )
    if everything:
        ax.margins(x=0.12, y=0.12)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has both accuracy and latency", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(True, alpha=0.3)
    footer = [
        line for line in (note, "skipped (no accuracy or latency): " + ", ".join(skipped) if skipped else None) if line
    ]
    if footer:
        fig.text(0.01, 0.01, "\n".join(footer), fontsize=6)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        _pyplot().close(fig)
    return path


def write_run_plots(run_dir: str | os.PathLike[str], report: Mapping) -> Path | None:
    """``latency.png`` in the run directory; a plotting failure is logged, never raised,
    because a missing picture must not fail a finished run."""
    try:
        return latency_plot(report, Path(run_dir) / "latency.png")
    except Exception as exc:  # noqa: BLE001
        log(f"[yellow]latency.png not written: {type(exc).__name__}: {exc}[/]")
        return None
