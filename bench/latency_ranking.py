"""Which ranking buys FLOPs at equal latency on this CPU? (issue 13's second goal)

    python bench/latency_ranking.py [--models resnet50 mobilenet_v2] [--targets 1.5 2 3] [--resume]

Same setting as bench/latency_targets.py (random weights, 224 px, batch 1, ONNX Runtime on the
CPU, L1 widths, the cached latency table, widths at the probed channel block). Per model and
target speed-up, each ranking under the same latency budget, each held to the measured target
by the same re-solves as compress (``refine_latency_mask``, 3 measurements), then timed once
more against the unpruned network in interleaved rounds:

* ``per_ms_per_flop``: importance per millisecond per FLOP (cascadec's default: the FLOPs
  solver's ranking where time follows FLOPs);
* ``per_ms``: importance per millisecond a unit costs (HALP's knapsack ratio);
* ``importance``: importance alone (the FLOPs solver's ranking), only the budget in milliseconds.

Each shipped student's FLOPs are set against the FLOPs-targeted students with round_to 8 that
bench/latency_targets.py measured (the front of every probe of every target: those no other
probe beats on both speed-up and FLOPs; interpolated in log-log at the same measured speed-up):
the "more FLOPs at equal latency" of its goal, for every ranking. ``--reinterpolate`` measures
nothing and sets every row against the probes the targets file holds now.
Needs bench/results/latency-targets-cpu.json. Writes bench/results/latency-ranking-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_targets import JSON_PATH as TARGETS_JSON  # noqa: E402
from latency_targets import Bench, run_entry, run_lines  # noqa: E402

from cascadec.errors import UserError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "latency-ranking-cpu.json"
MD_PATH = RESULTS / "latency-ranking-cpu.md"
from cascadec.prune.latency import RANKINGS  # noqa: E402


def rt8_curve(model: str) -> list[tuple[float, float]]:
    """(measured speed-up, FLOPs kept) of every round_to-8 FLOPs-targeted probe of ``model``."""
    results = json.loads(TARGETS_JSON.read_text())["results"][model]
    points = [
        (p["speedup"], p["flops_kept"])
        for row in results["targets"].values()
        for p in row.get("flops_round_to_8", {}).get("probes", [])
    ]
    return sorted(points)


def front(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The probes no other probe beats on both speed-up and FLOPs kept, by speed-up. Round_to-8
    FLOPs targets are not monotone where widths fall below the backend's block: MobileNetV2 at
    0.136 of the FLOPs measured 2.21x, slower than at 0.306 (2.25x); "the FLOPs target as fast" is
    the best one that fast, and interpolating through a dominated probe priced the 2x row at
    0.225 of the FLOPs where 0.31 measured faster."""
    out: list[tuple[float, float]] = []
    best = -np.inf
    for speedup, flops in sorted(curve, reverse=True):  # fastest first
        if flops > best:
            out.append((speedup, flops))
            best = flops
    return sorted(out)


def flops_at(curve: list[tuple[float, float]], speedup: float) -> float | None:
    """Log-log interpolation on the ``front``; None outside the measured range."""
    curve = front(curve)
    xs = np.log([p[0] for p in curve])
    if not len(xs) or not xs[0] <= np.log(speedup) <= xs[-1]:
        return None
    return float(np.exp(np.interp(np.log(speedup), xs, np.log([p[1] for p in curve]))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    p.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=RANKINGS)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--reinterpolate",
        action="store_true",
        help="measure nothing: set every row against the FLOPs-targeted probes latency-targets-cpu.json holds now",
    )
    args = p.parse_args()
    data = json.loads(JSON_PATH.read_text()) if args.resume and JSON_PATH.is_file() else {"runs": [], "results": {}}
    if args.reinterpolate:
        data = json.loads(JSON_PATH.read_text())
        for row in data["results"].values():
            if "speedup" in row:
                reference = flops_at(rt8_curve(row["model"]), row["speedup"])
                row["rt8_flops_at_same_speedup"] = reference
                row["more_flops_than_rt8"] = (row["flops_kept"] / reference - 1) if reference else None
        data["runs"].append({**run_entry("bench/latency_ranking.py"), "note": "re-interpolated, nothing measured"})
        _save(data)
        print(MD_PATH.read_text())
        return
    data["runs"].append(run_entry("bench/latency_ranking.py"))
    for name in args.models:
        bench = Bench(name, 224, args)
        curve = rt8_curve(name)
        for t in args.targets:
            for ranking in args.rankings:
                key = f"{name} {t:g} {ranking}"
                if key in data["results"]:
                    continue
                bench.latency.ranking = ranking
                try:
                    refined = bench.latency_student(t, rounds=3)
                except UserError as exc:  # an infeasible target: recorded, the others go on
                    data["results"][key] = {"error": str(exc).splitlines()[0]}
                    _save(data)
                    continue
                m = bench.measure(refined.keep)
                reference = flops_at(curve, m["speedup"])
                data["results"][key] = {
                    "model": name,
                    "target": t,
                    "ranking": ranking,
                    "tries": [h["measured_speedup"] for h in refined.history],
                    "speedup": m["speedup"],
                    "flops_kept": m["flops_kept"],
                    "params_kept": m["params_kept"],
                    "rt8_flops_at_same_speedup": reference,
                    "more_flops_than_rt8": (m["flops_kept"] / reference - 1) if reference else None,
                }
                _save(data)
                print(key, data["results"][key], flush=True)
    print(MD_PATH.read_text())


def _save(data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = JSON_PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(JSON_PATH)
    MD_PATH.write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Latency targets: how the solver ranks channels under a latency budget (CPU, ONNX Runtime, batch 1)",
        "",
        "Command: `python bench/latency_ranking.py` (protocol in the script's docstring). FLOPs of the "
        "round_to-8 FLOPs-targeted students at the same measured speed-up are interpolated on the front of the "
        "probes [latency-targets-cpu.json](latency-targets-cpu.json) held when the row was measured, or when "
        "`--reinterpolate` last ran (each run names its commit; the front: the probes no other probe beats on both "
        "speed-up and FLOPs kept).",
        "",
    ]
    lines += run_lines(data.get("runs", []))
    lines += [
        "",
        "| model | target | ranking | measured re-solves | shipped: measured | FLOPs / params kept "
        "| round_to-8 FLOPs target at that speed-up | more FLOPs kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gains: dict[str, list[float]] = {r: [] for r in RANKINGS}
    for key, r in data["results"].items():
        if "error" in r:
            model, target, ranking = key.split()
            lines.append(f"| {model} | {float(target):.1f}x | {ranking} | {r['error']} |||||")
            continue
        ref = r["rt8_flops_at_same_speedup"]
        gain = r["more_flops_than_rt8"]
        if gain is not None:
            gains[r["ranking"]].append(gain)
        tries = ", ".join(f"{s:.2f}x" for s in r["tries"])
        lines.append(
            f"| {r['model']} | {r['target']:.1f}x | {r['ranking']} | {tries} | {r['speedup']:.2f}x | "
            f"{r['flops_kept']:.3f} / {r['params_kept']:.3f} | {f'{ref:.3f}' if ref else 'outside the probes'} | "
            f"{f'{gain:+.1%}' if gain is not None else '-'} |"
        )
    lines += ["", "## Summary", ""]
    for ranking, values in gains.items():
        if values:
            lines.append(
                f"- {ranking}: more FLOPs than the round_to-8 FLOPs target at equal measured latency: "
                f"mean {np.mean(values):+.1%}, range {min(values):+.1%} to {max(values):+.1%} over {len(values)} students"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
