"""Parity gates: prove a deployed artifact computes what the PyTorch model computes.

Parity is measured on real samples rather than random noise because classifier
logits on noise are near-uniform, so a broken graph can still "agree" on top-1.
Metrics follow Polygraphy's vocabulary and semantics so numbers can be compared with
what TensorRT users already know:

* an element *mismatches* when ``|cand - ref| > atol`` **and** ``|cand - ref| / |ref| > rtol``
  (Polygraphy's default ``elemwise`` check, ``polygraphy/comparator/compare.py``): it passes
  when either tolerance covers it, i.e. ``|cand - ref| <= max(atol, rtol * |ref|)``;
* relative error divides by the reference (PyTorch) with exact zeros nudged by the float64
  machine epsilon, as Polygraphy does;
* the *minimum required tolerance* is reported as Polygraphy prints it, ``abs=max|diff|``
  OR ``rel=max rel`` (each alone would pass), plus the smaller atol (rtol) that passes
  together with the configured rtol (atol).

Tolerances depend on the backend's precision (fp32 tight, fp16/int8 looser); task-level
gates (top-1/top-5 agreement with PyTorch, accuracy drop) decide what matters to a user of
a classifier, which for int8 is mostly those.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec.backends import canonical_name, divergence_device, get_runner
from cascadec.backends.torch_backend import TorchRunner
from cascadec.errors import GateFailed, UserError

_REL_EPS = float(np.finfo(np.float64).eps)  # Polygraphy adds 2.22e-16 to exact zeros of the reference
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
DIVERGENCE_SAMPLES = 4  # the first-divergent-layer search keeps every intermediate in memory: keep the batch small


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
#   weight or op. Top-1 agreement stays the gate's (0.999 by default).
# * fp16: an 11-bit mantissa (eps 9.8e-4) accumulated through a network moves logits by
#   ~1e-3..1e-2, so 1e-2 / 1e-2; a few near-ties may flip, hence top-1 agreement >= 0.99.
# * int8: quantisation noise moves logits by ~0.1..1; the tensor bound only catches garbage
#   (wrong scales, NaNs). An int8 engine is judged by its decisions: top-1 agreement >= 0.97
#   and at most 1 point of accuracy lost (needs labelled samples).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_top1_agreement=0.99),
    "int8": Tolerance(atol=1.0, rtol=0.2, min_top1_agreement=0.97, max_accuracy_drop=0.01),
}


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)


def _top5_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of rows whose top-5 class *sets* match; order inside the top-5 is ignored."""
    ref_top = np.sort(np.argpartition(-ref, 4, axis=1)[:, :5], axis=1)
    cand_top = np.sort(np.argpartition(-cand, 4, axis=1)[:, :5], axis=1)
    return float(np.mean(np.all(ref_top == cand_top, axis=1)))


def tensor_errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise absolute and relative (to the reference) error, Polygraphy's way, in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    absdiff = np.abs(cand - ref)
    denom = np.abs(ref)
    denom = np.where(denom == 0, _REL_EPS, denom)
    with np.errstate(invalid="ignore", divide="ignore"):
        reldiff = absdiff / denom
    return absdiff, reldiff


