"""Overlapped gradient sync against after-backward averaging (issue 30, item 3): step time on
two gloo processes.

    python bench/grad_sync_speed.py [--steps 30] [--rounds 6] [--batch 128] [--workloads joint,...] [--tag NAME]

Re-runs itself under ``torchrun --standalone --nproc-per-node 2`` (one thread per process: the
two cores of this machine). Each rank builds the same networks and times, per step, forward,
loss, ``Runtime.backward_step`` (backward + gradient averaging + optimiser step) in three modes,
in interleaved rounds (each mode leading in turn) so a change in the machine's speed falls on
all alike (the order-learning first step of each round is not timed):

* ``after-backward``: one all-reduce of every gradient after ``backward`` (``Dist.sync_grads``);
* ``overlap-25MB``: ``train.grad_sync: overlap`` with DDP's bucket sizes (first bucket 1 MB, then
  25 MB), buckets all-reduced asynchronously as their gradients become ready;
* ``overlap-1MB``: the same with 1 MB buckets (more, smaller collectives, earlier);
* ``control``: after-backward again, timed as a fourth mode: its difference from the first is
  what this machine's noise alone makes of two identical modes.

Workloads, ``--batch`` images per global step (half per rank):
* ``joint``: the cascade's joint step of ``fmnist_cascade`` (ResNet-8 student and TAs sharing
  weights, scores moving; Fashion-MNIST's 1x28x28 geometry, random images);
* ``student-resnet8``: the student phase of the same network (KD from cached logits);
* ``student-resnet18``: the student phase of torchvision's ResNet-18 (11.2 M parameters,
  45 MB of gradients) on 3x32x32 images: gradients big enough for several buckets.

Rank 0 appends rows (median ms per step, per mode) to bench/results/grad-sync.{json,md} under
``--tag``. Run nothing else on the machine while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "grad-sync.json"
MD_PATH = RESULTS / "grad-sync.md"
MODES = {
    "after-backward": ("after-backward", 25.0),
    "overlap-25MB": ("overlap", 25.0),
    "overlap-1MB": ("overlap", 1.0),
    "control": ("after-backward", 25.0),  # after-backward again: the A/A difference is the noise floor
}
WARMUP = 3
WORKLOADS = ("joint", "student-resnet8", "student-resnet18")


def student_workload(name: str, local_batch: int):
    """A student-phase step: forward, KD + CE from fixed teacher logits, backward_step."""
    from cascadec.distill.losses import DistillLoss
    from cascadec.models import create_model
    from cascadec.train.loop import make_optimizer

    torch.manual_seed(0)
    if name == "student-resnet8":
        model, shape = create_model("cifar_resnet8", num_classes=10, in_channels=1), (1, 28, 28)
    else:
        model, shape = create_model("resnet18", num_classes=10, in_channels=3), (3, 32, 32)
    model.train()
    g = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
    images = torch.randn(local_batch, *shape, generator=g)
    labels = torch.randint(0, 10, (local_batch,), generator=g)
    teacher_logits = torch.randn(local_batch, 10, generator=g)
    loss_fn = DistillLoss(ce_weight=1.0, kd_weight=1.0, temperature=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0)

    def step(runtime) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels, teacher_logits)
        runtime.backward_step(loss, [opt], params)

    return params, step


def joint_workload(local_batch: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from joint_overhead import build  # the same cascade as bench/joint_overhead.py

    _, trainer, weight_opt, score_opt, images, labels = build("fmnist_cascade", local_batch)
    for m in trainer.models:
        m.train()
    weights, score_params = trainer.parameters()
    params = [*weights, *score_params]

    def step(runtime) -> None:
        weight_opt.zero_grad(set_to_none=True)
        score_opt.zero_grad(set_to_none=True)
        _, total = trainer.joint_loss(images, labels, runtime)
        runtime.backward_step(total, [weight_opt, score_opt], params)
        trainer.refresh_masks()

    return params, step


def worker(args) -> None:
    from cascadec.train.distributed import init_from_env, shutdown
    from cascadec.train.runtime import Runtime

    torch.set_num_threads(1)
    dist, device = init_from_env(torch.device("cpu"))
    local = args.batch // dist.world_size
    rows = []
    for workload in args.workloads.split(","):
        params, step = joint_workload(local) if workload == "joint" else student_workload(workload, local)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        per_round = max(1, args.steps // args.rounds)
        for r in range(args.rounds):
            names = list(MODES)
            for mode in names[r % len(names) :] + names[: r % len(names)]:  # each mode leads a round in turn
                sync, bucket_mb = MODES[mode]
                runtime = Runtime(device, dist, grad_sync=sync, grad_bucket_mb=bucket_mb)
                with runtime.overlapped_sync(params):
                    for i in range(per_round + (WARMUP if r == 0 else 1) + 1):  # +1: the order-learning step
                        dist.barrier()
                        start = time.perf_counter()
                        step(runtime)
                        elapsed = (time.perf_counter() - start) * 1e3
                        if i > (WARMUP if r == 0 else 1):
                            times[mode].append(elapsed)
                    buckets = len(runtime._sync.buckets) if runtime._sync is not None and runtime._sync.buckets else 1
                times.setdefault("_buckets", {})[mode] = buckets  # type: ignore[index]
        buckets = times.pop("_buckets")
        med = {m: statistics.median(v) for m, v in times.items()}
        rows.append(
            {
                "tag": args.tag,
                "workload": workload,
                "batch": args.batch,
                "ranks": dist.world_size,
                "steps": per_round * args.rounds,
                "grad_mb": sum(p.numel() for p in params) * 4 / 2**20,
                "buckets": buckets,
                "median_ms": med,
                "overlap_vs_after": {m: med[m] / med["after-backward"] - 1 for m in MODES if m != "after-backward"},
            }
        )
        if dist.is_main:
            print(json.dumps(rows[-1]), flush=True)
    if dist.is_main:
        old = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
        keys = {(r["tag"], r["workload"], r["batch"]) for r in rows}
        old = [r for r in old if (r["tag"], r["workload"], r["batch"]) not in keys] + rows
        RESULTS.mkdir(exist_ok=True)
        JSON_PATH.write_text(json.dumps(old, indent=2) + "\n")
        MD_PATH.write_text(render(old))
        print(render(rows))
    shutdown(dist)


def render(rows: list[dict]) -> str:
    lines = [
        "# Overlapped gradient sync vs after-backward averaging (issue 30, item 3)",
        "",
        "`python bench/grad_sync_speed.py --steps N --rounds R --batch B --tag TAG`: median ms per training",
        "step (forward, loss, backward, gradient averaging, optimiser step) on 2 gloo processes of one",
        "thread each, on this machine's 2 CPU cores; `--batch` images per global step. Buckets: how many",
        "the gradients were packed into (DDP's sizes: 1 MB first, then 25 MB; or 1 MB each).",
        "",
        "| tag | workload | batch | gradients MB | buckets 25MB / 1MB | after-backward ms | overlap 25MB ms | "
        "overlap 1MB ms | 25MB vs after | 1MB vs after | control (A/A) vs after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, o, b = r["median_ms"], r["overlap_vs_after"], r["buckets"]
        control = f"{o['control']:+.1%}" if "control" in o else "not run"
        lines.append(
            f"| {r['tag']} | {r['workload']} | {r['batch']} | {r['grad_mb']:.1f} | "
            f"{b['overlap-25MB']} / {b['overlap-1MB']} | {m['after-backward']:.1f} | {m['overlap-25MB']:.1f} | "
            f"{m['overlap-1MB']:.1f} | {o['overlap-25MB']:+.1%} | {o['overlap-1MB']:+.1%} | {control} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tag", default="current")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASCADEC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    cmd += [f"--steps={args.steps}", f"--rounds={args.rounds}", f"--batch={args.batch}", f"--tag={args.tag}"]
    cmd += [f"--workloads={args.workloads}", "--worker"]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
