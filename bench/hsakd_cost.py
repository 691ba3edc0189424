"""What an HSAKD step costs next to a KL step, on this machine (issue 14, part 2).

    python bench/hsakd_cost.py [--steps 8] [--rounds 3] [--threads 2]

The quality benchmark's cascade (ResNet-8 on Fashion-MNIST-shaped 28x28 batches of 128, 2 TAs,
50 % fewer FLOPs): one joint step (forward of the teacher and the three models, backward,
optimiser step) with ``distill.method: kl`` and with ``hsakd``, timed in alternating rounds so
that machine drift hits both alike; the same for a student-phase step (the student and its
teacher). Weights and heads are untrained (cost does not depend on them). Results:
bench/results/hsakd-cost-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the quality benchmark's recipe)

from cascadec.distill.hints import stage_points  # noqa: E402
from cascadec.distill.hsakd import AuxNetwork, HsakdLoss, HsakdSpec, HsakdWeights, make_heads  # noqa: E402
from cascadec.distill.losses import DistillLoss  # noqa: E402
from cascadec.envinfo import environment  # noqa: E402
from cascadec.models import create_model  # noqa: E402
from cascadec.prune.analysis import analyse  # noqa: E402
from cascadec.prune.cascade import CascadeTrainer  # noqa: E402
from cascadec.run import git_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", weights="builtin:cifar_resnet8_fmnist", num_classes=10, in_channels=1)
    teacher.eval()
    recipe = quality.build_recipe(quality.PROFILES["converge"], method="cascade_2ta", target=0.5, seed=0)
    example = torch.zeros(1, 1, 28, 28)
    analysis = analyse(teacher, recipe, example)
    points = stage_points(teacher, example)
    spec = HsakdSpec(points, make_heads(teacher, points, example, 10).eval(), HsakdWeights(), 10, {})
    images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    loss = DistillLoss()
    trainers = {}
    for name, hsakd in (("kl", None), ("hsakd", spec)):
        t = CascadeTrainer(
            copy.deepcopy(teacher),
            teacher,
            analysis.index,
            analysis.solver,
            analysis.budget,
            torch.ones(analysis.index.num_units),
            num_tas=2,
            ta_ratios=None,
            cascade_update=True,
            loss=loss,
            device=CPU,
            hsakd=hsakd,
        )
        weights, scores = t.parameters()
        t.freeze()  # fixed masks: the timed step is the weights' step
        trainers[name] = (t, torch.optim.SGD(weights, lr=1e-3, momentum=0.9))
    student = copy.deepcopy(teacher).train()
    heads = make_heads(teacher, points, example, 10)

    def kl_student_loss():
        with torch.no_grad():  # as train_epoch runs the teacher
            t_logits = teacher(images)
        return loss(plain(images), labels, t_logits)

    plain = copy.deepcopy(teacher).train()  # no tap on it: the KL step pays for nothing of HSAKD's
    student_steps = {"kl": (plain, kl_student_loss)}
    wrapped, teaching = AuxNetwork(student, heads, points), AuxNetwork(teacher, spec.teacher_heads, points).eval()
    hsakd_loss = HsakdLoss(wrapped, teaching, HsakdWeights())

    def hsakd_student_loss():
        with torch.no_grad():
            t_logits = teaching(images)
        return hsakd_loss(wrapped(images), labels, t_logits)

    student_steps["hsakd"] = (wrapped, hsakd_student_loss)
    student_opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3) for n, (m, _) in student_steps.items()}
    joint: dict[str, list[float]] = {"kl": [], "hsakd": []}
    single: dict[str, list[float]] = {"kl": [], "hsakd": []}
    for _ in range(args.rounds):
        for name, (trainer, opt) in trainers.items():
            trainer.joint_step(images, labels)  # warm-up
            opt.zero_grad()
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                trainer.joint_step(images, labels)
                opt.step()
            joint[name].append((time.perf_counter() - start) / args.steps)
        for name, (_, step_loss) in student_steps.items():
            opt = student_opts[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                step_loss().backward()
                opt.step()
            single[name].append((time.perf_counter() - start) / args.steps)
    rows = []
    for phase, times in (("joint step (teacher + student + 2 TAs)", joint), ("student-phase step", single)):
        kl, hs = statistics.median(times["kl"]), statistics.median(times["hsakd"])
        rows.append(
            {
                "phase": phase,
                "kl_seconds": kl,
                "hsakd_seconds": hs,
                "ratio": hs / kl,
                "kl_rounds": times["kl"],
                "hsakd_rounds": times["hsakd"],
            }
        )
        print(f"{phase}: KL {kl * 1e3:.0f} ms, HSAKD {hs * 1e3:.0f} ms ({hs / kl:.2f}x)", flush=True)
    head_params = sum(q.numel() for q in heads.parameters())
    doc = {
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "environment": environment(),
        "threads": args.threads,
        "batch": 128,
        "head_params_per_model": head_params,
        "network_params": sum(q.numel() for q in teacher.parameters()),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hsakd-cost-cpu.json").write_text(json.dumps(doc, indent=2))
    env = doc["environment"]
    lines = [
        "# HSAKD vs KL: seconds per training step on this CPU",
        "",
        f"Command: `{doc['command']}` (commit {doc['commit']}); CPU: {env.get('cpu')}, {env.get('logical_cores')} "
        f"logical cores, {args.threads} torch thread(s); ResNet-8, batches of 128 28x28 images; median of "
        f"{args.rounds} alternating rounds of {args.steps} steps. Heads: {head_params:,} parameters per model "
        f"(the network: {doc['network_params']:,}).",
        "",
        "| step | KL s/step | HSAKD s/step | HSAKD / KL |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['kl_seconds']:.3f} | {r['hsakd_seconds']:.3f} | {r['ratio']:.2f}x |")
    (RESULTS / "hsakd-cost-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
