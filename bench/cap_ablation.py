#!/usr/bin/env python
"""CaP's selection, ablated (issue 14): re-scoring steps and error-per-cost ranking.

The Fashion-MNIST teacher of bench/quality.py (``builtin:cifar_resnet8_fmnist``) is pruned
retrain-free by CaP (prune/cap.py) to each FLOPs target, for each number of selection steps,
with scores per unit of cost (the default) and by error alone (the paper), and with three
calibration draws (seeds). Each student is compensated, its BatchNorm statistics re-estimated
on the calibration images, physically shrunk and evaluated on the full 10k test split.

    python bench/cap_ablation.py                        # -> bench/results/cap-ablation.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the benchmark's teacher, data and recipes)

from cascadec.data import build_data  # noqa: E402
from cascadec.data.loaders import make_loaders  # noqa: E402
from cascadec.envinfo import environment  # noqa: E402
from cascadec.prune.analysis import analyse  # noqa: E402
from cascadec.prune.cap import calibration_loader, compensated_student, select_cap  # noqa: E402
from cascadec.prune.compensate import find_consumers, gather_statistics  # noqa: E402
from cascadec.prune.cost import count_macs  # noqa: E402
from cascadec.prune.masks import ChannelMasks  # noqa: E402
from cascadec.prune.shrink import shrink  # noqa: E402
from cascadec.train.bn import recalibrate_batchnorm  # noqa: E402
from cascadec.train.loop import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "cap-ablation"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = copy.deepcopy(quality.PROFILES["converge"])
    bundle = build_data(quality.DATASET, train_limit=cfg["train_limit"], val_limit=None, seed=quality.DATA_SEED)
    example = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
    teacher, _ = quality.get_teacher(cfg, "converge", bundle, device, example, weights="builtin:cifar_resnet8_fmnist")
    teacher_macs = count_macs(copy.deepcopy(teacher), example)
    command = "python bench/cap_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for target in args.targets:
        for seed in args.seeds:
            recipe = quality.build_recipe(cfg, method="cap", target=target, seed=seed)
            loaders = make_loaders(bundle, recipe, device)
            analysis = analyse(teacher, recipe, example)
            calibration = calibration_loader(loaders.train.dataset, recipe)
            consumers = find_consumers(teacher, analysis.index)
            stats = gather_statistics(teacher, consumers, calibration, device, seed=seed)
            for steps in args.steps:
                for per_cost in (True, False):
                    start = time.perf_counter()
                    keep, _ = select_cap(
                        teacher,
                        analysis,
                        consumers,
                        stats,
                        steps=steps,
                        ridge=recipe.prune.compensation.ridge,
                        per_cost=per_cost,
                    )
                    seconds = time.perf_counter() - start
                    student = copy.deepcopy(teacher)
                    compensated_student(
                        student, teacher, consumers, keep, calibration, recipe, device, analysis.example, stats=stats
                    )
                    hooks = ChannelMasks(student, analysis.index).install()
                    hooks.set(keep)
                    recalibrate_batchnorm(student, calibration, device=device, limit=len(calibration))
                    hooks.remove()
                    small = shrink(student, analysis.index, keep, example)
                    accuracy = evaluate(small, loaders.val, device=device)
                    row = {
                        "target": target,
                        "seed": seed,
                        "steps": steps,
                        "per_cost": per_cost,
                        "accuracy": accuracy,
                        "flops_fraction": count_macs(small, example) / teacher_macs,
                        "selection_seconds": seconds,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            write(args.out, rows, command, args)
    write(args.out, rows, command, args, finished=True)
    return 0


def write(stem: str, rows: list[dict], command: str, args, finished: bool = False) -> None:
    doc = {
        "command": command,
        "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "finished": finished,
        "environment": environment(),
        "rows": rows,
    }
    Path(stem + ".json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [
        "# CaP selection ablation: re-scoring steps, and error per unit of cost vs error alone",
        "",
        f"Generated {doc['updated']} by `{command}`"
        + ("" if finished else " (**partial: the run had not finished when this was written**)")
        + ". Teacher `builtin:cifar_resnet8_fmnist` (92.34 %), no training: CaP with 1,024 calibration "
        "images (draw = seed), BatchNorm statistics re-estimated on them, shrunk, full 10k test split.",
        "",
        "| FLOPs reduction | steps | ranking | accuracy (%) mean ± std | min-max | seeds | selection s |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["target"], r["steps"], r["per_cost"]) for r in rows}, key=lambda k: (k[0], k[1], not k[2]))
    for target, steps, per_cost in keys:
        rs = [r for r in rows if (r["target"], r["steps"], r["per_cost"]) == (target, steps, per_cost)]
        accs = [100 * r["accuracy"] for r in rs]
        std = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        lines.append(
            f"| {target:.2f} | {steps} | {'error / cost saved' if per_cost else 'error alone (paper)'} | "
            f"{statistics.fmean(accs):.2f}{std} | {min(accs):.2f}-{max(accs):.2f} | {len(rs)} | "
            f"{statistics.fmean(r['selection_seconds'] for r in rs):.2f} |"
        )
    Path(stem + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
