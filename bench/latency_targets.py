"""Latency targets on this CPU (issue 13): does "2x faster" come out 2x faster, and what does a
latency-targeted student keep against a FLOPs-targeted one of the same measured latency?

    python bench/latency_targets.py [--models resnet50 mobilenet_v2] [--targets 1.5 2 3] [--resume]

Random weights (latency does not depend on them), 224 px, batch 1, ONNX Runtime on the CPU with
its default threads; widths from the weights' L1 importance (the same scores for every solve).
Per model: the latency table is built (or loaded from the cache: the build time and whether it
was cached are recorded), then per target speed-up t:

* the latency-targeted student (``prune.target.latency_reduction = 1 - 1/t``; widths at
  multiples of the probed channel block and the default ranking, importance per ms per FLOP,
  as a latency target sets them; held to the measured target by up to --refine re-solves, as
  compress does) is shrunk, exported and timed against the
  unpruned network in interleaved rounds (cascadec's profile protocol: 0.2 s warm-up, then at
  least --duration s and 10 runs per round, --rounds rounds, pooled p50): measured speed-up;
* FLOPs-targeted students, with round_to 8 and without, are searched (secant steps on the FLOPs
  fraction, each step measured the same way) until their measured speed-ups bracket the
  latency-targeted student's (at most 8 students); FLOPs and parameters at that equal latency are interpolated
  between the two nearest measured students. Equal latency is matched on speed-ups (each
  measured against the unpruned network in interleaved rounds), which a shared machine's drift
  between probes does not move.

Results are written after every target (JSON and Markdown), and --resume skips what is done:
bench/results/latency-targets-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cascadec.envinfo import environment
from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.profile.engines import profile_onnx
from cascadec.profile.protocol import Timing, profile_interleaved
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance
from cascadec.prune.latency import attach_latency_model, time_per_flop
from cascadec.prune.latency_refine import Refined, SpeedupMeter, refine_latency_mask
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.run import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "latency-targets-cpu.json"
MD_PATH = RESULTS / "latency-targets-cpu.md"
GOAL_SPEEDUP_ERROR = 0.10
GOAL_MORE_FLOPS = 0.10
GOAL_TABLE_SECONDS = 300.0
FLOPS_PROBES = 8  # FLOPs-targeted students measured per comparison, at most


class Bench:
    """One model: its table, solver inputs, and a timer for any mask."""

    def __init__(self, name: str, size: int, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = create_model(name, num_classes=1000).eval()
        self.example = torch.zeros(1, 3, size, size)
        self.size = size
        self.index = build_groups(self.model, self.example)
        self.cost = CostModel.build(self.model, self.index, self.example)
        start = time.perf_counter()
        self.latency = attach_latency_model(
            self.model, self.example, self.cost, backend="onnxruntime", batch=1, grid_points=4, threads=None
        )
        self.table_seconds = time.perf_counter() - start
        self.scores = l1_importance(self.model, self.index)
        self.args = args
        self.meter = SpeedupMeter(
            self.model,
            self.index,
            self.example,
            backend="onnxruntime",
            batch=1,
            threads=None,
            rounds=args.rounds,
            seconds=args.duration,
        )

    def solve(self, metric: str, fraction: float, round_to: int | None) -> torch.Tensor:
        solver = MaskSolver(self.index, self.cost, round_to=round_to)
        if metric == "latency":
            budget = Budget.from_target(self.cost, latency_reduction=1 - fraction)
        else:
            budget = Budget.from_target(self.cost, flops_reduction=1 - fraction)
        return solver.solve(self.scores, budget)

    def latency_student(self, speedup: float, rounds: int) -> Refined:
        """As compress does: solved on the table at widths of the probed block, then held to the
        measured speed-up (``refine_latency_mask``, ``rounds`` measurements)."""
        budget = Budget.from_target(self.cost, latency_reduction=1 - 1 / speedup)
        return refine_latency_mask(self.latency_solver(), self.scores, budget, self.meter, rounds=rounds)

    def latency_solver(self) -> MaskSolver:
        """The widths a latency target keeps (as ``analyse`` sets them): multiples of the
        table's block, and its narrow half block below."""
        table = self.latency.table
        return MaskSolver(self.index, self.cost, round_to=table.multiple, narrow=table.narrow)

    def measure(self, keep: torch.Tensor) -> dict[str, Any]:
        """Interleaved rounds against the unpruned network (``SpeedupMeter``): both p50s and the
        pooled speed-up, beside the table's prediction and what the mask keeps."""
        return {
            **self.meter.measure(keep),
            "predicted_ms": self.latency.predict(keep),
            "predicted_speedup": self.latency.base_ms / self.latency.predict(keep),
            "flops_kept": self.cost.macs(keep) / self.cost.base_macs,
            "params_kept": self.cost.params(keep) / self.cost.base_params,
        }

    def flops_at_speedup(self, target: float, round_to: int | None, start: float) -> dict[str, Any]:
        """FLOPs-targeted students until two measured ones bracket the speed-up ``target`` (or 8
        tries); FLOPs and params at ``target`` interpolated between the two nearest. Speed-ups,
        each measured against the unpruned network in interleaved rounds, not milliseconds: a
        shared machine's drift between probes moves milliseconds, not their ratio."""
        probes: list[tuple[float, dict]] = []
        fraction = start
        narrowest = False
        step_backs = 0
        while len(probes) < FLOPS_PROBES:
            try:
                keep = self.solve("flops", fraction, round_to)
            except UserError:  # below the narrowest network: halfway back to the last probe
                step_backs += 1
                if not probes or abs(fraction - probes[-1][0]) < 0.005 or step_backs > FLOPS_PROBES:
                    narrowest = True  # nothing FLOPs-targeted is that fast
                    break
                fraction = (fraction + probes[-1][0]) / 2
                continue
            m = self.measure(keep)
            probes.append((fraction, m))
            faster = [p for p in probes if p[1]["speedup"] >= target]
            slower = [p for p in probes if p[1]["speedup"] < target]
            if faster and slower:
                break
            if len(probes) == 1:  # first step: scale the FLOPs fraction by the speed-up still missing
                fraction = min(0.98, max(0.02, fraction * m["speedup"] / target))
            else:  # secant on (1 / speed-up, fraction) through the last two
                (f1, m1), (f2, m2) = probes[-2], probes[-1]
                x1, x2 = 1 / m1["speedup"], 1 / m2["speedup"]
                slope = (f2 - f1) / ((x2 - x1) or 1e-9)
                if slope <= 0:
                    # fewer FLOPs measured slower: two probes within the noise of a flat curve
                    # (ResNet-50 unrounded near 1.5x); step on from the one nearest the target,
                    # by the speed-up still missing, squared (the curve is flat there)
                    f2, m2 = min(probes, key=lambda p: abs(p[1]["speedup"] - target))
                    step = f2 * (m2["speedup"] / target) ** 2
                else:
                    step = f2 + slope * (1 / target - x2)
                # two probes within the noise make a flat secant: at most a 1.5x step either way
                fraction = min(0.98, max(0.02, f2 / 1.5, min(f2 * 1.5, step)))
                if any(abs(fraction - f) < 0.002 for f, _ in probes):  # measured already: step past it
                    fraction = max(0.02, min(0.98, fraction * (0.9 if m2["speedup"] < target else 1.1)))
        faster = sorted((p for p in probes if p[1]["speedup"] >= target), key=lambda p: p[1]["speedup"])
        slower = sorted((p for p in probes if p[1]["speedup"] < target), key=lambda p: -p[1]["speedup"])
        out: dict[str, Any] = {"probes": [{"flops_fraction": f, **m} for f, m in probes], "narrowest": narrowest}
        if faster and slower:
            a, b = faster[0][1], slower[0][1]
            w = (1 / target - 1 / a["speedup"]) / (1 / b["speedup"] - 1 / a["speedup"])
            out["flops_kept"] = a["flops_kept"] + w * (b["flops_kept"] - a["flops_kept"])
            out["params_kept"] = a["params_kept"] + w * (b["params_kept"] - a["params_kept"])
            out["bracketed"] = True
        else:
            nearest = min(probes, key=lambda p: abs(p[1]["speedup"] - target))[1] if probes else {}
            out.update(flops_kept=nearest.get("flops_kept"), params_kept=nearest.get("params_kept"), bracketed=False)
        return out


