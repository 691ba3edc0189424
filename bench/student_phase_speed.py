"""Student-phase speed (issue 32, item 1, and the teacher-logit table): the masked full-width
student (``train.shrunk_student: false``, the path before issue 32), the physically shrunk one
(``true``), and the shrunk one reading the teacher's logits from a table computed once
(``train.cache_teacher_logits: true``, cascadec.distill.logit_cache), at 50 % and 70 % fewer FLOPs.

    python bench/student_phase_speed.py [--recipe fmnist_quick] [--epochs 3] [--steps N] [--targets 0.5 0.7] [--resume]

Each run is ``cascadec compress cifar_resnet8 --recipe RECIPE`` with ``--epochs`` student epochs
(all 55,000 training images each, unless ``--steps`` caps them: the table is built only when the
epochs ahead show the teacher more images than one pass, so capped runs show no table), no
quantize stage and a short profile; the layouts run back to back, their order rotating per target.
Reported: the student phase's training images per second (its epochs pooled: images / seconds of
the training loops plus the seconds the table took, evaluation excluded), the speed-up over the
masked path, and the student's test accuracy under each (the same function: they agree up to float
rounding). Written after every run: bench/results/student-phase-speed.{json,md} (rows of an earlier
protocol are kept under their own heading). Run nothing else on the machine while it runs.
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


LAYOUTS = {  # name: (train.shrunk_student, train.cache_teacher_logits)
    "masked": (False, False),
    "shrunk": (True, False),
    "cached": (True, True),
}


def one_run(recipe: str, target: float, layout: str, epochs: int, steps: int | None) -> dict:
    shrunk, cached = LAYOUTS[layout]
    with tempfile.TemporaryDirectory(prefix="cascadec-sps-") as tmp:
        out = Path(tmp) / "run"
        cmd = [
            "cascadec", "compress", "cifar_resnet8", "--recipe", recipe, "--out", str(out),
            "--set", f"prune.target.flops_reduction={target}",
            "--set", f"train.student_epochs={epochs}",
            "--set", f"train.shrunk_student={'true' if shrunk else 'false'}",
            "--set", f"train.cache_teacher_logits={'true' if cached else 'false'}",
            "--set", "quantize.precision=none",
            "--set", "profile.duration_s=0.2", "--set", "profile.rounds=1", "--set", "profile.batches=[1]",
        ]  # fmt: skip
        if steps:
            cmd += ["--set", f"train.max_steps_per_epoch={steps}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        m = json.loads((out / "manifest.json").read_text())["metrics"]
    history = m["prune.history"]
    phase = history.get("student") or history.get("fine_tune")
    epochs_run = [e for e in phase if e["epoch"] >= 0]
    images = sum(e["images"] for e in epochs_run)
    table = sum(e.get("teacher_logits_seconds", 0.0) for e in epochs_run)
    seconds = sum(e["seconds"] for e in epochs_run) + table
    joint = history.get("joint")
    return {
        "images_per_s": images / seconds,
        "epoch_images_per_s": [e["images_per_s"] for e in epochs_run],
        "seconds": seconds,
        "table_seconds": table,
        "joint_images_per_s": joint[0]["images_per_s"] if joint else None,
        "student_accuracy": m["student.accuracy"],
        "selection_accuracies": [e["student_accuracy"] for e in phase],
        "flops_kept": m["student.flops"] / m["teacher.flops"],
    }


def _old_rows(data: dict) -> list[str]:
    """Rows of the first protocol (issue 32 item 1, before the logit table): keys are bare targets."""
    rows = []
    for target, row in data["results"].items():
        if ":" in target or "masked" not in row or "shrunk" not in row:
            continue
        m, s = row["masked"], row["shrunk"]
        speedup = s["images_per_s"] / m["images_per_s"]
        rows.append(
            f"| {100 * float(target):.0f} % | {s['flops_kept']:.3f} | {m['images_per_s']:.0f} | {s['images_per_s']:.0f} | "
            f"{speedup:.2f}x | {100 * m['student_accuracy']:.2f} / {100 * s['student_accuracy']:.2f} % |"
        )
    return rows


def markdown(data: dict) -> str:
    lines = [
        "# Student phase: masked, shrunk, and shrunk with the teacher's logits computed once (issue 32)",
        "",
        "Command: `python bench/student_phase_speed.py` (the script's docstring gives the protocol).",
        "",
        "## Runs",
        "",
        *run_lines(data["runs"]),
        "",
        "Goal (issue 32): student-phase images/s 1.6x the masked path's at 50 % and 2.5x at 75 % fewer FLOPs. 75 % is "
        "infeasible with the demo's `round_to: 8` (8 channels per group already cost 25.1 % of the FLOPs), so 70 % "
        "stands in for it and is held to the 75 % goal. Images/s of the cached layout count the seconds its table "
        "took.",
        "",
        "| recipe | FLOPs cut | FLOPs kept | epochs | masked images/s | shrunk images/s | shrunk + table images/s "
        "(table s) | speed-up shrunk / + table | goal | test accuracy masked / shrunk / + table |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in data["results"].items():
        if ":" not in key:
            continue
        recipe, target = key.split(":")
        if not all(layout in row for layout in LAYOUTS):
            lines.append(f"| {recipe} | {100 * float(target):.0f} % | (unfinished) | | | | | | | |")
            continue
        m, s, c = row["masked"], row["shrunk"], row["cached"]
        goal = GOALS.get(target)
        best = c["images_per_s"] / m["images_per_s"]
        verdict = "" if goal is None else (f"met (>= {goal}x)" if best >= goal else f"missed ({goal}x)")
        lines.append(
            f"| {recipe} | {100 * float(target):.0f} % | {s['flops_kept']:.3f} | {row['epochs']} | "
            f"{m['images_per_s']:.0f} | {s['images_per_s']:.0f} | {c['images_per_s']:.0f} ({c['table_seconds']:.0f} s) | "
            f"{s['images_per_s'] / m['images_per_s']:.2f}x / **{best:.2f}x** | {verdict} | "
            f"{100 * m['student_accuracy']:.2f} / {100 * s['student_accuracy']:.2f} / {100 * c['student_accuracy']:.2f} % |"
        )
    old = _old_rows(data)
    if old:
        lines += [
            "",
            "## Earlier protocol: masked against shrunk only",
            "",
            "The demo's cascade as it was then (`fmnist_quick` with 2 TAs, one joint + three student epochs of 60 steps "
            "each), `python bench/student_phase_speed.py --steps 60` at commit bda38e1+dirty (see Runs).",
            "",
            "| FLOPs cut | FLOPs kept | masked images/s | shrunk images/s | speed-up | test accuracy masked / shrunk |",
            "|---|---|---|---|---|---|",
            *old,
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist_quick")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--targets", nargs="*", type=float, default=[0.5, 0.7])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    data = json.loads(JSON_PATH.read_text()) if args.resume and JSON_PATH.is_file() else {"runs": [], "results": {}}
    data["runs"].append(run_entry(__file__))
    names = list(LAYOUTS)
    for i, target in enumerate(args.targets):
        row = data["results"].setdefault(f"{args.recipe}:{target}", {"epochs": args.epochs, "steps": args.steps})
        for layout in names[i % 3 :] + names[: i % 3]:  # rotate the order per target
            if layout in row:
                continue
            row[layout] = one_run(args.recipe, target, layout, args.epochs, args.steps)
            print(f"{args.recipe} {target} {layout}: {row[layout]['images_per_s']:.0f} images/s", flush=True)
            save_results(data, JSON_PATH, MD_PATH, markdown)


if __name__ == "__main__":
    main()
