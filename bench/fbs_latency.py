"""FBS on ONNX Runtime's CPU provider: what dynamic gating buys on a dense runtime, next to a
statically pruned student of the same MACs per image (issue 14, part 4).

    python bench/fbs_latency.py [--keep 0.375] [--batches 1 8 32] [--duration 2] [--rounds 3]

For each network (the shipped Fashion-MNIST ResNet-8 on 512 test images; ResNet-50 at 224x224
with random weights on 16 random images): the teacher, the FBS-gated network (gates with
random image-dependent weights: latency does not depend on their values), and a static student
pruned (global L1) to the FBS network's measured effective MACs per image, all exported to
ONNX and timed with cascadec's interleaved protocol. Results:
bench/results/fbs-latency-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from cascadec.backends.onnx_export import export_onnx
from cascadec.data import build_data
from cascadec.envinfo import environment
from cascadec.models import create_model
from cascadec.profile.engines import profile_onnx
from cascadec.profile.protocol import Timing, profile_interleaved
from cascadec.prune.cost import count_macs, count_params
from cascadec.prune.fbs import effective_macs, gated_layers, gated_student, static_equivalent
from cascadec.run import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
CPU = torch.device("cpu")


def networks(which: list[str]):
    if "resnet8" in which:
        teacher = create_model(
            "cifar_resnet8", weights="builtin:cifar_resnet8_fmnist", num_classes=10, in_channels=1
        ).eval()
        bundle = build_data("fashion_mnist", val_limit=512, seed=0)
        yield "cifar_resnet8 (Fashion-MNIST)", teacher, [1, 28, 28], DataLoader(bundle.val, batch_size=128)
    if "resnet50" in which:
        torch.manual_seed(0)
        teacher = create_model("resnet50", num_classes=1000).eval()
        images = torch.randn(16, 3, 224, 224)
        yield (
            "resnet50 (random weights)",
            teacher,
            [3, 224, 224],
            DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8),
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.375)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet50"], choices=["resnet8", "resnet50"])
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for label, teacher, shape, loader in networks(args.models):
        example = torch.zeros(1, *shape)
        gated, _ = gated_student(teacher, args.keep)
        with torch.no_grad():
            for layer in gated_layers(gated):
                layer.gate.fc.weight.normal_(0, 0.1)  # image-dependent choices, as a trained gate makes
        gated.eval()
        fbs = effective_macs(gated, loader, device=CPU)
        teacher_macs = count_macs(teacher, example)
        static = static_equivalent(teacher, example, fbs["effective_macs"])  # what the report times beside FBS
        work = Path(tempfile.mkdtemp(prefix="fbs-latency-"))
        models = {"teacher": teacher, "fbs": gated, "static": static}
        for name, model in models.items():
            export_onnx(model, example, work / f"{name}.onnx")

        def profile_one(name: str, share: Timing, work=work, shape=shape) -> dict:
            return profile_onnx(
                work / f"{name}.onnx", shape, args.batches, timing=share, progress=False, keep_samples=True
            )

        prof, ratios = profile_interleaved(
            profile_one,
            list(models),
            rounds=args.rounds,
            timing=Timing(warmup_s=0.2, min_duration_s=args.duration, min_iters=10),
        )
        macs = {
            "teacher": teacher_macs,
            "fbs_dense": count_macs(gated, example),
            "fbs_effective": fbs["effective_macs"],
            "static": count_macs(static, example),
        }
        for b in args.batches:
            row = {
                "model": label,
                "batch": b,
                "keep": args.keep,
                "macs": macs,
                "params": {n: count_params(m) for n, m in models.items()},
                "p50_ms": {n: prof[n][b]["p50_ms"] for n in models},
                "speedup": {n: prof["teacher"][b]["p50_ms"] / prof[n][b]["p50_ms"] for n in ("fbs", "static")},
                "speedup_rounds": {n: ratios[n][b] for n in ("fbs", "static")},
            }
            rows.append(row)
            print(
                f"{label} batch {b}: teacher {row['p50_ms']['teacher']:.2f} ms, FBS {row['p50_ms']['fbs']:.2f} ms "
                f"({row['speedup']['fbs']:.2f}x), static {row['p50_ms']['static']:.2f} ms ({row['speedup']['static']:.2f}x)",
                flush=True,
            )
    doc = {
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "environment": environment(),
        "rows": rows,
        "protocol": {"warmup_s": 0.2, "min_duration_s": args.duration, "min_iters": 10, "rounds": args.rounds},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fbs-latency-cpu.json").write_text(json.dumps(doc, indent=2))
    env = doc["environment"]
    lines = [
        "# FBS on a dense runtime: ONNX Runtime CPU latency next to a static student of the same MACs",
        "",
        f"Command: `{doc['command']}` (commit {doc['commit']}); CPU: {env.get('cpu')}, "
        f"{env.get('logical_cores')} logical cores, onnxruntime {env['versions'].get('onnxruntime')}.",
        f"FBS keep d = {args.keep}; static student: global L1 pruning to the FBS network's effective MACs per image. "
        f"0.2 s warm-up, >= {args.duration:g} s and >= 10 iterations per model and batch, {args.rounds} interleaved "
        "rounds (per round: lowest-highest speed-up over the teacher).",
        "",
        "| model | batch | MACs: teacher / FBS dense / FBS effective / static | teacher p50 ms | FBS p50 ms (speed-up, per round) | static p50 ms (speed-up, per round) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, t = r["macs"], r["p50_ms"]
        fr, sr = r["speedup_rounds"]["fbs"], r["speedup_rounds"]["static"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {m['teacher'] / 1e6:.1f}M / {m['fbs_dense'] / 1e6:.1f}M / "
            f"{m['fbs_effective'] / 1e6:.1f}M / {m['static'] / 1e6:.1f}M | {t['teacher']:.2f} | "
            f"{t['fbs']:.2f} ({r['speedup']['fbs']:.2f}x, {min(fr):.2f}-{max(fr):.2f}) | "
            f"{t['static']:.2f} ({r['speedup']['static']:.2f}x, {min(sr):.2f}-{max(sr):.2f}) |"
        )
    (RESULTS / "fbs-latency-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
