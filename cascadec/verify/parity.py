"""The comparator: run PyTorch (reference) and each backend (candidate) on the same real
samples, compare, gate, and diagnose what failed.

Parity is measured on real samples rather than random noise because classifier logits on
noise are near-uniform, so a broken graph can still "agree" on top-1. Outputs are compared
once all samples ran, so the metrics describe the whole set rather than an average of
per-batch maxima.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec.backends import canonical_name, get_backend, get_runner
from cascadec.backends.torch_backend import TorchRunner
from cascadec.errors import UserError
from cascadec.verify.compare import as_2d, compare_outputs
from cascadec.verify.diagnose import (
    DIVERGENCE_SAMPLES,
    conditioning,
    first_divergence,
    float64_judgement,
    nonfinite_parameters,
)
from cascadec.verify.gates import Gate
from cascadec.verify.results import BackendParity, ParityResult

KEEP_INPUTS_BYTES = 1 << 30  # verify inputs kept for a float64 judgement (512 ImageNet images: 300 MiB)


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
    runners: Mapping[str, Any] | None = None,
) -> ParityResult:
    """Run PyTorch (reference) and each backend (candidate) on the same real samples.

    Outputs are compared once all samples ran, so the metrics describe the whole
    set rather than an average of per-batch maxima. Each backend is held to the
    tolerances of its precision (``runner.precision``; fp32 when a runner has none).
    When a backend fails the tensor check and the ONNX file is known, the first ONNX
    node whose output diverges is searched on the first few samples
    (:mod:`cascadec.verify.diagnose`) and stored as ``first_divergence``.

    ``runners`` (backend name -> runner) replaces ``backends`` with runners the caller built, as
    Polygraphy's comparator takes them: the quantize stage judges TensorRT's INT8 graph on an ORT
    runner with graph optimisations off.

    Returns a :class:`~cascadec.verify.results.ParityResult` (``.to_dict()`` is the report's
    form). Never raises on a failed gate: call
    :func:`cascadec.verify.present.raise_on_failure` when failing is wanted.
    """
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    gate = gate or Gate()
    reference = TorchRunner(model, device=device)
    if runners is None:
        names = list(dict.fromkeys(canonical_name(b) for b in backends))
        runners = {
            n: get_runner(n, onnx_path=onnx_path, model=model, device=device, engine_path=engine_path) for n in names
        }
    else:
        runners = {canonical_name(n): r for n, r in runners.items()}
        names = list(runners)
    precisions = {n: str(r.precision) for n, r in runners.items()}
    for precision in precisions.values():
        gate.tolerance(precision)  # an unknown precision is refused before minutes of inference
    outputs: dict[str, list[np.ndarray]] = {"__ref__": [], **{n: [] for n in names}}
    labels: list[np.ndarray] = []
    have_labels = True
    probe: list[np.ndarray] = []  # the first samples, kept for the first-divergent-layer search
    inputs: list[np.ndarray] | None = []  # every sample, for a float64 judgement (None: past the cap)

    columns = (TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("verify", total=samples)
        for x, y in _batches(loader_or_arrays, samples, batch_size):
            if len(x) == 0:
                continue
            x = np.ascontiguousarray(x, dtype=np.float32)
            if sum(len(p) for p in probe) < DIVERGENCE_SAMPLES:
                probe.append(x[: DIVERGENCE_SAMPLES - sum(len(p) for p in probe)])
            if inputs is not None:
                inputs.append(x)
                if sum(a.nbytes for a in inputs) > KEEP_INPUTS_BYTES:
                    inputs = None
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
    torch_accuracy = None if y_all is None else float(np.mean(as_2d(ref).argmax(axis=1) == y_all))
    results: dict[str, BackendParity] = {}
    x_probe = np.concatenate(probe)
    broken = nonfinite_parameters(model)  # every backend then "fails" as PyTorch does: no search helps
    for n in names:
        precision = precisions[n]
        tolerance = gate.tolerance(precision)
        candidate = np.concatenate(outputs[n])
        # a tie is a tie of the reference's float32 numbers, whatever the candidate's precision: a
        # looser int8 tolerance must not excuse real flips
        metrics = compare_outputs(ref, candidate, y_all, tolerance=tolerance, tie_tolerance=gate.tolerance("fp32"))
        result = BackendParity(
            backend=n,
            precision=precision,
            metrics=metrics,
            thresholds=gate.thresholds(precision),
            failures=gate.check(metrics, precision),
        )
        if result.tensor_failed and get_backend(n).runs != "torch" and not broken:
            if find_divergence and onnx_path is not None:
                result.first_divergence = first_divergence(model, onnx_path, x_probe, n, tolerance)
            result.conditioning = conditioning(
                model, x_probe, ref[: len(x_probe)], candidate[: len(x_probe)], tolerance
            )
            if result.conditioning.get("ill_conditioned") and gate.ill_conditioned == "float64":
                if inputs is None:
                    result.float64_judgement = {
                        "error": f"the verify samples exceed {KEEP_INPUTS_BYTES >> 20} MiB; verify fewer to judge against float64"
                    }
                else:
                    result.float64_judgement = float64_judgement(model, inputs, ref, candidate, y_all, gate, precision)
                    if "failures" in result.float64_judgement:
                        result.failures = result.float64_judgement["failures"]
        results[n] = result
    return ParityResult(
        samples=int(ref.shape[0]),
        torch_accuracy=torch_accuracy,
        gate=gate.as_dict(),
        backends=results,
        nonfinite_weights=broken,
    )


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
        chunk = x[start : start + high]
        n = len(chunk)
        if n < low:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - n, axis=0)])
        pieces.append(runner(chunk)[:n])  # type: ignore[operator]
    return np.concatenate(pieces)