def fmnist_key(seed: int) -> str:
    """Where one seed's comparison lives in the results (seed 0: "fmnist", as before seeds)."""
    return "fmnist" if seed == 0 else f"fmnist-seed{seed}"


def fmnist_comparison(args: argparse.Namespace, data: dict, work: Path, seed: int = 0) -> None:
    """The demo recipe's network and schedule (fmnist_quick: shipped ResNet-8 teacher, cascade with
    2 TAs, 1 joint + 3 student epochs, full 10k test split) with a latency target at batch 32, and
    with the FLOPs target whose L1-ranked student measures as fast (``_flops_fraction_for``); both
    trained students then timed in interleaved rounds, so "the same latency" is a measurement."""
    from cascadec.errors import GateFailed
    from cascadec.stages import compress

    entry = data["results"].setdefault(fmnist_key(seed), {})
    entry["seed"] = seed
    batch = args.fmnist_batch
    reduction = 1 - 1 / args.fmnist_target
    common = [f"prune.latency.batch={batch}", "prune.latency.tolerance=null", f"profile.batches=[{batch}]"]
    seeded = [f"train.seed={seed}"] if seed else []
    if "latency_run" not in entry or not args.resume:
        out = work / f"fmnist-latency-{seed}"
        start = time.perf_counter()
        report = compress(
            "cifar_resnet8",
            "fmnist_quick",
            out=str(out),
            overrides=[
                "prune.target.flops_reduction=null",
                f"prune.target.latency_reduction={reduction}",
                "prune.round_to=null",  # a latency target's own rounding: the backend's channel block
                *common,
                *seeded,
            ],
        )
        entry["latency_run"] = _fmnist_row(report, out, time.perf_counter() - start)
        _save(data)
    # the FLOPs target whose student measures as fast as the latency-targeted one
    lat = entry["latency_run"]
    if "flops_run" not in entry or not args.resume:
        chosen = _flops_fraction_for(Path(lat["dir"]), batch, args.rounds)
        flops_fraction = chosen["flops_fraction"]
        out = work / f"fmnist-flops-{seed}"
        start = time.perf_counter()
        try:
            report = compress(
                "cifar_resnet8",
                "fmnist_quick",
                out=str(out),
                overrides=[
                    f"prune.target.flops_reduction={1 - flops_fraction:.4f}",
                    f"profile.batches=[{batch}]",
                    *seeded,
                ],
            )
        except GateFailed:  # a parity gate: the row says so
            report = json.loads((out / "report.json").read_text())
        entry["flops_run"] = _fmnist_row(report, out, time.perf_counter() - start)
        entry["flops_run"]["flops_reduction_chosen"] = 1 - flops_fraction
        entry["flops_run"]["chosen_by"] = chosen
        _save(data)
    _annotate_fmnist(entry, batch)
    _save(data)
    if "interleaved_ms" in entry and args.resume and not args.remeasure:
        return  # measured already: --remeasure times the pair again
    # both students, interleaved, same protocol
    files = {k: Path(entry[k]["dir"]) / "student.onnx" for k in ("latency_run", "flops_run")}

    def profile_one(which: str, share: Timing) -> dict:
        return profile_onnx(files[which], [1, 28, 28], [batch], timing=share, progress=False, keep_samples=True)

    timing = Timing(warmup_s=0.2, min_duration_s=args.duration, min_iters=10)
    pooled, _ = profile_interleaved(profile_one, list(files), rounds=args.rounds, timing=timing)
    entry["interleaved_ms"] = {k: pooled[k][batch]["p50_ms"] for k in files}
    entry["batch"] = batch
    entry["target_speedup"] = args.fmnist_target
    _save(data)


