"""``cascadec report``: runs compared like with like.

Latencies a run stored were measured when it ran: two runs minutes apart on a shared machine
differ by the machine's load as much as by their widths, so a front drawn from them cannot say
which made the difference. Where the runs' ONNX files are here and the backend is ONNX Runtime,
every student is timed again beside its teacher, all in the same interleaved rounds (the
profile protocol's ``profile_interleaved``); otherwise the stored figures are used and the plot
says so. Runs are grouped by what makes accuracies comparable: the data set and the teacher
(model, weights, and the teacher's measured accuracy and FLOPs). Each group gets its own front
and its teacher drawn as the reference point.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascadec.backends import get_backend
from cascadec.errors import UserError, first_line
from cascadec.formatting import as_number
from cascadec.plots import run_label, student_p50
from cascadec.run import RunDir

# backends whose ONNX files `report` can time again here (the others read the stored figures)
RETIMED_BACKENDS = ("onnxruntime", "onnxruntime-cuda")
ROUNDS = 3
SECONDS = 1.0  # per model, over all rounds


@dataclass
class Point:
    """One model on the plot: a run's student, or a group's teacher."""

    label: str
    group: str
    accuracy: float | None
    flops: float | None
    p50_ms: float | None
    dir: str | None = None
    model: str | None = None
    recipe: str | None = None


@dataclass
class Comparison:
    students: list[Point]
    teachers: list[Point]
    backend: str
    batch: int
    source: str  # how the latencies were obtained, said on the plot and under the table
    remeasured: bool
    groups: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "students": [vars(p) for p in self.students],
            "teachers": [vars(p) for p in self.teachers],
            "backend": self.backend,
            "batch": self.batch,
            "source": self.source,
            "remeasured": self.remeasured,
            "groups": self.groups,
        }


@dataclass
class _Run:
    path: Path
    report: dict
    group: str
    weights: str | None


def _load(run_dirs: Sequence[Path]) -> list[_Run]:
    runs = []
    for run_dir in run_dirs:
        run = RunDir.open(Path(run_dir), writable=False)  # reads files only: never waits or locks
        path = run.file("report.json")
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: missing; finish the run (cascadec compress --resume) first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({first_line(exc)})") from None
        try:
            weights = run.recipe().model.weights
        except (UserError, OSError, ValueError):
            weights = None
        info = report.get("run") or {}
        teacher = report.get("teacher") or {}
        accuracy, flops = as_number(teacher.get("accuracy")), as_number(teacher.get("flops"))
        group = " / ".join(
            [
                str(info.get("data", "?")),
                str(info.get("model", "?")),
                f"teacher {Path(str(weights)).name if weights else 'trained in the run'}"
                + (f" ({100 * accuracy:.2f}%" if accuracy is not None else " (")
                + (f", {flops / 1e6:.3g} MMac)" if flops is not None else ")"),
            ]
        )
        runs.append(_Run(Path(run_dir), report, group, weights))
    return runs


def _retime(runs: list[_Run], backend: str, batch: int) -> tuple[dict[str, float], dict[str, float]] | str:
    """Students' and each group's teacher's p50 at ``batch``, all in the same interleaved rounds;
    or why they cannot be timed again here."""
    from cascadec.profile.engines import profile_backend
    from cascadec.profile.protocol import Timing, profile_interleaved

    if backend not in RETIMED_BACKENDS:
        return f"{backend} is not timed again here (only {', '.join(RETIMED_BACKENDS)})"
    files: dict[str, Path] = {}
    for r in runs:
        student = r.path / "student.onnx"
        if not student.is_file():
            return f"{student} is missing"
        files[f"student:{r.path}"] = student
        teacher = r.path / "teacher.onnx"
        if f"teacher:{r.group}" not in files and teacher.is_file():
            files[f"teacher:{r.group}"] = teacher
    try:
        get_backend(backend).require(timing=True)
    except UserError as exc:
        return first_line(exc)

    def profile_one(name: str, share: Timing) -> dict:
        return profile_backend(
            backend,
            onnx_path=files[name],
            input_shape=None,
            batches=[batch],
            timing=share,
            progress=False,
            keep_samples=True,
        )

    timing = Timing(min_duration_s=SECONDS)  # the protocol's warm-up and run count (profile.defaults)
    pooled, _ = profile_interleaved(profile_one, list(files), rounds=ROUNDS, timing=timing)
    p50 = {name: pooled[name][batch]["p50_ms"] for name in files}
    students = {k.split(":", 1)[1]: v for k, v in p50.items() if k.startswith("student:")}
    teachers = {k.split(":", 1)[1]: v for k, v in p50.items() if k.startswith("teacher:")}
    return students, teachers


def compare_runs(
    run_dirs: Sequence[Path], *, backend: str | None = None, batch: int = 1, remeasure: bool = True
) -> Comparison:
    """Every run's student (and each group's teacher) with accuracy, FLOPs and p50 at ``batch``
    on ``backend`` (default: onnxruntime, else the first a run stored), timed again side by side
    where ``remeasure`` allows and the files are here."""
    if not run_dirs:
        raise UserError("cascadec report needs at least one run directory")
    if backend is not None:
        backend = get_backend(backend).name
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserError(f"--batch {batch}: must be a positive integer")
    runs = _load(run_dirs)
    key = str(batch)
    timed: tuple[dict[str, float], dict[str, float]] | str = "--no-remeasure"
    if remeasure:
        timed = _retime(runs, backend or "onnxruntime", batch)
    remeasured = not isinstance(timed, str)
    if remeasured:
        students_ms, teachers_ms = timed
        source = f"re-timed side by side here: {ROUNDS} interleaved rounds, teachers and students alike"
    else:
        students_ms, teachers_ms = {}, {}
        source = f"stored figures, each measured in its own run ({timed}): differences include the machine's load"
    students, teachers, seen = [], [], {}
    for r in runs:
        info = r.report.get("run") or {}
        student = r.report.get("student") or {}
        students.append(
            Point(
                label=run_label(r.report),
                group=r.group,
                accuracy=as_number(student.get("accuracy")),
                flops=as_number(student.get("flops")),
                p50_ms=students_ms.get(str(r.path)) if remeasured else student_p50(r.report, key, backend),
                dir=info.get("dir") or str(r.path),
                model=info.get("model"),
                recipe=info.get("recipe"),
            )
        )
        if r.group not in seen:
            teacher = r.report.get("teacher") or {}
            stored = ((r.report.get("latency") or {}).get(backend or "onnxruntime") or {}).get("teacher") or {}
            seen[r.group] = Point(
                label=f"teacher ({info.get('model', '?')})",
                group=r.group,
                accuracy=as_number(teacher.get("accuracy")),
                flops=as_number(teacher.get("flops")),
                p50_ms=teachers_ms.get(r.group) if remeasured else as_number((stored.get(key) or {}).get("p50_ms")),
                model=info.get("model"),
            )
            teachers.append(seen[r.group])
    return Comparison(
        students=students,
        teachers=teachers,
        backend=backend or "onnxruntime",
        batch=batch,
        source=source,
        remeasured=remeasured,
        groups=list(seen),
    )
