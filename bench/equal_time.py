"""The equal-time view of a quality benchmark (issue 32 item 4): accuracy against training time.

``bench/quality.py --profile equal_time`` runs the methods with epochs chosen so that the
cascade spends at least the seconds the one-shot methods spend (see its profile). This module
turns that run's JSON into the section its Markdown report ends with and a second plot,
``<stem>-curves.png``: every run's selection-split accuracy after each epoch against the
cumulative seconds of training so far, so the curves show where each method stands at any
budget, not only at the end.

x: the seconds a method spent before its first epoch (CaP's statistics and selection,
Torch-Pruning's gradients and ratio search) plus each epoch's training-loop seconds, joint
epochs first for the cascade; the per-epoch evaluations are left out of the curves (every
method does them) and counted in the table's end-to-end seconds (``prune_seconds``: everything
from the teacher to the finished student). y: selection-split accuracy (5,000 held-out training
images) of the student after that epoch; the cascade's joint epochs give the masked student's.
The test split appears only in the end points, as everywhere in the benchmark.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

REFERENCE = "cap_kd"  # the budget every other method is compared with
CASCADE = "cascade_2ta_eqt"
TORCH_PRUNING = ("tp_taylor_local_kd", "tp_taylor_global_kd")


def curve(run: dict) -> list[tuple[float, float]]:
    """(cumulative training seconds, selection accuracy) after each epoch of one run."""
    points: list[tuple[float, float]] = []
    elapsed = float((run.get("cap") or {}).get("seconds") or (run.get("torch_pruning") or {}).get("seconds") or 0.0)
    for joint_epoch, seconds in zip(run.get("joint_curves") or [], run.get("joint_epoch_seconds") or []):
        elapsed += float(seconds)
        accuracies = joint_epoch.get("accuracies") or []
        if accuracies:
            points.append((elapsed, float(accuracies[0])))  # the student is the first model of the ladder
    for epoch in run.get("student_epochs") or run.get("fine_tune_epochs") or []:
        elapsed += float(epoch.get("seconds") or 0.0)
        if epoch.get("student_accuracy") is not None:
            points.append((elapsed, float(epoch["student_accuracy"])))
    return points


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, min(values), max(values)


def table(runs: list[dict], methods: list[str], targets: list[float]) -> list[dict]:
    """Per method and target: test accuracy (mean, std, min, max over seeds) and seconds."""
    rows = []
    for target in targets:
        for method in methods:
            done = [r for r in runs if r["method"] == method and r["target"] == target and "error" not in r]
            if not done:
                continue
            acc = _stats([100 * r["student_accuracy"] for r in done])
            rows.append(
                {
                    "method": method,
                    "target": target,
                    "seeds": len(done),
                    "accuracy": acc,
                    "flops_fraction": statistics.fmean(r["flops_fraction"] for r in done),
                    "params_fraction": statistics.fmean(r["params_fraction"] for r in done),
                    # the median: a run slowed by other work on the machine moves it least
                    "seconds": statistics.median(r["prune_seconds"] for r in done),
                }
            )
    ref = {row["target"]: row["seconds"] for row in rows if row["method"] == REFERENCE}
    for row in rows:
        row["time_ratio"] = row["seconds"] / ref[row["target"]] if row["target"] in ref else None
    return rows


def goals(rows: list[dict], targets: list[float]) -> list[dict]:
    """Issue 32's goals at equal time, each met / missed / not evaluated with its numbers."""
    by = {(row["method"], row["target"]): row for row in rows}
    out = []

    def cmp(target: float, margin: float, apart: bool, goal: str) -> None:
        c, r = by.get((CASCADE, target)), by.get((REFERENCE, target))
        if c is None or r is None:
            out.append(
                {"goal": goal, "status": "not evaluated", "detail": f"needs {CASCADE} and {REFERENCE} at {target}"}
            )
            return
        diff = c["accuracy"][0] - r["accuracy"][0]
        ok = diff >= margin and (not apart or c["accuracy"][2] > r["accuracy"][3])
        out.append(
            {
                "goal": goal,
                "status": "met" if ok else "missed",
                "detail": f"cascade {c['accuracy'][0]:.2f} vs CaP + KD {r['accuracy'][0]:.2f} ({diff:+.2f} points; "
                f"ranges {c['accuracy'][2]:.2f}-{c['accuracy'][3]:.2f} / {r['accuracy'][2]:.2f}-{r['accuracy'][3]:.2f}), "
                f"cascade's seconds {c['time_ratio']:.2f}x CaP + KD's",
            }
        )

    cmp(0.75, 0.0, False, "at 75 %, the cascade at or above CaP + KD")
    cmp(0.9, 1.0, True, "at 90 %, the cascade above CaP + KD by at least 1 point, seed ranges apart")
    ahead = []
    for target in targets:
        c = by.get((CASCADE, target))
        peers = [by[(m, target)] for m in TORCH_PRUNING if (m, target) in by]
        if c is None or not peers:
            continue
        best = max(peers, key=lambda row: row["accuracy"][0])
        ahead.append((target, c["accuracy"][0] - best["accuracy"][0], best["method"]))
    if ahead:
        out.append(
            {
                "goal": "the cascade ahead of Torch-Pruning + KD (the better of local and global) at every target",
                "status": "met" if all(d > 0 for _, d, _ in ahead) else "missed",
                "detail": ", ".join(f"{100 * t:.0f} %: {d:+.2f} points vs {m}" for t, d, m in ahead),
            }
        )
    return out