def _fmnist_model() -> tuple[torch.nn.Module, torch.Tensor]:
    model = create_model("cifar_resnet8", weights="builtin:cifar_resnet8_fmnist", num_classes=10, in_channels=1).eval()
    return model, torch.zeros(1, 1, 28, 28)


def _annotate_fmnist(entry: dict, batch: int) -> None:
    """What the comparison rests on, in the results: each student's kept widths (read from its
    run's student.widths.json while the run directory exists) and, from the latency table the
    latency-targeted run used (cached), what a layer costs reading or writing the half block
    against the full block."""
    model, example = _fmnist_model()
    full = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for key in ("latency_run", "flops_run"):
        spec = Path(entry[key]["dir"]) / "student.widths.json"
        if "kept_widths" not in entry[key] and spec.is_file():
            removed = json.loads(spec.read_text())["removed_channels"]
            entry[key]["kept_widths"] = {n: f"{full[n] - len(r)}/{full[n]}" for n, r in removed.items() if n in full}
    if "half_block" not in entry:
        index = build_groups(model, example)
        cost = CostModel.build(model, index, example)
        latency = attach_latency_model(
            model, example, cost, backend="onnxruntime", batch=batch, grid_points=4, threads=None
        )
        entry["half_block"] = half_block_rows(latency)


