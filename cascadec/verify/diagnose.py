"""Diagnosis of a failed tensor gate: *where* the graph diverges, and whether float32 itself is to blame.

Never raised, only reported: the gate's verdict stands, and a diagnosis that fails says so in
the result instead of turning a gate failure (exit 3) into a crash.

**First divergent layer**: where an ONNX graph stops computing what the PyTorch model computes.

A failed parity gate says *that* a backend diverges; this module says *where*. Every node
output of the ONNX graph is promoted to a graph output and computed by ONNX Runtime on the
failing backend's device (``onnxruntime_backend.intermediate_outputs``); PyTorch activations
are captured with forward hooks on every module. Nodes are then checked in graph order and
the first whose output exceeds the tolerance is reported.

Mapping an ONNX value to a PyTorch module is the hard part, because the exporter renames
values (``getitem_3``) and onnxslim/onnxscript fold BatchNorm into the preceding conv. In
order of trust:

1. ``pkg.torch.onnx.name_scopes`` metadata (dynamo exporter, kept when the graph is not
   slimmed): the deepest scope that is a leaf module, e.g. ``layer1.0.bn1`` for a conv with
   its BatchNorm folded in;
2. parameter names: a node reading the initializer ``layer1.0.conv1.weight`` computes module
   ``layer1.0.conv1`` or, after folding, one of the leaf modules run right after it
   (``layer1.0.bn1``); of those with the right shape the closest activation is taken;
3. no mapping (functional ``F.relu``, ``torch.add``, reshapes): the node is compared with the
   same graph on ONNX Runtime's CPU provider in fp32, which catches device-specific kernels;
   on the CPU itself such nodes cannot be checked and are skipped.

TensorRT fuses layers and keeps no per-node tensors, so a TensorRT failure is searched with
ONNX Runtime on CUDA (or the CPU): a precision-only divergence of an fp16/int8 engine may
then find no node, which is reported as such.

**Conditioning**: PyTorch rerun in float64 on the same samples tells a backend that departs
from the exact result from a network that amplifies float32 rounding beyond any tolerance.
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from cascadec.backends import divergence_device
from cascadec.backends.onnxruntime_backend import intermediate_outputs, load_onnx
from cascadec.errors import UserError, first_line
from cascadec.verify.compare import compare_outputs, mismatches, tensor_errors
from cascadec.verify.gates import Gate, Tolerance

DIVERGENCE_SAMPLES = 4  # the search keeps every intermediate in memory: keep the batch small
FOLD_WINDOW = 2  # leaf modules after a parameterised one that a fused node may stand for (conv -> bn)


def torch_activations(model: nn.Module, x: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Outputs of every leaf module (and every module owning parameters) on ``x``, and the
    order leaf modules finished in.

    Modules called more than once keep their first output (the one the graph order meets first).
    """
    acts: dict[str, np.ndarray] = {}
    order: list[str] = []
    leaves = {name for name, m in model.named_modules() if name and not any(True for _ in m.children())}
    # containers are never mapped to a node (only leaves and parameter owners are): not keeping
    # their outputs halves the memory a ResNet-50 search needs
    owners = {name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and name not in acts:
                acts[name] = output.detach().to("cpu", torch.float32).numpy().copy()
                if name in leaves:
                    order.append(name)

        return record

    for name, module in model.named_modules():
        if name in leaves or name in owners:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            model.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device))
    finally:
        for h in handles:
            h.remove()
    return acts, order


def _scope_module(node: onnx.NodeProto, leaves: set[str]) -> str | None:
    """The deepest leaf module named in the dynamo exporter's name_scopes metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            for scope in reversed(list(scopes)):
                if scope in leaves:
                    return scope
    return None


def _param_modules(node: onnx.NodeProto, initializers: set[str], modules: set[str], order: list[str]) -> list[str]:
    """Modules whose parameters the node reads, each followed by the leaves that may be folded into it."""
    found: list[str] = []
    for name in node.input:
        if name not in initializers or "." not in name:
            continue
        owner = name.rsplit(".", 1)[0]
        if owner in modules and owner not in found:
            found.append(owner)
            if owner in order:
                i = order.index(owner)
                found += [m for m in order[i + 1 : i + 1 + FOLD_WINDOW] if m not in found]
    return found


def _exceeds(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> tuple[bool, float, float]:
    """Whether a node's output fails the tolerance, and its max abs/rel error; a non-finite
    value anywhere makes both errors infinite, so NaN can never hide behind a small number."""
    absdiff, reldiff = tensor_errors(reference, candidate)
    if not (np.all(np.isfinite(candidate)) and np.all(np.isfinite(reference))):
        return True, float("inf"), float("inf")
    bad = bool(np.any(mismatches(absdiff, reldiff, tolerance)))
    max_abs = float(absdiff.max()) if absdiff.size else 0.0
    max_rel = float(reldiff.max()) if reldiff.size else 0.0
    return bad, max_abs, max_rel


def nonfinite_parameters(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of the parameters and buffers that hold NaN or inf (at most ``limit``): weights like
    that make every backend "diverge" exactly as PyTorch does, so they are named first."""
    found = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(name)
            if len(found) >= limit:
                break
    return found


