"""ONNX Runtime runner: the deployment path cascadec vouches for on every machine.

The runner refuses to silently fall back to the CPU when a GPU provider was asked
for, because a parity or latency number measured on the wrong device is worse
than no number at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cascadec.backends.runner import BaseRunner
from cascadec.errors import UserError, first_line

# execution providers per ONNX Runtime device, most preferred first (CPU last, so nodes a GPU
# provider does not support still run); verification and timing (cuda_runners) both read this
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _providers(device: str) -> list[str | tuple[str, dict]]:
    """Map a cascadec device name to ORT providers, failing early when they are absent."""
    kind, _, index = str(device).partition(":")
    kind = kind.lower()
    if kind not in PROVIDERS:
        raise UserError(f"unknown onnxruntime device {device!r}; use one of: cpu, cuda, cuda:N, tensorrt")
    if index and not index.isdigit():
        raise UserError(f"bad device index in {device!r}; expected e.g. cuda:0")
    wanted = PROVIDERS[kind][0]
    available = ort.get_available_providers()
    if wanted not in available:
        extra = " and TensorRT 10 (pip install 'cascadec[gpu]')" if kind == "tensorrt" else ""
        raise UserError(
            f"onnxruntime has no {wanted} (available: {', '.join(available)}); "
            f"install onnxruntime-gpu{extra} on a machine with an NVIDIA GPU"
        )
    if kind == "tensorrt":
        _preload_tensorrt_libs()
    device = {"device_id": int(index)} if index else {}
    out: list[str | tuple[str, dict]] = []
    for name in PROVIDERS[kind]:
        options = {**device, **PROVIDER_OPTIONS.get(name, {})} if name != "CPUExecutionProvider" else {}
        out.append((name, options) if options else name)
    return out


# ORT's CUDA provider computes float32 convolutions and matmuls in TF32 (10-bit mantissa) by
# default on Ampere and later, while cascadec records and gates such a session as fp32: off
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def _preload_tensorrt_libs() -> None:
    """Import the ``tensorrt`` package, if installed, before ORT's TensorRT provider loads:
    pip's TensorRT keeps its libraries in ``tensorrt_libs``, which the provider finds only once
    the package has loaded them into the process."""
    try:
        import_module("tensorrt")
    except ImportError:
        pass  # a system TensorRT on the library path needs nothing; a missing one ORT names itself


def require_providers(device: str) -> None:
    """Fail with one line now, not minutes later, when ``device``'s execution provider is missing."""
    _providers(device)