def mismatches(absdiff: np.ndarray, reldiff: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """Polygraphy ``elemwise``: an element fails when it exceeds *both* tolerances (NaN always fails)."""
    atol = 0.0 if tolerance.atol is None else tolerance.atol
    rtol = 0.0 if tolerance.rtol is None else tolerance.rtol
    return ((absdiff > atol) | np.isnan(absdiff)) & ((reldiff > rtol) | np.isnan(reldiff))


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None,
                    tolerance: Tolerance | None = None) -> dict:
    """Summarise how far ``candidate`` logits are from ``reference`` logits.

    With ``tolerance`` the result also counts mismatched elements and gives the minimum atol
    (rtol) that would pass with the configured rtol (atol). Non-finite values make every
    error metric infinite, so a NaN-producing engine can never pass a gate through NaN
    comparisons evaluating to False.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise UserError(f"output shapes differ: reference {ref.shape} vs candidate {cand.shape}")
    if ref.size == 0:
        raise UserError("no outputs to compare (0 samples)")
    ref2, cand2 = _as_2d(ref), _as_2d(cand)
    nonfinite = int(np.count_nonzero(~np.isfinite(ref2)) + np.count_nonzero(~np.isfinite(cand2)))
    absdiff, reldiff = tensor_errors(ref2, cand2)
    if nonfinite:
        max_abs = mean_abs = max_rel = float("inf")
    else:
        max_abs = float(absdiff.max())
        mean_abs = float(absdiff.mean())
        max_rel = float(reldiff.max())
    ref_top1, cand_top1 = ref2.argmax(axis=1), cand2.argmax(axis=1)
    result: dict = {
        "samples": int(ref2.shape[0]),
        "num_classes": int(ref2.shape[1]),
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "max_rel_diff": max_rel,
        # Polygraphy's "Minimum Required Tolerance: [abs=..] OR [rel=..]": each alone would pass.
        "min_atol_to_pass": max_abs,
        "min_rtol_to_pass": max_rel,
        "top1_agreement": float(np.mean(ref_top1 == cand_top1)),
        "nonfinite": nonfinite,
    }
    if tolerance is not None and tolerance.checks_tensors:
        bad = mismatches(absdiff, reldiff, tolerance)
        atol = 0.0 if tolerance.atol is None else tolerance.atol
        rtol = 0.0 if tolerance.rtol is None else tolerance.rtol
        # with rtol fixed, the elements rtol does not cover need atol >= their |diff| (and vice versa)
        outside_rtol = (reldiff > rtol) | np.isnan(reldiff)
        outside_atol = (absdiff > atol) | np.isnan(absdiff)
        result.update(
            atol=tolerance.atol,
            rtol=tolerance.rtol,
            mismatched_elements=int(np.count_nonzero(bad)),
            total_elements=int(bad.size),
            min_atol_at_rtol=float("inf") if nonfinite else float(absdiff[outside_rtol].max(initial=0.0)),
            min_rtol_at_atol=float("inf") if nonfinite else float(reldiff[outside_atol].max(initial=0.0)),
        )
    if ref2.shape[1] >= 5:
        result["top5_agreement"] = _top5_agreement(ref2, cand2)
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != ref2.shape[0]:
            raise UserError(f"{y.shape[0]} labels for {ref2.shape[0]} outputs")
        result["accuracy"] = float(np.mean(cand_top1 == y))
        result["reference_accuracy"] = float(np.mean(ref_top1 == y))
    return result


def _g(value: float | None) -> str:
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
    min_top1_agreement: float | None = 0.999
    min_top5_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_diff: float | None = None

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

        def fail(metric: str, value: float | None, op: str, threshold: float, required: str | None = None,
                 shown: str | None = None) -> None:
            shown = shown or ("missing" if value is None else f"{value:.6g}")
            required = required or f"{op} {threshold:g}"
            failures.append({"metric": metric, "value": value, "op": op, "threshold": threshold,
                             "precision": precision, "shown": shown, "required": required,
                             "message": f"{metric} = {shown}, required {required}"})

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
                fail("tolerance", result.get("max_abs_diff"), "<=", atol,
                     required=f"|diff| <= atol {_g(tol.atol)} or rel <= rtol {_g(tol.rtol)} per element",
                     shown=f"{count}max abs {result.get('max_abs_diff', float('nan')):.3g}, "
                           f"max rel {result.get('max_rel_diff', float('nan')):.3g}")
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
    def from_recipe(cls, section: object) -> "Gate":
        """The gate a recipe's ``verify`` section describes (cascadec.recipe.VerifySection)."""
        tolerances = dict(DEFAULT_TOLERANCES)
        for precision, tol in (getattr(section, "tolerances", None) or {}).items():
            values = tol.model_dump() if hasattr(tol, "model_dump") else dict(tol)
            tolerances[str(precision)] = Tolerance(**values)
        return cls(
            tolerances=tolerances,
            min_top1_agreement=getattr(section, "min_top1_agreement", 0.999),
            min_top5_agreement=getattr(section, "min_top5_agreement", None),
            max_accuracy_drop=getattr(section, "max_accuracy_drop", None),
            max_abs_diff=getattr(section, "max_abs_diff", None),
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "tolerances": {p: asdict(t) for p, t in self.tolerances.items()}}


