"""ResNet-50 at 50 % fewer FLOPs on the CPU: measured ONNX Runtime speed-up next to the
FLOPs ratio, at batch 1 and 32, for several `round_to` settings (issue 4's acceptance check).

    python bench/latency_resnet50.py [--batches 1 32] [--duration 3] [--round-to none 8 16 32]

Random weights (latency does not depend on them); widths from L1 importance. The protocol
is cascadec's (trtexec-like): 0.2 s warm-up, then at least --duration seconds and 10 iterations
per model and batch size, taken in --rounds alternating rounds (teacher, every student, teacher,
...) so that machine drift hits every model alike; we report the pooled p50 with the p90/p99
spread and the lowest/highest per-round speed-up. Results: bench/results/latency-resnet50-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from cascadec.backends.onnx_export import export_onnx
from cascadec.envinfo import environment
from cascadec.models import create_model
from cascadec.profile.engines import profile_onnx
from cascadec.profile.protocol import Timing, profile_interleaved
from cascadec.prune.cost import CostModel, count_macs, count_params
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.run import git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--round-to", nargs="+", default=["none", "8", "16", "32"])
    p.add_argument("--flops-reduction", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=1000).eval()
    example = torch.zeros(1, 3, 224, 224)
    index = build_groups(model, example)
    cost = CostModel.build(model, index, example)
    scores = l1_importance(model, index)
    budget = Budget.from_target(cost, flops_reduction=args.flops_reduction)
    work = Path(tempfile.mkdtemp(prefix="latency-r50-"))
    export_onnx(model, example, work / "teacher.onnx")
    students = {}
    for rt in args.round_to:
        round_to = None if rt == "none" else int(rt)
        keep = MaskSolver(index, cost, round_to=round_to).solve(scores, budget)
        student = shrink(model, index, keep, example)
        export_onnx(student, example, work / f"student-{rt}.onnx")
        students[rt] = student

    def profile_one(name: str, share: Timing) -> dict:
        return profile_onnx(
            work / f"{name}.onnx", [3, 224, 224], args.batches, timing=share, progress=False, keep_samples=True
        )

    names = ["teacher", *(f"student-{rt}" for rt in args.round_to)]
    prof, ratios = profile_interleaved(
        profile_one, names, rounds=args.rounds, timing=Timing(warmup_s=0.2, min_duration_s=args.duration, min_iters=10)
    )
    teacher = prof["teacher"]
    rows = []
    for rt, student in students.items():
        flops_ratio = count_macs(model, example) / count_macs(student, example)
        for b in args.batches:
            this = prof[f"student-{rt}"]
            speedup = teacher[b]["p50_ms"] / this[b]["p50_ms"]
            per_round = ratios[f"student-{rt}"][b]
            rows.append(
                {
                    "round_to": rt,
                    "batch": b,
                    "flops_ratio": flops_ratio,
                    "params": count_params(student),
                    "teacher": {k: teacher[b][k] for k in ("p50_ms", "p90_ms", "p99_ms", "iterations")},
                    "student": {k: this[b][k] for k in ("p50_ms", "p90_ms", "p99_ms", "iterations")},
                    "speedup_p50": speedup,
                    "speedup_over_flops_ratio": speedup / flops_ratio,
                    "speedup_rounds": per_round,
                }
            )
            print(
                f"round_to {rt:>4} batch {b:>3}: FLOPs ratio {flops_ratio:.2f}x, speed-up {speedup:.2f}x "
                f"(rounds {min(per_round):.2f}-{max(per_round):.2f}x; {speedup / flops_ratio:.2f} of the FLOPs ratio)",
                flush=True,
            )
    doc = {
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "environment": environment(),
        "teacher_flops": count_macs(model, example),
        "teacher_params": count_params(model),
        "rows": rows,
        "protocol": {"warmup_s": 0.2, "min_duration_s": args.duration, "min_iters": 10, "rounds": args.rounds},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency-resnet50-cpu.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "# ResNet-50, 50 % fewer FLOPs: ONNX Runtime CPU latency",
        "",
        f"Command: `{doc['command']}` (commit {doc['commit']}); CPU: {doc['environment'].get('cpu')}, "
        f"{doc['environment'].get('logical_cores')} logical cores, onnxruntime {doc['environment']['versions'].get('onnxruntime')}.",
        "Random weights, widths from L1 importance; 0.2 s warm-up, then >= "
        f"{args.duration:g} s and >= 10 iterations per model and batch size, in {args.rounds} alternating rounds "
        "(statistics pool every round's runs; the per-round column is the lowest-highest speed-up of single rounds).",
        "",
        "| round_to | batch | FLOPs ratio | teacher p50 (p90/p99) ms | student p50 (p90/p99) ms | speed-up (p50) | per round | speed-up / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s = r["teacher"], r["student"]
        lines.append(
            f"| {r['round_to']} | {r['batch']} | {r['flops_ratio']:.2f}x | {t['p50_ms']:.1f} ({t['p90_ms']:.1f}/{t['p99_ms']:.1f}) | "
            f"{s['p50_ms']:.1f} ({s['p90_ms']:.1f}/{s['p99_ms']:.1f}) | {r['speedup_p50']:.2f}x | "
            f"{min(r['speedup_rounds']):.2f}-{max(r['speedup_rounds']):.2f}x | {r['speedup_over_flops_ratio']:.2f} |"
        )
    (RESULTS / "latency-resnet50-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
