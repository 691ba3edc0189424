"""Hold a latency target to what the backend measures, not only to what the table predicts.

The table (``prune/latency_table.py``) times layers alone; the network they make is off from the
sum by a few per cent either way, and the solver, ranking by the table's per-layer costs, leans
on exactly the layers whose alone-time flatters them: on this CPU table-only students miss by up
to 7 % on ResNet-50 and 27 % on MobileNetV2 (bench/results/latency-targets-cpu.md), enough to
miss a 10 % gate. So once the mask is about to be final (one-shot: at the solve; the cascade:
when the masks freeze), the student it gives is shrunk, exported and timed against the unpruned
network in interleaved rounds, and the budget is rescaled by the error (or interpolated between
two tries on either side of the target) and solved again, a few times: the table still decides
which channels go, the backend decides how many.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cascadec.backends import get_backend
from cascadec.errors import UserError
from cascadec.prune.groups import GroupIndex
from cascadec.prune.targets import Budget, MaskSolver

# a measured speed-up this close to the target ends the refinement (below the rounds' spread)
CLOSE_ENOUGH = 0.02


class SpeedupMeter:
    """Measured speed-up of the network a mask leaves over the unpruned one, on the latency
    table's backend and batch: both exported as ``export`` exports them and timed in alternation
    (``profile_interleaved``), the ratio of pooled medians. ``precision`` int8: the student is
    quantized as the quantize stage's ONNX Runtime flavour and timed against the FP32 network,
    the speed-up an INT8 target names (``deployed_speedup``); ``speedup`` is it times ``scale``
    (the INT8 table's unpruned INT8 over FP32 latency), the terms the table's budget is in, so
    the refinement holds the deployed speed-up to the target whatever error that ratio has."""

    def __init__(
        self,
        model: nn.Module,
        index: GroupIndex,
        example_input: torch.Tensor,
        *,
        backend: str,
        batch: int,
        threads: int | None,
        rounds: int = 3,
        seconds: float = 1.0,
        precision: str = "fp32",
        scale: float = 1.0,
    ) -> None:
        from cascadec.prune.latency_table import export_eval

        self.model, self.index = model, index
        self.example = example_input.detach()[:1].clone().cpu()
        self.device = get_backend(backend).device
        self.batch, self.threads, self.rounds, self.seconds = batch, threads, rounds, seconds
        self.precision, self.scale = precision, scale
        self._tmp = tempfile.TemporaryDirectory(prefix="cascadec-refine-")
        self.dir = Path(self._tmp.name)
        export_eval(model, self.example, self.dir / "full.onnx")
        self.calls = 0

    def _quantized(self, path: Path) -> None:
        """In place: the student at ``path`` as the precision it ships in."""
        if self.precision == "int8":
            from cascadec.quantize.ptq import int8_for_timing

            int8 = int8_for_timing(path, path.with_suffix(".int8.onnx"), tuple(self.example.shape), preprocess=True)
            int8.replace(path)

    def __call__(self, keep: torch.Tensor) -> float:
        return self.measure(keep)["speedup"]

    def measure(self, keep: torch.Tensor) -> dict[str, Any]:
        """The network ``keep`` leaves, shrunk, exported and timed (``compare``)."""
        from cascadec.backends.onnx_export import export_onnx
        from cascadec.prune.shrink import shrink

        self.calls += 1
        student = shrink(self.model, self.index, keep.detach().cpu(), self.example)
        path = self.dir / f"student-{self.calls}.onnx"
        export_onnx(student, self.example, path)
        try:
            self._quantized(path)
            return self.compare(path)
        finally:
            path.unlink(missing_ok=True)

    def compare(self, student: Path) -> dict[str, Any]:
        """An exported student against the unpruned network: both pooled p50s, the speed-up and
        its value in each round."""
        from cascadec.profile.engines import profile_onnx
        from cascadec.profile.protocol import Timing, profile_interleaved

        files = {"full": self.dir / "full.onnx", "student": Path(student)}
        shape = list(self.example.shape[1:])

        def profile_one(which: str, share: Timing) -> dict:
            return profile_onnx(
                files[which],
                shape,
                [self.batch],
                device=self.device,
                timing=share,
                threads=self.threads,
                progress=False,
                keep_samples=True,
            )

        timing = Timing(min_duration_s=self.seconds)
        pooled, ratios = profile_interleaved(profile_one, ["full", "student"], rounds=self.rounds, timing=timing)
        full_ms, student_ms = pooled["full"][self.batch]["p50_ms"], pooled["student"][self.batch]["p50_ms"]
        return {
            "full_ms": full_ms,
            "student_ms": student_ms,
            "speedup": full_ms / student_ms * self.scale,
            "deployed_speedup": full_ms / student_ms,
            "speedup_rounds": ratios["student"][self.batch],
        }

    def close(self) -> None:
        self._tmp.cleanup()


@dataclass
class Refined:
    """The mask to keep, the budget that gave it, and every try (for the manifest)."""

    keep: torch.Tensor
    budget: Budget
    history: list[dict[str, Any]]


# solves allowed, as a multiple of the measurements: a budget that lands on a network measured
# already moves on without timing it again, so a coarse network does not spend its measurements
# on repeats, and this bounds the solves that cost no measurement
SOLVES_PER_MEASUREMENT = 4


def _next_fraction(points: list[tuple[float, float]], budget: Budget) -> float:
    """The next budget fraction from (budget fraction, measured latency fraction) pairs so far.
    Once two tries bracket the asked latency fraction: linear between the nearest pair on either
    side (the response is not proportional: a ranking that follows the table's per-layer costs
    can overshoot 1.4x on the first try, and rescaling by the ratio alone then oscillates).
    Before that: the latest budget scaled by the measured error (damped past 1.5x either way:
    one noisy round)."""
    goal = budget.keep_fraction
    slower = [p for p in points if p[1] > goal]
    faster = [p for p in points if p[1] <= goal]
    if slower and faster:
        # nearest on either side; on a tie (one network reached from two budgets) the budget
        # nearer the other side, so the next step moves past it
        (f0, y0), (f1, y1) = max(faster, key=lambda p: (p[1], p[0])), min(slower, key=lambda p: (p[1], -p[0]))
        return min(1.0, max(0.0, f0 + (goal - y0) * (f1 - f0) / (y1 - y0)))
    fraction, measured = points[-1]
    ratio = max(2 / 3, min(1.5, measured / goal))
    return min(1.0, fraction / ratio)


def refine_latency_mask(
    solver: MaskSolver,
    scores: torch.Tensor,
    budget: Budget,
    measure: Callable[[torch.Tensor], float],
    *,
    rounds: int,
    ceiling: float | None = None,
) -> Refined:
    """Solve, measure, move the budget (``_next_fraction``: rescaled by the measured error, or
    interpolated once two tries bracket the target), solve again: at most ``rounds``
    measurements, none spent on a network measured already. Keeps the try whose measured
    speed-up is nearest the target among those that reach it within ``CLOSE_ENOUGH`` (else the
    nearest overall): a student a little faster than asked beats one that fails the gate."""
    target = 1.0 / budget.keep_fraction
    latency = solver.cost.latency
    current = budget
    tries: list[tuple[torch.Tensor, Budget, dict[str, Any]]] = []
    points: list[tuple[float, float]] = []  # (budget fraction, measured latency fraction), solves too
    for _ in range(SOLVES_PER_MEASUREMENT * max(1, rounds)):
        try:
            keep = solver.solve(scores, current)
        except UserError:  # a rescaled budget below the narrowest network: keep what was measured
            if not tries:
                raise
            break
        same = next((t for t in tries if torch.equal(keep, t[0])), None)
        if same is not None:  # a network measured already: its measurement again, no timing
            points.append((current.keep_fraction, 1.0 / same[2]["measured_speedup"]))
        else:
            if len(tries) >= max(1, rounds):
                break
            measured = float(measure(keep))
            entry = {
                "budget_fraction": current.keep_fraction,
                "predicted_speedup": latency.base_ms / latency.predict(keep) if latency is not None else None,
                "measured_speedup": measured,
            }
            tries.append((keep, current, entry))
            points.append((current.keep_fraction, 1.0 / measured))
            if abs(measured / target - 1.0) <= CLOSE_ENOUGH:
                break
        fraction = _next_fraction(points, budget)
        if ceiling is not None:  # a budget past it would need units an earlier step removed (CaP)
            fraction = min(fraction, ceiling)
        if abs(fraction - current.keep_fraction) < 1e-6:
            break
        current = budget.scaled(fraction, solver.cost)
    reaching = [t for t in tries if t[2]["measured_speedup"] >= target * (1 - CLOSE_ENOUGH)]
    pool = reaching or tries
    keep, chosen, _ = min(pool, key=lambda t: abs(t[2]["measured_speedup"] - target))
    for t in tries:
        t[2]["chosen"] = t[1] is chosen
    return Refined(keep, chosen, [t[2] for t in tries])
