"""What the profile stage measured, as a type: :class:`ProfileResult` beside ``ParityResult``.

The manifest's ``latency.<backend>`` node keeps its layout (one entry per network timed, keyed by
batch, then the speed-ups, the per-round ratios, the protocol); this module is the one place that
reads it apart, so the report, its renderer and the CLI take the networks, the rounds and the
protocol from a ``ProfileResult`` instead of filtering keys by name, and the speed-ups are computed
from the timings rather than stored and re-derived. It imports neither torch nor rich.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROUNDS_SUFFIX = "_speedup_rounds"  # <name>_speedup_rounds: the method's networks timed beside the student
_NOT_MODELS = ("protocol", "note", "speedup", "speedup_rounds")


def compare(teacher_prof: Mapping, student_prof: Mapping) -> dict[int, float]:
    """Per-batch speed-up, teacher p50 / student p50, over the batches both profiles have.

    Keys may be ints (fresh profiles) or strings (profiles read back from report.json).
    """
    teacher = {int(k): v for k, v in teacher_prof.items() if str(k).isdigit()}
    student = {int(k): v for k, v in student_prof.items() if str(k).isdigit()}
    speedups: dict[int, float] = {}
    for b in sorted(teacher.keys() & student.keys()):
        t, s = teacher[b].get("p50_ms"), student[b].get("p50_ms")
        if t is not None and s:
            speedups[b] = float(t) / float(s)
    return speedups


@dataclass
class ProfileResult:
    """One backend's interleaved timing of a run's networks.

    ``models``: network name (teacher, student, a method's extra network) -> batch (a string, as
    in JSON) -> statistics (``p50_ms``, ...). ``rounds``: network name -> batch -> the teacher's
    time over that network's in each round (the spread of the speed-up)."""

    backend: str
    models: dict[str, dict[str, dict[str, Any]]]
    rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    protocol: dict[str, Any] | None = None
    note: str | None = None

    def speedup_of(self, name: str) -> dict[str, float]:
        """Teacher p50 over ``name``'s p50 per batch; empty without a teacher."""
        if "teacher" not in self.models or name not in self.models:
            return {}
        return {str(b): s for b, s in compare(self.models["teacher"], self.models[name]).items()}

    @property
    def speedup(self) -> dict[str, float]:
        return self.speedup_of("student")

    def timings(self) -> dict[str, Any]:
        """The networks' statistics with the protocol and note: report.json's ``latency.<backend>``."""
        return self._layout(with_speedups=False)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``latency.<backend>`` (the layout runs have always had)."""
        return self._layout(with_speedups=True)

    def _layout(self, *, with_speedups: bool) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.models)
        if with_speedups and "teacher" in self.models:
            out["speedup"] = self.speedup
            out["speedup_rounds"] = self.rounds.get("student", {})
            for name, per_batch in self.rounds.items():
                if name != "student":
                    out[f"{name}{ROUNDS_SUFFIX}"] = per_batch
        if self.protocol is not None:
            out["protocol"] = self.protocol
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, backend: str, data: Mapping[str, Any]) -> ProfileResult:
        """Read a ``latency.<backend>`` node back (any run's: stored speed-ups are recomputed)."""
        models = {
            k: dict(v)
            for k, v in data.items()
            if isinstance(v, Mapping) and k not in _NOT_MODELS and not k.endswith(ROUNDS_SUFFIX)
        }
        rounds = {"student": dict(data["speedup_rounds"])} if isinstance(data.get("speedup_rounds"), Mapping) else {}
        for k, v in data.items():
            if k.endswith(ROUNDS_SUFFIX) and isinstance(v, Mapping):
                rounds[k.removesuffix(ROUNDS_SUFFIX)] = dict(v)
        protocol = data.get("protocol")
        return cls(
            backend=backend,
            models=models,
            rounds=rounds,
            protocol=dict(protocol) if isinstance(protocol, Mapping) else None,
            note=data.get("note"),
        )