def half_block_rows(latency) -> list[dict[str, Any]]:
    """Per layer configuration of the table with both the half block and the block on an axis:
    milliseconds at each (the other axis at full width), so "narrower than a block is cheaper"
    is a measurement the results hold."""
    table = latency.table
    narrow, block = table.narrow, table.multiple
    rows = []
    if not narrow:
        return rows
    names = {}
    for name, key in table.layers.items():
        names.setdefault(key, []).append(name)
    for key, t in table.tables.items():
        for axis, grid in (("input", t.in_grid), ("output", t.out_grid)):
            if narrow in grid and block in grid:
                at = {
                    w: (t.at(w, t.out_grid[-1]) if axis == "input" else t.at(t.in_grid[-1], w)) for w in (narrow, block)
                }
                rows.append(
                    {
                        "layers": names[key],
                        "axis": axis,
                        "shape": f"{t.config.in_channels}->{t.config.out_channels} {'x'.join(map(str, t.config.kernel))} "
                        f"at {'x'.join(map(str, t.config.input_hw))}",
                        f"ms_{narrow}": at[narrow],
                        f"ms_{block}": at[block],
                    }
                )
    return rows


def _fmnist_row(report: dict, out: Path, seconds: float) -> dict:
    target = report.get("latency_target") or {}
    lat = (report.get("latency") or {}).get("onnxruntime", {})
    student = next(iter((lat.get("student") or {}).values()), {})
    teacher = next(iter((lat.get("teacher") or {}).values()), {})
    return {
        "dir": str(out),
        "accuracy": report["student"]["accuracy"],
        "teacher_accuracy": report["teacher"]["accuracy"],
        "flops_kept": report["student"]["flops"] / report["teacher"]["flops"],
        "params_kept": report["student"]["params"] / report["teacher"]["params"],
        "student_ms": student.get("p50_ms"),
        "teacher_ms": teacher.get("p50_ms"),
        "predicted_ms": target.get("predicted_ms") or (report.get("latency_prediction") or {}).get("predicted_ms"),
        "measured_speedup": (teacher.get("p50_ms") or 0) / (student.get("p50_ms") or 1),
        "predicted_speedup": target.get("predicted_speedup"),
        "seconds": round(seconds, 1),
    }