def _to_numpy(a: object) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _batches(source: object, samples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (inputs, labels|None) batches from arrays, a Dataset or a DataLoader-like iterable."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        source = (source, None)
    if isinstance(source, tuple) and len(source) == 2 and not isinstance(source[0], (tuple, list)):
        x = _to_numpy(source[0])
        y = None if source[1] is None else _to_numpy(source[1])
        n = min(samples, len(x))
        for i in range(0, n, batch_size):
            yield x[i : min(i + batch_size, n)], None if y is None else y[i : min(i + batch_size, n)]
        return
    if isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        source = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False)
    if not isinstance(source, Iterable):
        raise UserError(f"cannot read samples from {type(source).__name__}; pass arrays, a Dataset or a DataLoader")
    seen = 0
    for item in source:
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        x = _to_numpy(x)
        y = None if y is None else _to_numpy(y)
        take = min(len(x), samples - seen)
        yield x[:take], None if y is None else y[:take]
        seen += take
        if seen >= samples:
            return


def verify_backends(
    model: nn.Module,
    onnx_path: str | os.PathLike[str] | None,
    loader_or_arrays: object,
    backends: Sequence[str] = ("onnxruntime",),
    gate: Gate | None = None,
    samples: int = 1000,
    progress: bool = True,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    engine_path: str | os.PathLike[str] | None = None,
    find_divergence: bool = True,
) -> dict:
    """Run PyTorch (reference) and each backend (candidate) on the same real samples.

    Outputs are compared once all samples ran, so the metrics describe the whole
    set rather than an average of per-batch maxima. Each backend is held to the
    tolerances of its precision (``runner.precision``; fp32 when a runner has none).
    When a backend fails the tensor check and the ONNX file is known, the first ONNX
    node whose output diverges is searched on the first few samples
    (:mod:`cascadec.divergence`) and stored as ``first_divergence``.

    Returns ``{"samples", "torch_accuracy", "gate", "backends": {name: result}}`` where
    each result carries ``precision``, ``thresholds``, ``passed`` and ``failures``. Never
    raises on a failed gate: call :func:`raise_on_failure` when failing is wanted.
    """
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    gate = gate or Gate()
    names = list(dict.fromkeys(canonical_name(b) for b in backends))
    reference = TorchRunner(model, device=device)
    runners = {n: get_runner(n, onnx_path=onnx_path, model=model, device=device, engine_path=engine_path) for n in names}
    precisions = {n: str(getattr(r, "precision", "fp32")) for n, r in runners.items()}
    for precision in precisions.values():
        gate.tolerance(precision)  # an unknown precision is refused before minutes of inference
    outputs: dict[str, list[np.ndarray]] = {"__ref__": [], **{n: [] for n in names}}
    labels: list[np.ndarray] = []
    have_labels = True
    probe: list[np.ndarray] = []  # the first samples, kept for the first-divergent-layer search

    columns = (TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("verify", total=samples)
        for x, y in _batches(loader_or_arrays, samples, batch_size):
            if len(x) == 0:
                continue
            x = np.ascontiguousarray(x, dtype=np.float32)
            if sum(len(p) for p in probe) < DIVERGENCE_SAMPLES:
                probe.append(x[: DIVERGENCE_SAMPLES - sum(len(p) for p in probe)])
            outputs["__ref__"].append(reference(x))
            for n, runner in runners.items():
                outputs[n].append(_run_within_profile(runner, x))
            if y is None:
                have_labels = False
            else:
                labels.append(np.asarray(y).reshape(-1))
            bar.advance(task, len(x))
    if not outputs["__ref__"]:
        raise UserError("no samples to verify: the data source is empty")

    ref = np.concatenate(outputs["__ref__"])
    y_all = np.concatenate(labels) if have_labels and labels else None
    torch_accuracy = None if y_all is None else float(np.mean(_as_2d(ref).argmax(axis=1) == y_all))
    results: dict[str, dict] = {}
    for n in names:
        precision = precisions[n]
        tolerance = gate.tolerance(precision)
        result = compare_outputs(ref, np.concatenate(outputs[n]), y_all, tolerance=tolerance)
        failures = gate.check(result, precision)
        result.update(backend=n, precision=precision, thresholds=gate.thresholds(precision),
                      passed=not failures, failures=failures)
        tensor_failed = any(f["metric"] in ("tolerance", "max_abs_diff", "nonfinite") for f in failures)
        if find_divergence and tensor_failed and onnx_path is not None and n != "torch":
            result["first_divergence"] = _first_divergence(model, onnx_path, np.concatenate(probe), n, tolerance)
        if tensor_failed and n != "torch":
            x_probe = np.concatenate(probe)
            result["conditioning"] = conditioning(model, x_probe, ref[: len(x_probe)],
                                                  np.concatenate(outputs[n])[: len(x_probe)], tolerance)
        results[n] = result
    return {"samples": int(ref.shape[0]), "torch_accuracy": torch_accuracy, "gate": gate.as_dict(), "backends": results}


verify_run = verify_backends  # the name docs/architecture.md uses


def _run_within_profile(runner: object, x: np.ndarray) -> np.ndarray:
    """Run ``x`` in pieces a TensorRT engine's optimisation profile accepts.

    The data loader's batch size is not the engine's: chunks are cut at the profile's
    largest batch and a short last chunk is padded (repeating its last image) up to the
    smallest, then the padding's outputs are dropped.
    """
    low, high = getattr(runner, "batch_range", (1, len(x)))
    if low <= len(x) <= high:
        return runner(x)  # type: ignore[operator]
    pieces = []
    for start in range(0, len(x), high):
        chunk = x[start:start + high]
        n = len(chunk)
        if n < low:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - n, axis=0)])
        pieces.append(runner(chunk)[:n])  # type: ignore[operator]
    return np.concatenate(pieces)


