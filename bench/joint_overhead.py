"""The joint phase's overhead (issue 32, item 2): what a cascade step costs beyond a plain
forward/backward of the same models.

    python bench/joint_overhead.py [--recipe fmnist_cascade] [--steps 30] [--rounds 3] [--batch 128] [--threads 1] [--tag NAME]

The cascade of ``--recipe`` (ResNet-8 on Fashion-MNIST's 1x28x28 geometry, its TAs, round_to
and FLOPs target; random images, since only time is measured) runs its joint step as
``CascadeTrainer.joint_epoch`` does, beside two references, each timed per step over ``--steps``
steps in ``--rounds`` interleaved rounds (5 warm-up steps first, 1 per later round):

* ``plain``: the same models (student and TAs, hooks removed) and the teacher, forward, the
  same KD losses, backward, the weights' optimiser step: what any multi-model KD step costs;
* ``joint``: the cascade's step with the masks moving (straight-through mask vectors built in
  the hooks, scores' backward and optimiser step, ``refresh_masks`` solving every model's
  mask from its scores);
* ``solve``: ``refresh_masks`` alone (inside ``joint``);
* ``frozen``: the cascade's step after the masks are fixed (the last ``freeze_fraction``).

Reported: median milliseconds per step and each part's overhead over ``plain``. Rows are
appended to bench/results/joint-overhead.{json,md} under ``--tag`` (the code state measured).
Run nothing else on the machine while it runs.
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

from cascadec.models import create_model
from cascadec.prune.analysis import analyse
from cascadec.prune.cascade import CascadeTrainer
from cascadec.prune.methods import distill_loss
from cascadec.prune.scores import make_score_optimizer
from cascadec.recipe import load_recipe
from cascadec.train.loop import make_optimizer
from cascadec.train.runtime import Runtime

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "joint-overhead.json"
MD_PATH = RESULTS / "joint-overhead.md"
WARMUP = 5


def build(recipe_name: str, batch: int):
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    example = torch.randn(1, 1, 28, 28)
    analysis = analyse(teacher, recipe, example)
    scores = torch.rand(analysis.index.num_units) + 0.1
    c, t = recipe.cascade, recipe.train
    trainer = CascadeTrainer(
        copy.deepcopy(teacher),
        teacher,
        analysis.index,
        analysis.solver,
        analysis.budget,
        scores,
        num_tas=c.num_tas,
        ta_ratios=c.ta_ratios,
        cascade_update=c.cascade_update,
        loss=distill_loss(recipe),
        device=torch.device("cpu"),
    )
    weights, score_params = trainer.parameters()
    weight_opt = make_optimizer(weights, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=0.0)
    score_opt = make_score_optimizer(score_params, signal=c.score_signal, optimizer=c.score_optimizer, lr=c.score_lr)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return recipe, trainer, weight_opt, score_opt, images, labels


def timed(fn, steps: int, warmup: int = WARMUP) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def measure(recipe_name: str, steps: int, batch: int, rounds: int) -> dict:
    """The three steps in interleaved rounds (``steps / rounds`` each per round), so a change in
    the machine's speed falls on all of them alike."""
    recipe, trainer, weight_opt, score_opt, images, labels = build(recipe_name, batch)
    runtime = Runtime(torch.device("cpu"))
    weights, score_params = trainer.parameters()
    for m in trainer.models:
        m.train()
    solve_ms: list[float] = []

    def joint_step() -> None:
        weight_opt.zero_grad(set_to_none=True)
        if score_opt is not None:
            score_opt.zero_grad(set_to_none=True)
        _, total = trainer.joint_loss(images, labels, runtime)
        runtime.backward_step(total, [weight_opt, score_opt], [*weights, *score_params])
        start = time.perf_counter()
        trainer.refresh_masks()
        solve_ms.append((time.perf_counter() - start) * 1e3)

    def frozen_step() -> None:
        weight_opt.zero_grad(set_to_none=True)
        _, total = trainer.joint_loss(images, labels, runtime)
        runtime.backward_step(total, [weight_opt], weights)

    def plain_step() -> None:  # the same models with no hooks: forward, the same losses, backward, step
        weight_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            upper = trainer.teacher(images)
        total = 0.0
        for j in reversed(range(len(trainer.models))):
            logits = trainer.models[j](images)
            total = total + trainer.loss(logits.float(), labels, upper.float())
            upper = logits.detach()
        runtime.backward_step(total, [weight_opt], weights)

    times: dict[str, list[float]] = {"joint": [], "frozen": [], "plain": []}
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        warm = WARMUP if r == 0 else 1
        trainer.frozen = False
        solve_ms.clear()
        times["joint"] += timed(joint_step, per_round, warm)
        times.setdefault("solve", []).extend(solve_ms[warm:])
        trainer.frozen = True  # fixed masks, as after the freeze (no score gradient)
        times["frozen"] += timed(frozen_step, per_round, warm)
        for masks in trainer.masks:
            masks.remove()
        times["plain"] += timed(plain_step, per_round, warm)
        for masks in trainer.masks:
            masks.install()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "recipe": recipe_name,
        "models": len(trainer.models),
        "units": trainer.index.num_units,
        "batch": batch,
        "steps": per_round * rounds,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "median_ms": med,
        "overhead_over_plain": {k: med[k] / med["plain"] - 1 for k in ("joint", "frozen")},
        "solve_share_of_joint": med["solve"] / med["joint"],
    }


def render(rows: list[dict]) -> str:
    lines = [
        "# The joint phase's overhead (issue 32, item 2)",
        "",
        "`python bench/joint_overhead.py --recipe RECIPE --steps N --batch B --threads T --tag TAG`: median ms per",
        "step on this CPU (random 1x28x28 images; only time is measured). `plain`: the same models and the",
        "teacher with no mask hooks, the same KD losses, backward and the weights' step. `joint`: the cascade's",
        "step while masks move (mask hooks, scores' backward and step, every model's mask re-solved); `solve`:",
        "the re-solve alone, inside `joint`; `frozen`: the cascade's step once masks are fixed.",
        "",
        "| tag | recipe | models | batch | threads | plain | joint | solve | frozen | joint over plain | frozen over plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, o = r["median_ms"], r["overhead_over_plain"]
        lines.append(
            f"| {r['tag']} | {r['recipe']} | {r['models']} | {r['batch']} | {r['threads']} | {m['plain']:.1f} | "
            f"{m['joint']:.1f} | {m['solve']:.1f} | {m['frozen']:.1f} | {o['joint']:+.0%} | {o['frozen']:+.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="fmnist_cascade")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="current")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    row = {"tag": args.tag, **measure(args.recipe, args.steps, args.batch, args.rounds)}
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    rows = [r for r in rows if (r["tag"], r["recipe"], r["batch"]) != (row["tag"], row["recipe"], row["batch"])]
    rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    JSON_PATH.write_text(json.dumps(rows, indent=2) + "\n")
    MD_PATH.write_text(render(rows))
    print(render([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