def _flops_fraction_for(latency_dir: Path, batch: int, rounds: int) -> dict[str, Any]:
    """The FLOPs fraction (round_to 8, as fmnist_quick rounds) whose L1-ranked student of the
    shipped teacher measures as fast as the latency-targeted run's student: both timed against
    the teacher in interleaved rounds at ``batch`` (``SpeedupMeter``), bisection on the fraction.
    Measured, not predicted: a table that knows the backend's 16-channel steps prices a
    round-to-8 student above what its FLOPs say, and choosing the FLOPs run by the table would
    compare students of different measured speed."""
    model, example = _fmnist_model()
    index = build_groups(model, example)
    cost = CostModel.build(model, index, example)
    scores = l1_importance(model, index)
    solver = MaskSolver(index, cost, round_to=8)
    meter = SpeedupMeter(model, index, example, backend="onnxruntime", batch=batch, threads=None, rounds=rounds)
    try:
        # the latency-targeted student's own speed-up, measured the same way
        goal = meter.compare(latency_dir / "student.onnx")["speedup"]
        probes = []
        lo, hi = 0.05, 1.0
        for _ in range(7):
            mid = (lo + hi) / 2
            speedup = meter(solver.solve(scores, Budget.from_target(cost, flops_reduction=1 - mid)))
            probes.append({"flops_fraction": mid, "speedup": speedup})
            if speedup >= goal:
                lo = mid
            else:
                hi = mid
    finally:
        meter.close()
    best = min(probes, key=lambda p: abs(p["speedup"] - goal))
    return {"goal_speedup": goal, "probes": probes, "flops_fraction": best["flops_fraction"]}


def run_entry(script: str) -> dict[str, str]:
    """What a results file says about one invocation: the command, commit, date and machine."""
    env = environment()
    return {
        "command": f"python {script} " + " ".join(sys.argv[1:]),
        "commit": git_commit(ignore=("bench/results",)),  # +dirty: code, not earlier results, uncommitted
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{env.get('cpu')}, {env.get('logical_cores')} logical CPUs, {env.get('ram_gb')} GiB RAM",
    }


def run_lines(runs: list[dict[str, str]]) -> list[str]:
    """The Markdown list of the invocations ``run_entry`` recorded, each with its note."""
    return [
        f"- {r['date']}, commit {r['commit']}: {r['machine']}; `{r['command']}`"
        + (f": {r['note']}" if r.get("note") else "")
        for r in runs
    ]


def _load() -> dict:
    if JSON_PATH.is_file():
        return json.loads(JSON_PATH.read_text())
    return {"runs": [], "results": {}}


