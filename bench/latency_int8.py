"""Latency targets in the deployed precision (issue 27, item 5): "t x faster in INT8" measured as
the FP32 teacher against the INT8 student, and what the student keeps for it.

    python bench/latency_int8.py [--models resnet50 mobilenet_v2] [--targets 3 5] [--resume]

Random weights (latency does not depend on them), 224 px, ONNX Runtime on the CPU with its
default threads, batch --batch (1); widths from the weights' L1 importance (the same scores for
every solve). INT8 graphs are the quantize stage's ONNX Runtime flavour (U8S8 Q/DQ,
per-channel weights; ``quant_pre_process`` first), calibrated for timing on one seeded random
batch (``cascadec.quantize.ptq.int8_for_timing``: int8 kernels run at the same speed whatever
the ranges). Per model, both latency tables are built (or loaded from the cache), the unpruned
network is timed FP32 against INT8 (quantization alone), then per target speed-up t over the
FP32 teacher, two students:

* **INT8-targeted** (``prune.latency.precision: int8``): the table timed on INT8 layers, the
  budget the pruning INT8 does not already give, held to the measured target by up to
  --refine re-solves in INT8 (as compress does);
* **FP32-targeted, then quantized** (what the same target meant before: ``latency_reduction``
  on the FP32 table and refinement, the student quantized afterwards).

Each student is quantized and timed against the FP32 teacher in interleaved rounds (cascadec's
profile protocol: 0.2 s warm-up, then at least --duration s and 10 runs per round, --rounds
rounds, pooled p50): the combined speed-up, its error against the target, and the FLOPs and
parameters kept. Written after every row (JSON and Markdown), --resume skips what is done:
bench/results/latency-int8-cpu.{json,md}.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_targets import run_entry, run_lines, save_results  # noqa: E402

from cascadec.backends.onnx_export import export_onnx  # noqa: E402
from cascadec.errors import UserError  # noqa: E402
from cascadec.models import create_model  # noqa: E402
from cascadec.profile.engines import profile_onnx  # noqa: E402
from cascadec.profile.protocol import Timing, profile_interleaved  # noqa: E402
from cascadec.prune.cost import CostModel  # noqa: E402
from cascadec.prune.groups import build_groups  # noqa: E402
from cascadec.prune.importance import l1_importance  # noqa: E402
from cascadec.prune.latency import attach_latency_model  # noqa: E402
from cascadec.prune.latency_refine import SpeedupMeter, refine_latency_mask  # noqa: E402
from cascadec.prune.shrink import shrink  # noqa: E402
from cascadec.prune.targets import Budget, MaskSolver  # noqa: E402
from cascadec.quantize.ptq import int8_for_timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "latency-int8-cpu.json"
MD_PATH = RESULTS / "latency-int8-cpu.md"
GOAL_SPEEDUP_ERROR = 0.10  # prune.latency.tolerance's default


class Model:
    """One network: its groups, both latency tables, and FP32-teacher-vs-INT8-student timing."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path) -> None:
        torch.manual_seed(0)
        self.name, self.args = name, args
        self.model = create_model(name, num_classes=1000).eval()
        self.example = torch.zeros(1, 3, args.size, args.size)
        self.index = build_groups(self.model, self.example)
        self.scores = l1_importance(self.model, self.index)
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.costs: dict[str, CostModel] = {}
        self.table_seconds: dict[str, float] = {}
        for precision in ("fp32", "int8"):
            cost = CostModel.build(self.model, self.index, self.example)
            start = time.perf_counter()
            attach_latency_model(
                self.model,
                self.example,
                cost,
                backend="onnxruntime",
                batch=args.batch,
                grid_points=4,
                threads=None,
                precision=precision,
                progress=True,
            )
            self.table_seconds[precision] = round(time.perf_counter() - start, 1)
            self.costs[precision] = cost
        export_onnx(self.model, self.example, self.work / "teacher.onnx")
        int8_for_timing(
            self.work / "teacher.onnx", self.work / "teacher.int8.onnx", (1, 3, args.size, args.size), preprocess=True
        )

    def student(self, precision: str, speedup: float) -> tuple[torch.Tensor, list[dict]]:
        """As compress does: the budget from ``latency_reduction`` on that precision's table,
        solved at the table's widths, held to the measurement by up to --refine re-solves."""
        cost = self.costs[precision]
        table = cost.latency.table
        solver = MaskSolver(self.index, cost, round_to=table.multiple, narrow=table.narrow)
        budget = Budget.from_target(cost, latency_reduction=1 - 1 / speedup)
        meter = SpeedupMeter(
            self.model,
            self.index,
            self.example,
            backend="onnxruntime",
            batch=self.args.batch,
            threads=None,
            rounds=self.args.rounds,
            seconds=self.args.duration,
            precision=precision,
            scale=cost.latency.base_ms / cost.latency.reference_ms,
        )
        try:
            refined = refine_latency_mask(solver, self.scores, budget, meter, rounds=self.args.refine)
        finally:
            meter.close()
        for h in refined.history:  # as compress records it: against the FP32 network
            h["deployed_speedup"] = h["measured_speedup"] / meter.scale
        return refined.keep, refined.history

    def deployed(self, keep: torch.Tensor, tag: str) -> dict[str, Any]:
        """The student ``keep`` leaves, quantized, against the FP32 teacher (and the INT8 teacher)
        in interleaved rounds."""
        student = shrink(self.model, self.index, keep, self.example)
        fp32 = self.work / f"{tag}.onnx"
        export_onnx(student, self.example, fp32)
        int8_for_timing(fp32, self.work / f"{tag}.int8.onnx", tuple(self.example.shape), preprocess=True)
        files = {"teacher": "teacher.onnx", "teacher_int8": "teacher.int8.onnx", "student_int8": f"{tag}.int8.onnx"}
        pooled = self.interleaved(files)
        teacher = pooled["teacher"]
        cost = self.costs["fp32"]
        return {
            "teacher_ms": teacher,
            "teacher_int8_ms": pooled["teacher_int8"],
            "student_int8_ms": pooled["student_int8"],
            "speedup": teacher / pooled["student_int8"],
            "quantization_alone": teacher / pooled["teacher_int8"],
            "flops_kept": cost.macs(keep) / cost.base_macs,
            "params_kept": cost.params(keep) / cost.base_params,
        }

    def interleaved(self, files: dict[str, str]) -> dict[str, float]:
        batch = self.args.batch

        def profile_one(which: str, share: Timing) -> dict:
            return profile_onnx(
                self.work / files[which],
                list(self.example.shape[1:]),
                [batch],
                device="cpu",
                timing=share,
                threads=None,
                progress=False,
                keep_samples=True,
            )

        timing = Timing(warmup_s=0.2, min_duration_s=self.args.duration, min_iters=10)
        pooled, _ = profile_interleaved(profile_one, list(files), rounds=self.args.rounds, timing=timing)
        return {k: pooled[k][batch]["p50_ms"] for k in files}