def conditioning(model: nn.Module, x: np.ndarray, reference: np.ndarray, candidate: np.ndarray,
                 tolerance: Tolerance) -> dict:
    """Is the tensor gate failing on the backend, or on the network's own float32 arithmetic?

    Some networks amplify rounding so much (random or badly calibrated BatchNorm statistics,
    huge logits) that PyTorch in float32 is itself far from the exact result; no float32
    backend can then meet a tight tolerance against PyTorch, and the failure says nothing
    about the export. Running PyTorch once more in float64 on the probe samples tells the two
    apart: ``ill_conditioned`` when PyTorch's own float32 error already exceeds the tolerance
    and the candidate is no further from float64 than twice that. Reported, never raised:
    the gate's verdict stands and this only explains it."""
    try:
        exact_model = copy.deepcopy(model).to("cpu", torch.float64).eval()
        with torch.inference_mode():
            out = exact_model(torch.from_numpy(np.asarray(x, dtype=np.float64)))
        exact = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not turn a gate failure (exit 3) into a crash
        first = str(exc).splitlines()[0] if str(exc) else ""
        return {"error": f"float64 reference failed: {type(exc).__name__}: {first}"[:300]}
    if exact.shape != reference.shape or exact.shape != candidate.shape:
        return {"error": f"float64 output shape {exact.shape} differs from {reference.shape}"}
    torch_error = float(np.abs(reference.astype(np.float64) - exact).max(initial=0.0))
    candidate_error = float(np.abs(candidate.astype(np.float64) - exact).max(initial=0.0))
    atol = tolerance.atol or 0.0
    ill = bool(np.isfinite(candidate_error) and torch_error > atol and candidate_error <= 2 * torch_error)
    return {"samples": int(len(x)), "torch_fp32_vs_fp64": torch_error, "candidate_vs_fp64": candidate_error,
            "ill_conditioned": ill}