def save_results(data: dict, json_path: Path, md_path: Path, render) -> None:
    """The JSON (replaced whole, so a stopped run leaves the last complete one) and its Markdown."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(json_path)
    md_path.write_text(render(data))


def _save(data: dict) -> None:
    save_results(data, JSON_PATH, MD_PATH, markdown)


def _table_only(lat: dict) -> str:
    first = lat.get("table_only")
    if first is None:  # a row from before the measured re-solves
        return f"{lat['predicted_speedup']:.2f}x / {lat['speedup']:.2f}x"
    return f"{first['predicted_speedup']:.2f}x / {first['measured_speedup']:.2f}x"


def _tries(lat: dict) -> str:
    tries = lat.get("refine")
    if not tries:
        return "none"
    return ", ".join(f"{t['measured_speedup']:.2f}x" + (" (kept)" if t.get("chosen") else "") for t in tries)


def markdown(data: dict) -> str:
    lines = [
        "# Latency targets on the CPU (ONNX Runtime, batch 1)",
        "",
        "Command: `python bench/latency_targets.py` (see the script's docstring for the protocol).",
        "",
    ]
    lines += run_lines(data.get("runs", []))
    lines += [
        "",
        "## Latency tables",
        "",
        "| model | layers | widths timed | channel block (widths at multiples of; the half block below) "
        "| build s | reloaded from the cache, s |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in data["results"].items():
        if model.startswith("fmnist"):
            continue
        t = r.get("table", {})
        reload = f"{r['table_reload_seconds']:.1f}" if "table_reload_seconds" in r else "-"
        lines.append(
            f"| {model} | {t.get('layers')} | {t.get('grid_points')} | {t.get('channel_block', 'not probed')} "
            f"({t.get('multiple', 8)}{'; ' + str(t['narrow']) if t.get('narrow') else ''}) "
            f"| {r.get('table_seconds', 0):.0f} | {reload} |"
        )
    lines += [
        "",
        "## Measured speed-up against the target, and what each student keeps at the same measured latency",
        "",
        "| model | target | table only: predicted / measured | measured re-solves | shipped: measured (per round) "
        "| error vs target | latency-targeted FLOPs / params kept "
        "| FLOPs-targeted, round_to 8: FLOPs / params | FLOPs-targeted, no rounding: FLOPs / params | more FLOPs kept (vs 8 / vs none) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for model, r in data["results"].items():
        if model.startswith("fmnist"):
            continue
        for key, row in sorted(r.get("targets", {}).items(), key=lambda kv: float(kv[0])):
            if "infeasible" in row:
                verdicts.append(False)
                narrow = row.get("narrowest")
                measured = (
                    f"; the narrowest allowed student measures {narrow['speedup']:.2f}x "
                    f"({narrow['flops_kept']:.3f} of the FLOPs)"
                    if narrow
                    else ""
                )
                lines.append(
                    f"| {model} | {float(key):.1f}x | refused before any work: {row['infeasible']}{measured} ||||||||"
                )
                continue
            lat = row["latency"]
            err = lat["speedup"] / float(key) - 1
            verdicts.append(abs(err) <= GOAL_SPEEDUP_ERROR)
            cells = []
            gains = []
            for rt in ("8", "none"):
                f = row.get(f"flops_round_to_{rt}")
                if f is None:
                    cells.append("not run")
                    gains.append("-")
                    continue
                if f.get("bracketed"):
                    cells.append(f"{f['flops_kept']:.3f} / {f['params_kept']:.3f}")
                    gains.append(f"{lat['flops_kept'] / f['flops_kept'] - 1:+.1%}")
                    continue
                slower = all(p["speedup"] < lat["speedup"] for p in f["probes"])
                fastest = max((p["speedup"] for p in f["probes"]), default=float("nan"))
                if not slower:
                    cells.append(f"not bracketed in {len(f['probes'])} steps")
                elif f.get("narrowest"):
                    cells.append(f"none as fast (fastest measured: {fastest:.2f}x)")
                else:
                    cells.append(f"none as fast in {len(f['probes'])} steps (fastest measured: {fastest:.2f}x)")
                gains.append("-")
            rounds = ", ".join(f"{s:.2f}" for s in lat.get("speedup_rounds", []))
            lines.append(
                f"| {model} | {float(key):.1f}x | {_table_only(lat)} | {_tries(lat)} | {lat['speedup']:.2f}x ({rounds}) | "
                f"{err:+.1%} | {lat['flops_kept']:.3f} / {lat['params_kept']:.3f} | {cells[0]} | {cells[1]} | "
                f"{' / '.join(gains)} |"
            )
    seeds = sorted(
        (
            r
            for k, r in data["results"].items()
            if k.startswith("fmnist") and r.get("latency_run") and r.get("flops_run")
        ),
        key=lambda r: r.get("seed", 0),
    )
    if seeds:
        lines += [
            "",
            f"## Fashion-MNIST: latency-targeted against FLOPs-targeted at the same latency (batch {seeds[0].get('batch')})",
            "",
            "fmnist_quick's network and schedule (shipped ResNet-8 teacher, cascade with 2 TAs, 1 joint + 3 student "
            "epochs, accuracy on the full 10k test split), one pair of runs per training seed (`train.seed`); the "
            "FLOPs target (widths rounded to 8, as the recipe rounds) is the one whose L1-ranked student of the same "
            "teacher measures as fast as that seed's latency-targeted student (bisection, each probe timed against "
            "the teacher in interleaved rounds). Both trained students timed again in interleaved rounds:",
            "",
            "| seed | student | target | test accuracy | FLOPs kept | params kept | p50 ms in its run (speed-up) "
            "| p50 ms interleaved | widths kept (pruned convs) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for fm in seeds:
            for key, label in (("latency_run", "latency-targeted"), ("flops_run", "FLOPs-targeted")):
                r = fm[key]
                target = (
                    f"{fm.get('target_speedup', 0):.2f}x lower latency"
                    if key == "latency_run"
                    else f"{r.get('flops_reduction_chosen', 0):.1%} fewer FLOPs"
                )
                lines.append(
                    f"| {fm.get('seed', 0)} | {label} | {target} | {r['accuracy']:.2%} | {r['flops_kept']:.3f} | "
                    f"{r['params_kept']:.3f} | {r['student_ms']:.3g} ({r['measured_speedup']:.2f}x) | "
                    f"{fm.get('interleaved_ms', {}).get(key, float('nan')):.3g} | "
                    + (", ".join(f"{n} {w}" for n, w in r["kept_widths"].items()) if r.get("kept_widths") else "-")
                    + " |"
                )
        half = next((fm["half_block"] for fm in seeds if fm.get("half_block")), None)
        if half:
            narrow, block = (k[3:] for k in half[0] if k.startswith("ms_"))
            lines += [
                "",
                f"The latency table those runs used (batch {seeds[0].get('batch')}), each layer at the half block "
                f"and at the block on one axis, the other at full width:",
                "",
                f"| layers | shape | axis | ms at {narrow} | ms at {block} |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {', '.join(h['layers'])} | {h['shape']} | {h['axis']} | {h['ms_' + narrow]:.3f} | "
                f"{h['ms_' + block]:.3f} |"
                for h in half
            ]
    spent = [(m, r["time_per_flop"]) for m, r in data["results"].items() if r.get("time_per_flop")]
    if spent:
        lines += [
            "",
            "## Where the time goes at full width (`cascadec inspect MODEL --latency`, from these tables)",
            "",
            "| model | layers | input | count | share of time | share of FLOPs | time per FLOP |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, rows in spent:
            lines += [
                f"| {m} | {t['kind']} | {t['input']} | {t['layers']} | {t['time_share']:.1%} | {t['flops_share']:.1%} | "
                + (f"{t['time_per_flop']:.2f}x |" if t["time_per_flop"] is not None else "- |")
                for t in rows
            ]
    lines += ["", "## Goals", ""]
    if verdicts:
        lines.append(
            f"- measured speed-up within {GOAL_SPEEDUP_ERROR:.0%} of the target: {sum(verdicts)} of {len(verdicts)} "
            f"({'met' if all(verdicts) else 'not met'})"
        )
    for rt, label in (("8", "round_to 8"), ("none", "no rounding")):
        gains = [
            row["latency"]["flops_kept"] / row[f"flops_round_to_{rt}"]["flops_kept"] - 1
            for m, r in data["results"].items()
            if not m.startswith("fmnist")
            for row in r.get("targets", {}).values()
            if "latency" in row and (row.get(f"flops_round_to_{rt}") or {}).get("bracketed")
        ]
        if gains:
            met = sum(g >= GOAL_MORE_FLOPS for g in gains)
            lines.append(
                f"- at equal measured latency, at least {GOAL_MORE_FLOPS:.0%} more FLOPs kept than the FLOPs-targeted "
                f"student with {label}: {met} of {len(gains)} (gains {', '.join(f'{g:+.1%}' for g in gains)}; "
                f"{'met' if met == len(gains) else 'not met'})"
            )
    if seeds:
        diffs = [100 * (fm["latency_run"]["accuracy"] - fm["flops_run"]["accuracy"]) for fm in seeds]
        mean = sum(diffs) / len(diffs)
        lines.append(
            f"- Fashion-MNIST accuracy of the latency-targeted student at least the FLOPs-targeted one's: "
            f"{mean:+.2f} points on average over {len(diffs)} seed(s) ({', '.join(f'{d:+.2f}' for d in diffs)}; "
            f"{'met' if mean >= 0 else 'not met'})"
        )
    r50 = data["results"].get("resnet50") or {}
    if r50.get("table") and not r50["table"].get("cached"):
        built = r50["table_seconds"]
        reload = r50.get("table_reload_seconds")
        lines.append(
            f"- ResNet-50 table built in {built:.0f} s (goal at most {GOAL_TABLE_SECONDS:.0f} s: "
            f"{'met' if built <= GOAL_TABLE_SECONDS else 'not met'}); "
            + (
                f"the next run loaded it from the cache in {reload:.1f} s"
                if reload is not None
                else "reuse from the cache not measured by this benchmark yet (tests/test_prune_latency.py checks it)"
            )
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2"], help="none: only --fmnist")
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="with --resume: measure every model's target rows again (the tables and Fashion-MNIST rows are kept)",
    )
    p.add_argument("--refine", type=int, default=3, help="measured re-solves (prune.latency.refine; 0: table only)")
    p.add_argument(
        "--fmnist", action="store_true", help="also the Fashion-MNIST accuracy comparison (two compress runs)"
    )
    p.add_argument("--fmnist-target", type=float, default=1.4, help="speed-up asked of the Fashion-MNIST student")
    p.add_argument("--fmnist-batch", type=int, default=32)
    p.add_argument("--fmnist-seeds", type=int, nargs="+", default=[0], help="training seeds (train.seed), a pair each")
    args = p.parse_args()
    data = _load() if args.resume else {"runs": [], "results": {}}
    data["runs"].append(run_entry("bench/latency_targets.py"))
    work = Path(tempfile.mkdtemp(prefix="latency-targets-"))
    for name in args.models:
        bench = Bench(name, args.size, args)
        entry = data["results"].setdefault(name, {"targets": {}})
        if "table" not in entry or not bench.latency.table.cached:
            entry["table"] = bench.latency.table.summary()
            entry["table_seconds"] = bench.table_seconds
        else:
            entry["table_reload_seconds"] = bench.table_seconds  # the cache's answer on a later run
        entry["base_ms_predicted"] = bench.latency.base_ms
        entry["time_per_flop"] = time_per_flop(bench.latency)  # what `cascadec inspect --latency` shows
        _save(data)
        for t in args.targets:
            key = f"{t:g}"
            if key in entry["targets"] and args.resume and not args.remeasure:
                continue
            print(f"{name} {t}x: latency-targeted", flush=True)
            solver = bench.latency_solver()
            try:
                refined = bench.latency_student(t, args.refine)
            except UserError as exc:  # the narrowest network the solver allows is slower than this
                # what it measures, so the refusal is checked against the backend, not the table
                narrowest = solver.mask_for_count(torch.zeros(bench.index.num_units), 0)
                entry["targets"][key] = {"infeasible": str(exc), "narrowest": bench.measure(narrowest)}
                _save(data)
                continue
            keep = refined.keep
            row: dict[str, Any] = {"latency": bench.measure(keep)}
            row["latency"]["multiple"] = bench.latency.table.multiple
            row["latency"]["ranking"] = bench.latency.ranking
            row["latency"]["refine"] = refined.history
            row["latency"]["table_only"] = refined.history[0]
            reached = row["latency"]["speedup"]
            start = row["latency"]["flops_kept"]
            for rt in (8, None):
                print(f"{name} {t}x: FLOPs-targeted, round_to {rt}", flush=True)
                row[f"flops_round_to_{rt or 'none'}"] = bench.flops_at_speedup(reached, rt, start)
            entry["targets"][key] = row
            _save(data)
    if args.fmnist:
        for seed in args.fmnist_seeds:
            fmnist_comparison(args, data, work, seed)
    print(MD_PATH.read_text())


if __name__ == "__main__":
    main()