def find_first_divergence(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    x: np.ndarray,
    *,
    device: str = "cpu",
    tolerance: Tolerance = Tolerance(atol=1e-4, rtol=1e-3),
) -> dict | None:
    """The first ONNX node (graph order) whose output leaves PyTorch (or CPU fp32 ORT) by more
    than ``tolerance`` on the samples ``x``; None when every checked node agrees.

    Returns ``{"node", "op_type", "output", "torch_module", "reference", "device",
    "max_abs_diff", "max_rel_diff", "tolerance", "samples", "checked_nodes", "mapped_nodes"}``
    where ``reference`` is ``"torch"`` (compared with ``torch_module``'s activation) or
    ``"onnxruntime-cpu"`` (no module maps to the node).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    graph = load_onnx(onnx_path).graph
    nodes = [n for n in graph.node if any(o for o in n.output)]
    values = [next(o for o in n.output if o) for n in nodes]
    candidate = intermediate_outputs(onnx_path, x, values, device=device)
    cpu_reference = intermediate_outputs(onnx_path, x, values, device="cpu") if device != "cpu" else None
    acts, order = torch_activations(model, x)
    modules = set(acts)
    leaves = set(order)
    initializers = {i.name for i in graph.initializer}
    tol = {"atol": tolerance.atol, "rtol": tolerance.rtol}
    checked = mapped = 0
    for node, value in zip(nodes, values, strict=True):
        got = np.asarray(candidate[value])
        if not np.issubdtype(got.dtype, np.floating):
            continue  # shapes, indices: not activations
        options: list[str] = []
        scoped = _scope_module(node, leaves)
        if scoped:
            options.append(scoped)
        options += [m for m in _param_modules(node, initializers, modules, order) if m not in options]
        options = [m for m in options if acts[m].shape == got.shape]
        if options:
            mapped += 1
            checked += 1
            # folded nodes: the activation they stand for is the closest one of their candidates
            results = [(_exceeds(acts[m], got, tolerance), m) for m in options]
            (bad, max_abs, max_rel), module = min(results, key=lambda r: (r[0][0], r[0][1]))
            reference = "torch"
        elif cpu_reference is not None:
            checked += 1
            bad, max_abs, max_rel = _exceeds(np.asarray(cpu_reference[value]), got, tolerance)
            module, reference = None, "onnxruntime-cpu"
        else:
            continue
        if bad:
            nonfinite = not bool(np.all(np.isfinite(got)))
            return {
                "nonfinite": nonfinite,
                "node": node.name or value,
                "op_type": node.op_type,
                "output": value,
                "torch_module": module,
                "reference": reference,
                "device": device,
                "max_abs_diff": max_abs,
                "max_rel_diff": max_rel,
                "tolerance": tol,
                "samples": int(x.shape[0]),
                "checked_nodes": checked,
                "mapped_nodes": mapped,
            }
    return None


def mapped_modules(model: nn.Module, onnx_path: str | os.PathLike[str], x: np.ndarray) -> dict[str, Sequence[str]]:
    """ONNX node name -> candidate PyTorch modules, for inspecting how a graph was mapped."""
    graph = load_onnx(onnx_path).graph
    acts, order = torch_activations(model, x)
    initializers = {i.name for i in graph.initializer}
    out: dict[str, Sequence[str]] = {}
    for node in graph.node:
        options = [m for m in [_scope_module(node, set(order))] if m]
        options += [m for m in _param_modules(node, initializers, set(acts), order) if m not in options]
        if options:
            out[node.name] = options
    return out


def conditioning(
    model: nn.Module, x: np.ndarray, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance
) -> dict:
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
        return {"error": f"float64 reference failed: {type(exc).__name__}: {first_line(exc)}"[:300]}
    if exact.shape != reference.shape or exact.shape != candidate.shape:
        return {"error": f"float64 output shape {exact.shape} differs from {reference.shape}"}
    torch_error = float(np.abs(reference.astype(np.float64) - exact).max(initial=0.0))
    candidate_error = float(np.abs(candidate.astype(np.float64) - exact).max(initial=0.0))
    atol = tolerance.atol or 0.0
    ill = bool(np.isfinite(candidate_error) and torch_error > atol and candidate_error <= 2 * torch_error)
    return {
        "samples": int(len(x)),
        "torch_fp32_vs_fp64": torch_error,
        "candidate_vs_fp64": candidate_error,
        "ill_conditioned": ill,
    }


def float64_outputs(model: nn.Module, batches: Sequence[np.ndarray]) -> np.ndarray:
    """PyTorch in float64 on every verify sample: the exact result both float32 runs approximate."""
    exact_model = copy.deepcopy(model).to("cpu", torch.float64).eval()
    outs = []
    with torch.inference_mode():
        for x in batches:
            out = exact_model(torch.from_numpy(np.asarray(x, dtype=np.float64)))
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).numpy())
    return np.concatenate(outs)


def _no_worse(candidate: dict, torch_failure: dict | None) -> bool:
    """The candidate's failure on a metric is no worse than PyTorch float32's own on it."""
    if torch_failure is None or candidate["metric"] == "nonfinite":
        return False
    c, t = candidate.get("value"), torch_failure.get("value")
    if c is None or t is None:
        return False
    return c <= t if candidate["op"] == "<=" else c >= t


def float64_judgement(
    model: nn.Module,
    batches: Sequence[np.ndarray],
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None,
    gate: Gate,
    precision: str,
) -> dict:
    """Judge a backend of an ill-conditioned network against the exact result (``verify.ill_conditioned:
    float64``): when PyTorch's own float32 output is further from float64 than the gate allows, no
    float32 backend can match PyTorch float32 to that tolerance, and the gate says nothing about the
    export. The backend is compared with PyTorch float64 on **every** verify sample, as PyTorch
    float32 is; a threshold it misses is excused only where PyTorch float32 misses it too and the
    backend is no worse there. NaN/inf is never excused. Returns the record the report shows, with
    ``failures``: the ones that stand."""
    try:
        exact = float64_outputs(model, batches)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not turn a gate failure (exit 3) into a crash
        return {"error": f"float64 reference failed: {type(exc).__name__}: {first_line(exc)}"[:300]}
    if exact.shape != reference.shape or exact.shape != candidate.shape:
        return {"error": f"float64 output shape {exact.shape} differs from {reference.shape}"}
    tolerance = gate.tolerance(precision)
    torch_metrics = compare_outputs(exact, reference, labels, tolerance=tolerance)
    cand_metrics = compare_outputs(exact, candidate, labels, tolerance=tolerance)
    torch_failures = {f["metric"]: f for f in gate.check(torch_metrics, precision)}
    cand_failures = gate.check(cand_metrics, precision)
    excused = [f["metric"] for f in cand_failures if _no_worse(f, torch_failures.get(f["metric"]))]
    keys = ("max_abs_diff", "max_rel_diff", "top1_agreement", "top5_agreement", "accuracy")
    return {
        "samples": int(len(exact)),
        "torch_fp32": {k: torch_metrics[k] for k in keys if k in torch_metrics},
        "candidate": {k: cand_metrics[k] for k in keys if k in cand_metrics},
        "torch_fp32_failures": sorted(torch_failures),
        "excused": excused,
        "failures": [f for f in cand_failures if f["metric"] not in excused],
    }


def first_divergence(
    model: nn.Module, onnx_path: str | os.PathLike[str], x: np.ndarray, backend: str, tolerance: Tolerance
) -> dict:
    """Where the graph leaves PyTorch; a failed search is reported, never raised, because
    the gate result it explains is already known and must still reach the report."""
    try:
        found = find_first_divergence(model, onnx_path, x, device=divergence_device(backend), tolerance=tolerance)
    except UserError as exc:
        return {"node": None, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not turn a gate failure (exit 3) into a crash
        return {"node": None, "error": f"search failed: {type(exc).__name__}: {first_line(exc)}"[:300]}
    return found or {"node": None, "error": f"no ONNX node exceeded the tolerance on the first {len(x)} samples"}
