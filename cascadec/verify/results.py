"""Typed parity results, so the CLI, the stage and the report read fields instead of
filtering dict keys by hand. ``to_dict`` gives the manifest/report.json form (a fixed
contract, docs/run-directory.md), ``from_dict`` reads it back (a resumed run re-raises a failed gate from
what the manifest recorded)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TENSOR_METRICS = ("tolerance", "max_abs_diff", "nonfinite")  # failures a graph diagnosis can explain


@dataclass
class BackendParity:
    """One backend against PyTorch: the comparison numbers (``metrics``, see
    :func:`cascadec.verify.compare.compare_outputs`), the thresholds of its precision, the
    failures (one dict per violated threshold) and, for a failed tensor check, the diagnosis."""

    backend: str
    precision: str
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    failures: list[dict] = field(default_factory=list)
    first_divergence: dict | None = None
    conditioning: dict | None = None
    # an ill-conditioned network's backend judged against PyTorch float64 (diagnose.float64_judgement);
    # when present, ``failures`` are the ones that stood against float64
    float64_judgement: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def tensor_failed(self) -> bool:
        return any(f["metric"] in TENSOR_METRICS for f in self.failures)

    def to_dict(self) -> dict[str, Any]:
        out = {
            **self.metrics,
            "backend": self.backend,
            "precision": self.precision,
            "thresholds": self.thresholds,
            "passed": self.passed,
            "failures": self.failures,
        }
        if self.first_divergence is not None:
            out["first_divergence"] = self.first_divergence
        if self.conditioning is not None:
            out["conditioning"] = self.conditioning
        if self.float64_judgement is not None:
            out["float64_judgement"] = self.float64_judgement
        return out

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> BackendParity:
        own = {
            "backend",
            "precision",
            "thresholds",
            "passed",
            "failures",
            "first_divergence",
            "conditioning",
            "float64_judgement",
        }
        return cls(
            backend=str(data.get("backend", name)),
            precision=str(data.get("precision", "fp32")),
            metrics={k: v for k, v in data.items() if k not in own},
            thresholds=dict(data.get("thresholds") or {}),
            failures=list(data.get("failures") or []),
            first_divergence=data.get("first_divergence"),
            conditioning=data.get("conditioning"),
            float64_judgement=data.get("float64_judgement"),
        )


@dataclass
class ParityResult:
    """Every backend checked on the same ``samples`` real images (``torch_accuracy``: the
    PyTorch reference's accuracy on them, when they were labelled)."""

    samples: int
    torch_accuracy: float | None
    gate: dict[str, Any]
    backends: dict[str, BackendParity]
    nonfinite_weights: list[str] = field(default_factory=list)  # the reference itself is broken: named first

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends.values())

    @property
    def failed(self) -> list[str]:
        return sorted(name for name, b in self.backends.items() if not b.passed)

    def failure_rows(self) -> list[dict]:
        """One row per violated threshold, across backends: what the failure table prints."""
        return [
            {"backend": name, "precision": b.precision, **f} for name, b in self.backends.items() for f in b.failures
        ]

    def merged_over(self, earlier: ParityResult | None) -> ParityResult:
        """This result with the backends of ``earlier`` it did not check kept (verifying one
        backend keeps the other backends' last results in the report)."""
        kept = dict(earlier.backends) if earlier is not None else {}
        return ParityResult(
            self.samples, self.torch_accuracy, self.gate, {**kept, **self.backends}, self.nonfinite_weights
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "samples": self.samples,
            "torch_accuracy": self.torch_accuracy,
            "gate": self.gate,
            "backends": {name: b.to_dict() for name, b in self.backends.items()},
        }
        if self.nonfinite_weights:
            out["nonfinite_weights"] = self.nonfinite_weights
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParityResult:
        backends = data.get("backends") or {}
        return cls(
            samples=int(data.get("samples") or 0),
            torch_accuracy=data.get("torch_accuracy"),
            gate=dict(data.get("gate") or {}),
            backends={
                str(n): BackendParity.from_dict(str(n), r) for n, r in backends.items() if isinstance(r, Mapping)
            },
            nonfinite_weights=list(data.get("nonfinite_weights") or []),
        )