def markdown(doc: dict, labels: dict[str, str], plot_name: str) -> list[str]:
    """The section appended to the benchmark's Markdown report."""
    cfg = doc["config"]
    rows = table(doc["runs"], cfg["methods"], cfg["targets"])
    lines = [
        "",
        "## At equal training time (issue 32 item 4)",
        "",
        "Test accuracy (full 10k split, mean ± std and min-max over seeds) and the end-to-end seconds each method "
        f"took from the teacher to its finished student (`prune_seconds`, median over seeds; the ratio is to "
        f"`{REFERENCE}`'s at the same target). One torch thread per run, two runs at a time on this 2-core CPU.",
        "",
        "| target | method | seeds | test acc (%) | min-max | FLOPs fraction | params fraction | seconds | x CaP + KD's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean, std, lo, hi = row["accuracy"]
        ratio = "" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        lines.append(
            f"| {100 * row['target']:.0f} % | {row['method']} | {row['seeds']} | {mean:.2f} ± {std:.2f} | "
            f"{lo:.2f}-{hi:.2f} | {row['flops_fraction']:.3f} | {row['params_fraction']:.3f} | {row['seconds']:.0f} | {ratio} |"
        )
    lines += ["", "Methods:"]
    lines += [f"- `{m}`: {labels.get(m, m)}" for m in cfg["methods"]]
    lines += ["", "Goals (issue 32, at equal time):", ""]
    for g in goals(rows, cfg["targets"]):
        lines.append(f"- **{g['status']}**: {g['goal']}: {g['detail']}")
    lines += [
        "",
        f"Accuracy against training time: [{plot_name}]({plot_name}) (selection split after every epoch against the "
        "cumulative training-loop seconds, one line per run; `bench/equal_time.py` says how the axes are made).",
        "",
    ]
    return lines


def plot(path: Path, doc: dict, labels: dict[str, str]) -> None:
    """One panel per target, one line per run, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    targets = cfg["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, target in zip(axes[0], targets):
        finals: list[float] = []
        for i, method in enumerate(cfg["methods"]):
            first = True
            for run in doc["runs"]:
                if run["method"] != method or run["target"] != target or "error" in run:
                    continue
                pts = curve(run)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                finals.append(100 * ys[-1])
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    marker=".",
                    color=colours[i % len(colours)],
                    alpha=0.8,
                    label=method if first else None,
                )
                first = False
        teacher = doc.get("teacher", {}).get("accuracy")
        if teacher is not None and not math.isnan(teacher):
            ax.axhline(100 * teacher, color="grey", linestyle=":", label="teacher (test)")
        if finals:  # zoom on where the runs end; the first epochs' climb is cut off below
            top = 100 * teacher + 1 if teacher is not None and not math.isnan(teacher) else max(finals) + 1
            ax.set_ylim(max(0.0, min(finals) - 8), top)
        ax.set_title(f"{100 * target:.0f} % fewer FLOPs")
        ax.set_xlabel("cumulative training seconds (1 thread)")
        ax.set_ylabel("selection accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, stem: str, doc: dict, labels: dict[str, str]) -> None:
    """Append the section to ``<stem>.md`` and draw ``<stem>-curves.png`` (quality.write_outputs)."""
    name = f"{stem}-curves.png"
    with open(out / f"{stem}.md", "a") as f:
        f.write("\n".join(markdown(doc, labels, name)))
    plot(out / name, doc, labels)
