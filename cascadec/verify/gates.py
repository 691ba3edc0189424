"""Parity policy: the tolerances and task-level thresholds a backend must meet.

Tolerances depend on the backend's precision (fp32 tight, fp16/int8 looser); task-level
gates (top-1/top-5 agreement with PyTorch, accuracy drop) decide what matters to a user of
a classifier, which for int8 is mostly those. This module imports neither torch nor rich,
so the recipe schema can read the defaults without pulling in the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from cascadec.errors import UserError

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "int8")
# the gate's defaults, one home: cascadec.recipe.VerifySection takes them from here
DEFAULT_MIN_TOP1_AGREEMENT = 0.999
DEFAULT_ILL_CONDITIONED = "float64"


@dataclass(frozen=True)
class Tolerance:
    """Tensor tolerances of one precision, plus optional task-level gates that override the gate's.

    ``atol``/``rtol`` of ``None`` count as 0 when the other is set; both ``None`` disable
    the tensor check (the task-level gates still apply).
    """

    atol: float | None
    rtol: float | None
    min_top1_agreement: float | None = None
    min_top5_agreement: float | None = None
    max_accuracy_drop: float | None = None

    @property
    def checks_tensors(self) -> bool:
        return self.atol is not None or self.rtol is not None


# Why these numbers:
# * fp32: reordered sums (other conv algorithms, BatchNorm folded into conv) move logits of
#   magnitude ~10 by 1e-6..1e-5; atol 1e-4 / rtol 1e-3 leaves headroom yet catches a wrong
#   weight or op. Top-1 agreement stays the gate's (DEFAULT_MIN_TOP1_AGREEMENT).
# * fp16: an 11-bit mantissa (eps 9.8e-4) moves logits by about 1e-3 of their scale: rounding
#   the demo student's weights to fp16 alone (cascadec quantize, logits up to ~20) moved them by
#   up to 0.028, so atol 5e-2 / rtol 1e-2 (1e-2 failed every network with logits past ~10); a
#   few near-ties may flip, hence top-1 agreement >= 0.99.
# * tf32: float32 tensors whose convolutions and matmuls multiply with a 10-bit mantissa, FP16's
#   precision in FP32's range: ONNX Runtime's TensorRT provider computes an fp32 graph that way
#   (TensorRT turns TF32 on by default and the provider has no option to turn it off), so it is
#   gated as its own precision with FP16's bounds. Not measured on a GPU here.
# * int8: quantisation moves logits by a few percent of their range, on every logit at once: a
#   CaP + KD student's INT8 files (cascadec quantize, logits up to ~20) differed by up to 2.2 on
#   5 of 5120 logits with 99.4 % top-1 agreement and 0.16 points of test accuracy lost, which the
#   old element bound (atol 1.0 / rtol 0.2) failed. No element bound separates that from garbage,
#   so an int8 file is judged by its decisions alone: top-1 agreement >= 0.97 and at most 1 point
#   of accuracy lost (needs labelled samples); NaN/inf outputs fail whatever the tolerances.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "tf32": Tolerance(atol=5e-2, rtol=1e-2, min_top1_agreement=0.99),
    "fp16": Tolerance(atol=5e-2, rtol=1e-2, min_top1_agreement=0.99),
    "int8": Tolerance(atol=None, rtol=None, min_top1_agreement=0.97, max_accuracy_drop=0.01),
}


def fmt_tolerance(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet; ``None`` disables a check.

    ``tolerances`` holds one :class:`Tolerance` per precision; a backend is checked against
    the entry of its own precision. Task-level thresholds here apply to every precision
    unless that precision's entry sets its own. ``max_abs_diff`` is the pre-tolerance
    recipe key, kept so older recipes mean what they said: a hard cap on max |diff| for
    fp32 backends, checked in addition to the tolerances.
    """

    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    min_top1_agreement: float | None = DEFAULT_MIN_TOP1_AGREEMENT
    min_top5_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_diff: float | None = None
    # a backend of a network whose own float32 output is further from float64 than the tolerance:
    # "float64" judges it against PyTorch float64 (no worse than PyTorch float32), "fail": the gate stands
    ill_conditioned: str = DEFAULT_ILL_CONDITIONED

    def tolerance(self, precision: str) -> Tolerance:
        if precision not in self.tolerances:
            known = ", ".join(self.tolerances)
            raise UserError(f"no parity tolerances for precision {precision!r} (verify.tolerances has {known})")
        return self.tolerances[precision]

    def thresholds(self, precision: str = "fp32") -> dict:
        """The thresholds that apply to a backend of ``precision``, for the report."""
        tol = self.tolerance(precision)

        def pick(own: float | None, shared: float | None) -> float | None:
            return shared if own is None else own

        return {
            "precision": precision,
            "atol": tol.atol,
            "rtol": tol.rtol,
            "min_top1_agreement": pick(tol.min_top1_agreement, self.min_top1_agreement),
            "min_top5_agreement": pick(tol.min_top5_agreement, self.min_top5_agreement),
            "max_accuracy_drop": pick(tol.max_accuracy_drop, self.max_accuracy_drop),
            "max_abs_diff": self.max_abs_diff if precision == "fp32" else None,
        }

    def check(self, result: dict, precision: str = "fp32") -> list[dict]:
        """Return one failure dict per violated threshold (empty list: passed).

        Each failure has ``metric``, ``value``, ``op``, ``threshold``, ``message`` and the
        ``shown``/``required`` strings the failure table prints.
        """
        limits = self.thresholds(precision)
        failures: list[dict] = []

        def fail(
            metric: str,
            value: float | None,
            op: str,
            threshold: float,
            required: str | None = None,
            shown: str | None = None,
        ) -> None:
            shown = shown or ("missing" if value is None else f"{value:.6g}")
            required = required or f"{op} {threshold:g}"
            failures.append(
                {
                    "metric": metric,
                    "value": value,
                    "op": op,
                    "threshold": threshold,
                    "precision": precision,
                    "shown": shown,
                    "required": required,
                    "message": f"{metric} = {shown}, required {required}",
                }
            )

        if result.get("nonfinite"):
            fail("nonfinite", float(result["nonfinite"]), "==", 0)
        tol = self.tolerance(precision)
        if tol.checks_tensors:
            atol = 0.0 if tol.atol is None else tol.atol
            rtol = 0.0 if tol.rtol is None else tol.rtol
            if "mismatched_elements" in result and result.get("atol") == tol.atol and result.get("rtol") == tol.rtol:
                bad = result["mismatched_elements"] > 0
                count = f"{result['mismatched_elements']} of {result['total_elements']} elements outside; "
            else:  # compared without these tolerances: Polygraphy's stricter "max" statistic
                max_abs, max_rel = result.get("max_abs_diff"), result.get("max_rel_diff")
                bad = max_abs is None or max_rel is None or (not max_abs <= atol and not max_rel <= rtol)
                count = ""
            if bad:
                fail(
                    "tolerance",
                    result.get("max_abs_diff"),
                    "<=",
                    atol,
                    required=f"|diff| <= atol {fmt_tolerance(tol.atol)} or rel <= rtol {fmt_tolerance(tol.rtol)} per element",
                    shown=f"{count}max abs {result.get('max_abs_diff', float('nan')):.3g}, "
                    f"max rel {result.get('max_rel_diff', float('nan')):.3g}",
                )
        if limits["max_abs_diff"] is not None:
            v = result.get("max_abs_diff")
            if v is None or not v <= limits["max_abs_diff"]:
                fail("max_abs_diff", v, "<=", limits["max_abs_diff"])
        if limits["min_top1_agreement"] is not None:
            v = result.get("top1_agreement")
            if v is None or not v >= limits["min_top1_agreement"]:
                fail("top1_agreement", v, ">=", limits["min_top1_agreement"])
        if limits["min_top5_agreement"] is not None and "top5_agreement" in result:
            v = result["top5_agreement"]
            if not v >= limits["min_top5_agreement"]:
                fail("top5_agreement", v, ">=", limits["min_top5_agreement"])
        if limits["max_accuracy_drop"] is not None and "accuracy" in result:
            drop = result["reference_accuracy"] - result["accuracy"]
            if not drop <= limits["max_accuracy_drop"]:
                fail("accuracy_drop", drop, "<=", limits["max_accuracy_drop"])
        return failures

    @classmethod
    def from_recipe(cls, section: object) -> Gate:
        """The gate a recipe's ``verify`` section describes (cascadec.recipe.VerifySection)."""
        tolerances = dict(DEFAULT_TOLERANCES)
        for precision, tol in (getattr(section, "tolerances", None) or {}).items():
            values = tol.model_dump() if hasattr(tol, "model_dump") else dict(tol)
            tolerances[str(precision)] = Tolerance(**values)
        return cls(
            tolerances=tolerances,
            min_top1_agreement=getattr(section, "min_top1_agreement", DEFAULT_MIN_TOP1_AGREEMENT),
            min_top5_agreement=getattr(section, "min_top5_agreement", None),
            max_accuracy_drop=getattr(section, "max_accuracy_drop", None),
            max_abs_diff=getattr(section, "max_abs_diff", None),
            ill_conditioned=getattr(section, "ill_conditioned", DEFAULT_ILL_CONDITIONED),
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "tolerances": {p: asdict(t) for p, t in self.tolerances.items()}}
