"""Parity gates: prove a deployed artifact computes what the PyTorch model computes.

Parity is measured on real samples rather than random noise because classifier
logits on noise are near-uniform, so a broken graph can still "agree" on top-1.
Metrics follow Polygraphy's vocabulary (abs/rel error, minimum tolerance that
would pass) so numbers can be compared with what TensorRT users already know.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec.backends import canonical_name, get_runner
from cascadec.backends.torch_backend import TorchRunner
from cascadec.errors import GateFailed, UserError

_REL_EPS = 1e-12  # guards division by an exactly-zero reference; Polygraphy does the same


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)


def _top5_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of rows whose top-5 class *sets* match; order inside the top-5 is ignored."""
    ref_top = np.sort(np.argpartition(-ref, 4, axis=1)[:, :5], axis=1)
    cand_top = np.sort(np.argpartition(-cand, 4, axis=1)[:, :5], axis=1)
    return float(np.mean(np.all(ref_top == cand_top, axis=1)))


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Summarise how far ``candidate`` logits are from ``reference`` logits.

    Non-finite values make every error metric infinite, so a NaN-producing engine
    can never pass a gate through NaN comparisons evaluating to False.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise UserError(f"output shapes differ: reference {ref.shape} vs candidate {cand.shape}")
    if ref.size == 0:
        raise UserError("no outputs to compare (0 samples)")
    ref2, cand2 = _as_2d(ref), _as_2d(cand)
    nonfinite = int(np.count_nonzero(~np.isfinite(ref2)) + np.count_nonzero(~np.isfinite(cand2)))
    if nonfinite:
        max_abs = mean_abs = max_rel = float("inf")
    else:
        absdiff = np.abs(ref2 - cand2)
        max_abs = float(absdiff.max())
        mean_abs = float(absdiff.mean())
        max_rel = float((absdiff / np.maximum(np.abs(ref2), _REL_EPS)).max())
    ref_top1, cand_top1 = ref2.argmax(axis=1), cand2.argmax(axis=1)
    result: dict = {
        "samples": int(ref2.shape[0]),
        "num_classes": int(ref2.shape[1]),
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "max_rel_diff": max_rel,
        # Polygraphy's "minimum required tolerance": the atol (rtol=0) / rtol (atol=0) that would pass.
        "min_atol_to_pass": max_abs,
        "min_rtol_to_pass": max_rel,
        "top1_agreement": float(np.mean(ref_top1 == cand_top1)),
        "nonfinite": nonfinite,
    }
    if ref2.shape[1] >= 5:
        result["top5_agreement"] = _top5_agreement(ref2, cand2)
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != ref2.shape[0]:
            raise UserError(f"{y.shape[0]} labels for {ref2.shape[0]} outputs")
        result["accuracy"] = float(np.mean(cand_top1 == y))
        result["reference_accuracy"] = float(np.mean(ref_top1 == y))
    return result


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet; ``None`` disables a check."""

    max_abs_diff: float | None = 1e-4
    min_top1_agreement: float | None = 0.999
    min_top5_agreement: float | None = None
    max_accuracy_drop: float | None = None  # reference accuracy minus candidate accuracy, as a fraction

    def check(self, result: dict) -> list[dict]:
        """Return one failure dict per violated threshold (empty list: passed)."""
        failures: list[dict] = []

        def fail(metric: str, value: float | None, op: str, threshold: float) -> None:
            shown = "missing" if value is None else f"{value:.6g}"
            failures.append({
                "metric": metric,
                "value": value,
                "op": op,
                "threshold": threshold,
                "message": f"{metric} = {shown}, required {op} {threshold:g}",
            })

        if result.get("nonfinite"):
            fail("nonfinite", float(result["nonfinite"]), "==", 0)
        if self.max_abs_diff is not None:
            v = result.get("max_abs_diff")
            if v is None or not v <= self.max_abs_diff:
                fail("max_abs_diff", v, "<=", self.max_abs_diff)
        if self.min_top1_agreement is not None:
            v = result.get("top1_agreement")
            if v is None or not v >= self.min_top1_agreement:
                fail("top1_agreement", v, ">=", self.min_top1_agreement)
        if self.min_top5_agreement is not None and "top5_agreement" in result:
            v = result["top5_agreement"]
            if not v >= self.min_top5_agreement:
                fail("top5_agreement", v, ">=", self.min_top5_agreement)
        if self.max_accuracy_drop is not None and "accuracy" in result:
            drop = result["reference_accuracy"] - result["accuracy"]
            if not drop <= self.max_accuracy_drop:
                fail("accuracy_drop", drop, "<=", self.max_accuracy_drop)
        return failures


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
) -> dict:
    """Run PyTorch (reference) and each backend (candidate) on the same real samples.

    Outputs are compared once all samples ran, so the metrics describe the whole
    set rather than an average of per-batch maxima. Returns
    ``{"samples", "torch_accuracy", "gate", "backends": {name: result}}`` where each
    result carries ``passed`` and ``failures``. Never raises on a failed gate:
    call :func:`raise_on_failure` when failing is wanted.
    """
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    gate = gate or Gate()
    names = list(dict.fromkeys(canonical_name(b) for b in backends))
    reference = TorchRunner(model, device=device)
    runners = {n: get_runner(n, onnx_path=onnx_path, model=model, device=device) for n in names}
    outputs: dict[str, list[np.ndarray]] = {"__ref__": [], **{n: [] for n in names}}
    labels: list[np.ndarray] = []
    have_labels = True

    columns = (TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("verify", total=samples)
        for x, y in _batches(loader_or_arrays, samples, batch_size):
            if len(x) == 0:
                continue
            x = np.ascontiguousarray(x, dtype=np.float32)
            outputs["__ref__"].append(reference(x))
            for n, runner in runners.items():
                outputs[n].append(runner(x))
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
        result = compare_outputs(ref, np.concatenate(outputs[n]), y_all)
        failures = gate.check(result)
        result.update(backend=n, passed=not failures, failures=failures)
        results[n] = result
    return {"samples": int(ref.shape[0]), "torch_accuracy": torch_accuracy, "gate": asdict(gate), "backends": results}


verify_run = verify_backends  # the name docs/architecture.md uses


def _failure_rows(results: dict) -> list[dict]:
    per_backend = results.get("backends", results)
    rows = []
    for name, result in per_backend.items():
        if isinstance(result, dict):
            rows += [{"backend": name, **f} for f in result.get("failures", [])]
    return rows


def raise_on_failure(results: dict) -> None:
    """Raise :class:`GateFailed` with a plain-text table when any backend failed its gate."""
    rows = _failure_rows(results)
    if not rows:
        return
    header = ("backend", "metric", "value", "required")
    table = [header] + [
        (r["backend"], r["metric"], "missing" if r["value"] is None else f"{r['value']:.6g}", f"{r['op']} {r['threshold']:g}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    failed = sorted({r["backend"] for r in rows})
    raise GateFailed(f"parity gate failed for {', '.join(failed)}:\n" + "\n".join(lines), failures=rows)