def _load() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {"runs": [], "results": {}}


def _save(data: dict) -> None:
    save_results(data, JSON_PATH, MD_PATH, markdown)


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _table_seconds(entry: dict, precision: str) -> str:
    value = entry.get("table_seconds", {}).get(precision, "")
    cached = (entry.get("tables", {}).get(precision) or {}).get("cached")
    return f"{value} (loaded from the cache)" if cached else str(value)


def markdown(data: dict) -> str:
    lines = [
        "# Latency targets in INT8 on the CPU (ONNX Runtime, U8S8 Q/DQ)",
        "",
        "Command: `python bench/latency_int8.py` (the script's docstring gives the protocol). A target t is",
        "the FP32 teacher's p50 over the INT8 student's, timed in the same interleaved rounds.",
        "",
        *run_lines(data["runs"]),
        "",
        "## Quantization alone and the tables",
        "",
        "| model | batch | FP32 teacher / INT8 teacher (interleaved) | FP32 table s | INT8 table s |",
        "|---|---|---|---|---|",
    ]
    for name, entry in data["results"].items():
        lines.append(
            f"| {name} | {entry.get('batch')} | {_x(entry.get('quantization_alone'))} | "
            f"{_table_seconds(entry, 'fp32')} | {_table_seconds(entry, 'int8')} |"
        )
    lines += [
        "",
        "## FP32 teacher against INT8 student, per target",
        "",
        "| model | target | student | measured re-solves | measured (FP32 teacher / INT8 student) | error vs target "
        "| FLOPs kept | params kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    done = True
    for name, entry in data["results"].items():
        for key, row in entry.get("targets", {}).items():
            for which, label in (("int8", "INT8-targeted"), ("fp32", "FP32-targeted, then quantized")):
                r = row.get(which)
                if r is None:
                    done = False
                    continue
                if "infeasible" in r:
                    lines.append(f"| {name} | {key}x | {label} | | refused: {r['infeasible']} | | | |")
                    continue
                tries = ", ".join(
                    _x(h["deployed_speedup"]) + (" (kept)" if h.get("chosen") else "") for h in r["refine"]
                )
                d = r["deployed"]
                err = d["speedup"] / float(key) - 1
                lines.append(
                    f"| {name} | {key}x | {label} | {tries} ({which.upper()} student) | {_x(d['speedup'])} | "
                    f"{err:+.1%} | {d['flops_kept']:.3f} | {d['params_kept']:.3f} |"
                )
    if not done:
        lines += ["", "**Unfinished: rows are missing (the run was stopped or is still going).**"]
    lines += [
        "",
        f"Goal: the INT8-targeted student within {GOAL_SPEEDUP_ERROR:.0%} of the target (prune.latency.tolerance's "
        "default), keeping more of the network than the FP32-targeted student, which over-shoots once quantized.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--targets", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--refine", type=int, default=3, help="measured re-solves (prune.latency.refine)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    data = _load() if args.resume else {"runs": [], "results": {}}
    data["runs"].append(run_entry("bench/latency_int8.py"))
    work = Path(tempfile.mkdtemp(prefix="latency-int8-"))
    for name in args.models:
        model = Model(name, args, work)
        entry = data["results"].setdefault(name, {"targets": {}})
        entry["batch"] = args.batch
        entry["table_seconds"] = model.table_seconds
        entry["tables"] = {k: c.latency.table.summary() for k, c in model.costs.items()}
        pooled = model.interleaved({"teacher": "teacher.onnx", "teacher_int8": "teacher.int8.onnx"})
        entry["quantization_alone"] = pooled["teacher"] / pooled["teacher_int8"]
        _save(data)
        for t in args.targets:
            row = entry["targets"].setdefault(f"{t:g}", {})
            for precision in ("int8", "fp32"):
                if precision in row and args.resume:
                    continue
                print(f"{name} {t:g}x: {precision}-targeted", flush=True)
                try:
                    keep, history = model.student(precision, t)
                except UserError as exc:
                    row[precision] = {"infeasible": str(exc)}
                else:
                    row[precision] = {"refine": history, "deployed": model.deployed(keep, f"{precision}-{t:g}")}
                _save(data)
    print(MD_PATH.read_text())


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:  # the Markdown again from the JSON, nothing timed
        MD_PATH.write_text(markdown(_load()))
    else:
        main()
