#!/usr/bin/env python
"""One pruning run with recipe overrides, for ablations of the cascade (issue 10).

    python bench/cascade_ablation.py --tag new_2ta_75 --set cascade.num_tas=2 prune.target.flops_reduction=0.75 prune.round_to=null

Base recipe: Fashion-MNIST ResNet-8, 12,000 training images (the selection split held out),
2 joint + 3 student epochs, lr 0.01, cascade with 1 TA, 50 % fewer FLOPs, round_to 8; every
``--set key=value`` overrides it as on the command line. The student is shrunk and measured on
the full 10k test split; one JSON line per run is appended to ``--out``
(bench/results/cascade-ablation.jsonl) with the ladder, the per-epoch curves and the seconds.
Runs one thread (``--threads``), so that it can run beside other work on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cascadec.data import build_data
from cascadec.data.loaders import make_loaders
from cascadec.models import create_model
from cascadec.prune.methods import prune_model
from cascadec.prune.shrink import shrink
from cascadec.recipe import Recipe, parse_override
from cascadec.train.loop import evaluate

BASE = {
    "name": "ablation",
    "model": {"name": "cifar_resnet8", "weights": "builtin:cifar_resnet8_fmnist"},
    "data": {"name": "fashion_mnist", "train_limit": 12000, "batch_size": 128},
    "prune": {"method": "cascade", "round_to": 8, "target": {"flops_reduction": 0.5}},
    "cascade": {"num_tas": 1},
    "train": {"joint_epochs": 2, "student_epochs": 3, "lr": 0.01},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="builtin:cifar_resnet8_fmnist", help="model.weights of the teacher")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides, key.sub=value")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cascade-ablation.jsonl"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.loads(json.dumps(BASE))
    spec["model"]["weights"] = args.teacher
    for item in args.set:
        keys, value = parse_override(item)
        node = spec
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    recipe = Recipe.model_validate(spec)
    cpu = torch.device("cpu")
    d = recipe.data
    bundle = build_data(d.name, train_limit=d.train_limit, selection_size=d.selection_size, seed=0)
    teacher = create_model(recipe.model.name, weights=args.teacher, num_classes=10, in_channels=1).eval()
    torch.manual_seed(recipe.train.seed)
    loaders = make_loaders(bundle, recipe, cpu)
    teacher_acc = evaluate(teacher, loaders.val, device=cpu)
    example = torch.zeros(1, 1, 28, 28)
    start = time.perf_counter()
    result = prune_model(teacher, recipe, loaders.train, loaders.selection, example, cpu)
    seconds = time.perf_counter() - start
    student = shrink(result.student.cpu(), result.analysis.index, result.mask, example)
    accuracy = evaluate(student, loaders.val, device=cpu)
    h = result.history
    record = {
        "tag": args.tag,
        "set": args.set,
        "teacher": args.teacher,
        "teacher_test": teacher_acc,
        "student_test": accuracy,
        "delta": 100 * (accuracy - teacher_acc),
        "seconds": seconds,
        "ladder": h.get("ladder"),
        "joint": [
            {k: e.get(k) for k in ("accuracies", "mask_changes", "losses", "frozen")} for e in h.get("joint", [])
        ],
        "student": [
            {k: e.get(k) for k in ("epoch", "teacher", "student_accuracy", "kept")}
            for e in (h.get("student") or h.get("fine_tune") or [])
        ],
    }
    print(json.dumps(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
