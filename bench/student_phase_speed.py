"""Student-phase speed, masked against shrunk (issue 32, item 1): the demo's cascade
(``fmnist_quick``: ResNet-8, Fashion-MNIST, 2 TAs) with the student phase training the masked
full-width student taught by masked TAs (``train.shrunk_student: false``, the old path) or the
physically shrunk student taught by shrunk TAs (``true``), at 50 % and 75 % fewer FLOPs.

    python bench/student_phase_speed.py [--steps 60] [--targets 0.5 0.75] [--resume]

Each run is ``cascadec compress cifar_resnet8 --recipe fmnist_quick`` with ``--steps`` training
steps per epoch (one joint epoch, three student epochs), no quantize stage and a short profile;
the two layouts run back to back, in alternating order per target. Reported: the student
phase's training images per second (its three epochs pooled: images / seconds of the training
loops, evaluation excluded), the speed-up, and the student's test accuracy under both layouts
(the same function: they should agree up to float rounding). Written after every run:
bench/results/student-phase-speed.{json,md}. Run nothing else on the machine while it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_targets import run_entry, run_lines, save_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "student-phase-speed.json"
MD_PATH = RESULTS / "student-phase-speed.md"
# issue 32: student-phase images/s over the masked path, 1.6x at 50 % and 2.5x at 75 %; 75 % is
# infeasible with the demo's round_to 8 (8 channels per group already cost 25.1 %), so 70 % stands in
GOALS = {"0.5": 1.6, "0.7": 2.5, "0.75": 2.5}


def one_run(target: float, shrunk: bool, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cascadec-sps-") as tmp:
        out = Path(tmp) / "run"
        cmd = [
            "cascadec", "compress", "cifar_resnet8", "--recipe", "fmnist_quick", "--out", str(out),
            "--set", f"prune.target.flops_reduction={target}",
            "--set", f"train.max_steps_per_epoch={steps}",
            "--set", f"train.shrunk_student={'true' if shrunk else 'false'}",
            "--set", "quantize.precision=none",
            "--set", "profile.duration_s=0.2", "--set", "profile.rounds=1", "--set", "profile.batches=[1]",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        m = json.loads((out / "manifest.json").read_text())["metrics"]
    epochs = [e for e in m["prune.history"]["student"] if e["epoch"] >= 0]
    images, seconds = sum(e["images"] for e in epochs), sum(e["seconds"] for e in epochs)
    joint = m["prune.history"]["joint"]
    return {
        "images_per_s": images / seconds,
        "epoch_images_per_s": [e["images_per_s"] for e in epochs],
        "seconds": seconds,
        "joint_images_per_s": joint[0]["images_per_s"] if joint else None,
        "student_accuracy": m["student.accuracy"],
        "selection_accuracies": [e["student_accuracy"] for e in m["prune.history"]["student"]],
        "flops_kept": m["student.flops"] / m["teacher.flops"],
    }


def markdown(data: dict) -> str:
    lines = [
        "# Student phase: masked against shrunk (issue 32, item 1)",
        "",
        "Command: `python bench/student_phase_speed.py` (the script's docstring gives the protocol).",
        "",
        "## Runs",
        "",
        *run_lines(data["runs"]),
        "",
        "Goal (issue 32): 1.6x at 50 % and 2.5x at 75 % fewer FLOPs. 75 % is infeasible with the demo's `round_to: 8` "
        "(8 channels per group already cost 25.1 % of the FLOPs), so 70 % stands in for it and is held to the 75 % goal.",
        "",
        "| FLOPs cut | FLOPs kept | masked images/s | shrunk images/s | speed-up | goal | test accuracy masked / shrunk | selection accuracies masked / shrunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, row in data["results"].items():
        if "masked" not in row or "shrunk" not in row:
            lines.append(f"| {100 * float(target):.0f} % | (unfinished) | | | | | | |")
            continue
        m, s = row["masked"], row["shrunk"]
        speedup = s["images_per_s"] / m["images_per_s"]
        goal = GOALS.get(target)
        verdict = "" if goal is None else (f"met (>= {goal}x)" if speedup >= goal else f"missed ({goal}x)")
        lines.append(
            f"| {100 * float(target):.0f} % | {s['flops_kept']:.3f} | {m['images_per_s']:.0f} | {s['images_per_s']:.0f} | "
            f"{speedup:.2f}x | {verdict} | {100 * m['student_accuracy']:.2f} / {100 * s['student_accuracy']:.2f} % | "
            f"{', '.join(f'{a:.4f}' for a in m['selection_accuracies'])} / "
            f"{', '.join(f'{a:.4f}' for a in s['selection_accuracies'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--targets", nargs="*", type=float, default=[0.5, 0.75])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    data = json.loads(JSON_PATH.read_text()) if args.resume and JSON_PATH.is_file() else {"runs": [], "results": {}}
    data["runs"].append(run_entry(__file__))
    for i, target in enumerate(args.targets):
        row = data["results"].setdefault(str(target), {"steps": args.steps})
        order = ("masked", "shrunk") if i % 2 == 0 else ("shrunk", "masked")
        for layout in order:
            if layout in row:
                continue
            row[layout] = one_run(target, layout == "shrunk", args.steps)
            print(f"{target} {layout}: {row[layout]['images_per_s']:.0f} images/s", flush=True)
            save_results(data, JSON_PATH, MD_PATH, markdown)


if __name__ == "__main__":
    main()