def _session_options(threads: int | None, fused: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if not fused:
        # every node runs on its own: a Q/DQ graph is evaluated in float, as a consumer with exact
        # int32 accumulation (TensorRT) computes it, not through this CPU's fused int8 kernels
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise UserError(f"threads must be a positive integer, got {threads!r}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # fatal only: provider chatter is not user-facing output, and a kernel error reaches the user
    # once, as the one-line error OrtRunner raises with it (not also as ORT's own log line)
    opts.log_severity_level = 4
    return opts


def _create_session(
    model: str | bytes, device: str, threads: int | None, label: str, fused: bool = True
) -> ort.InferenceSession:
    providers = _providers(device)
    try:
        session = ort.InferenceSession(model, sess_options=_session_options(threads, fused), providers=providers)
    except Exception as exc:  # ORT raises several unrelated classes for unreadable models
        raise UserError(f"onnxruntime cannot load {label}: {first_line(exc)}") from exc
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in session.get_providers():
        raise UserError(
            f"onnxruntime could not initialise {wanted} for {label} (CUDA/cuDNN/TensorRT libraries missing?)"
        )
    return session


def _check_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    return path


class OrtRunner(BaseRunner):
    """Numpy in, numpy out, so verification and profiling can treat every backend alike.

    ``fused=False`` turns ORT's graph optimisations off (each node runs alone): how the quantize
    stage judges an INT8 graph made for another consumer (:mod:`cascadec.quantize.flavours`)."""

    def __init__(
        self, path: str | os.PathLike[str], device: str = "cpu", threads: int | None = None, *, fused: bool = True
    ) -> None:
        self.path = _check_path(path)
        self.device = device
        self.fused = fused
        self.session = _create_session(str(self.path), device, threads, str(self.path), fused)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise UserError(f"{self.path} has {len(inputs)} inputs; cascadec expects a single image input")
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        # what the graph computes in: a Q/DQ or float16 graph (cascadec quantize) is gated with its
        # precision's tolerances; the TensorRT provider's own fp16/int8 modes are opt-in
        # (trt_fp16_enable / trt_int8_enable) and cascadec does not turn them on, but it computes an
        # fp32 graph in TF32 (TensorRT's default; the provider has no option against it), which is
        # recorded and gated as its own precision; the CUDA provider's TF32 is off (PROVIDER_OPTIONS)
        graph = graph_precision(self.path)
        self.precision: str = "tf32" if device == "tensorrt" and graph == "fp32" else graph

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def static_input_shape(self) -> tuple[int, ...] | None:
        """The non-batch input shape when the graph fixes it; lets profiling infer shapes."""
        rest = self.input_shape[1:]
        return tuple(rest) if all(isinstance(d, int) for d in rest) else None

    def check_input(self, shape: Sequence[int]) -> None:
        """A wrong image size is a user mistake; say so instead of surfacing an ORT kernel error."""
        expected = self.input_shape
        bad = len(shape) != len(expected) or any(
            isinstance(e, int) and e != s for e, s in zip(expected, shape, strict=False)
        )
        if bad:
            raise UserError(f"input shape {tuple(shape)} does not match {self.path.name} input {expected}")

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.check_input(x.shape)
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # ORT's kernel errors are several unrelated pybind classes
            # a graph that loads but cannot run (a damaged file: shapes its kernels reject) is the
            # artifact's fault, not an internal error: say which file and how to get a good one
            raise UserError(
                f"onnxruntime cannot run {self.path}: {first_line(exc)[:200]}; the file may be damaged "
                "(re-export it: cascadec export RUN)"
            ) from exc


QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)


def graph_precision(path: str | os.PathLike[str]) -> str:
    """``int8`` for a graph with quantized operators (Q/DQ), ``fp16`` for one holding float16
    weights or casts to float16, ``fp32`` otherwise. Reads the graph only (no external data)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: ORT's session already said so, or will
        return "fp32"
    graph = model.graph
    if any(node.op_type in QUANTIZED_OPS for node in graph.node):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(init.data_type == half for init in graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute) for node in graph.node
    ):
        return "fp16"
    return "fp32"


def value_names(path: str | os.PathLike[str]) -> list[str]:
    """Every node output in graph order: the search space for first-divergence bisection."""
    model = load_onnx(path)
    return [name for node in model.graph.node for name in node.output if name]


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    path = _check_path(path)
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise UserError(f"cannot read ONNX model {path}: {first_line(exc)}") from exc


def intermediate_outputs(
    path: str | os.PathLike[str], x: np.ndarray, names: Sequence[str], *, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Run the graph with ``names`` promoted to graph outputs, to find where two backends diverge.

    ORT keeps any value that is a graph output, so fusions cannot hide the tensor asked for.
    """
    model = load_onnx(path)
    produced = {name for node in model.graph.node for name in node.output if name}
    produced |= {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise UserError(f"no value named {', '.join(map(repr, unknown))} in {Path(path).name}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    except Exception:  # shape inference is best effort; ORT accepts outputs typed as float
        known = {}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name in existing:
            continue
        value = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        model.graph.output.append(value)
        existing.add(name)
    session = _create_session(model.SerializeToString(), device, None, f"{Path(path).name} (intermediates)")
    input_name = session.get_inputs()[0].name
    values = session.run(list(names), {input_name: np.ascontiguousarray(x, dtype=np.float32)})
    return dict(zip(names, values, strict=True))