def conditioning_verdict(backend: str, found: Mapping | None) -> str | None:
    """Whether the failure is the network's float32 arithmetic or the backend, in words."""
    if not isinstance(found, Mapping):
        return None
    if found.get("error"):
        return f"not checked: {found['error']}"
    torch_error, candidate_error = found.get("torch_fp32_vs_fp64"), found.get("candidate_vs_fp64")
    head = (f"on {found.get('samples')} samples PyTorch float32 is {torch_error:.3g} from "
            f"PyTorch float64 and {backend} is {candidate_error:.3g}")
    if found.get("ill_conditioned"):
        return head + ": the network amplifies float32 rounding beyond the tolerance (ill-conditioned), the backend is not the cause"
    return head + f": {backend} itself departs from the exact result"


def describe_conditioning(backend: str, found: Mapping | None) -> str | None:
    """The verdict as a line under the failure table."""
    verdict = conditioning_verdict(backend, found)
    return None if verdict is None else f"conditioning ({backend}): {verdict}"


def _first_divergence(model: nn.Module, onnx_path: str | os.PathLike[str], x: np.ndarray, backend: str,
                      tolerance: Tolerance) -> dict:
    """Where the graph leaves PyTorch; a failed search is reported, never raised, because
    the gate result it explains is already known and must still reach the report."""
    from cascadec.divergence import find_first_divergence

    try:
        found = find_first_divergence(model, onnx_path, x, device=divergence_device(backend), tolerance=tolerance)
    except UserError as exc:
        return {"node": None, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not turn a gate failure (exit 3) into a crash
        first = str(exc).splitlines()[0] if str(exc) else ""
        return {"node": None, "error": f"search failed: {type(exc).__name__}: {first}"[:300]}
    return found or {"node": None, "error": f"no ONNX node exceeded the tolerance on the first {len(x)} samples"}


def failure_rows(results: dict) -> list[dict]:
    """One row per violated threshold, across backends: what the failure table prints."""
    per_backend = results.get("backends", results)
    rows = []
    for name, result in per_backend.items():
        if isinstance(result, dict):
            precision = result.get("precision", "fp32")
            rows += [{"backend": name, "precision": precision, **f} for f in result.get("failures", [])]
    return rows


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    table = [tuple(header), *[tuple(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]


def describe_divergence(backend: str, found: Mapping | None) -> str | None:
    """One line naming the first divergent layer, or why none was named."""
    if not isinstance(found, Mapping):
        return None
    if not found.get("node"):
        return f"first divergent layer ({backend}): not found: {found.get('error', 'unknown')}"
    module = found.get("torch_module")
    where = f", torch module {module}" if module else ""
    tol = found.get("tolerance") or {}
    return (f"first divergent layer ({backend}): ONNX node {found['node']!r} ({found.get('op_type')}{where}) "
            f"output {found.get('output')!r}: max|diff| {found.get('max_abs_diff', float('nan')):.3g} vs "
            f"{found.get('reference')} on {found.get('device')}, tolerance atol {_g(tol.get('atol'))} rtol {_g(tol.get('rtol'))}")


def raise_on_failure(results: dict) -> None:
    """Raise :class:`GateFailed` with a plain-text table (backend, precision, metric, value,
    required) and the first divergent layer of each failed backend, when any gate failed."""
    rows = failure_rows(results)
    if not rows:
        return
    header = ("backend", "precision", "metric", "value", "required")
    cells = [
        (r["backend"], r["precision"], r["metric"],
         r.get("shown") or ("missing" if r["value"] is None else f"{r['value']:.6g}"),
         r.get("required") or f"{r['op']} {r['threshold']:g}")
        for r in rows
    ]
    lines = _text_table(header, cells)
    failed = sorted({r["backend"] for r in rows})
    per_backend = results.get("backends", results)
    for name in failed:
        for line in (describe_divergence(name, (per_backend.get(name) or {}).get("first_divergence")),
                     describe_conditioning(name, (per_backend.get(name) or {}).get("conditioning"))):
            if line:
                lines.append(line)
    raise GateFailed(f"parity gate failed for {', '.join(failed)}:\n" + "\n".join(lines), failures=rows)
