"""Post-training quantization through ONNX Runtime's tooling, and a look at what ORT then runs.

``onnxruntime.quantization`` (``quant_pre_process``, ``quantize_static``) places the Q/DQ
pairs and calibrates; ``onnxruntime.transformers.float16`` writes the FP16 graph. Nothing
here edits a graph by hand. The calibrated ranges are cached as JSON (``quantize_static``'s
``calibration_cache_path``), so every flavour and every sensitivity probe reuses one
calibration instead of running the images again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cascadec.errors import UserError, first_line
from cascadec.quantize.calibration import ImageReader
from cascadec.quantize.flavours import Flavour

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers a user keeps in float
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd")


@contextlib.contextmanager
def _quiet():
    """ORT's quantizer logs and prints per tensor; the stage reports what matters itself."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare(fp32_path: Path, out_path: Path) -> str:
    """``quant_pre_process``: shape inference and ORT's graph optimisations (BatchNorm folded into
    Conv), which the quantizer documents as its expected input. Returns what was done."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
        return "quant_pre_process"
    except Exception as exc:  # symbolic shape inference gives up on some graphs: quantize as exported
        shutil.copyfile(fp32_path, out_path)
        return f"as exported (quant_pre_process: {first_line(exc, 120)})"


def compute_nodes(path: Path, layer_names: Sequence[tuple[str, tuple[int, ...]]] = ()) -> list[dict[str, str]]:
    """The graph's Conv/Gemm/MatMul nodes in order: ONNX name and the PyTorch module they came
    from (what ``quantize.exclude`` and the report name). ``layer_names`` are the PyTorch compute
    layers in execution order with their weight shapes (:func:`cascadec.quantize.stage.torch_layers`):
    the exporter keeps no module names, so they are matched to the nodes by weight shape in order,
    and only where every node finds one (else the exporter's scope metadata, else the node name)."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            weight = shapes.get(node.input[1], ()) if len(node.input) > 1 else ()
            out.append({"node": node.name, "module": module_of(node), "op": node.op_type, "shape": weight})
    # the exporter may order independent branches differently (a shortcut before the conv beside
    # it): each node takes the first unused layer of its weight shape; all must match, or none is named
    unused = list(layer_names)
    names = []
    for n in out:
        hit = next((i for i, (_, shape) in enumerate(unused) if tuple(shape) in (n["shape"], n["shape"][::-1])), None)
        if hit is None:
            break
        names.append(unused.pop(hit)[0])
    if len(names) == len(out) and not unused:
        for name, n in zip(names, out, strict=True):
            n["module"] = name
    for n in out:
        n.pop("shape")
    return out


def module_of(node: onnx.NodeProto) -> str:
    """The PyTorch module a node was exported from, where the exporter recorded it: the dynamo
    exporter's name scope, or the TorchScript exporter's ``/layer1/layer1.0/conv1/Conv`` path;
    else the node name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in prop.value.strip("[]").replace("'", "").replace('"', "").split(", ") if s]
            if scopes:
                return scopes[-1]
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return node.name.strip("/").split("/")[-2]
    return node.name


def resolve_exclude(names: Sequence[str], nodes: Sequence[dict[str, str]]) -> list[str]:
    """ONNX node names for ``quantize.exclude`` entries (module or node names); unknown names are
    refused with the close matches, before any calibration."""
    import difflib

    picked: list[str] = []
    for name in names:
        hits = [n["node"] for n in nodes if name in (n["node"], n["module"])]
        if not hits:
            known = [n["module"] for n in nodes]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; layers: {', '.join(known[:12])}"
            raise UserError(f"quantize.exclude: no Conv/Gemm/MatMul layer named {name!r}{hint}")
        picked += [h for h in hits if h not in picked]
    return picked


def calibration_method(method: str, percentile: float) -> tuple[object, dict]:
    from onnxruntime.quantization import CalibrationMethod

    if method == "max":
        return CalibrationMethod.MinMax, {}
    if method == "entropy":
        return CalibrationMethod.Entropy, {}
    if method == "percentile":
        return CalibrationMethod.Percentile, {"CalibPercentile": float(percentile)}
    raise UserError(f"quantize.calibration.method {method!r}: use max, entropy or percentile")


def quantize_int8(
    prepared: Path,
    out_path: Path,
    flavour: Flavour,
    images: np.ndarray,
    *,
    method: str = "max",
    percentile: float = 99.999,
    exclude_nodes: Sequence[str] = (),
    only_nodes: Sequence[str] | None = None,
    cache: Path | None = None,
    names: Mapping[str, str] | None = None,
    calibration_batch: int | None = None,
    reduce_range: bool = False,
) -> dict:
    """One flavour's Q/DQ graph of ``prepared``. ``cache`` (JSON) holds the calibrated ranges:
    written by the first call, read by every later one with the same graph and method.
    ``only_nodes`` quantizes those nodes alone (the sensitivity pass); ``names`` maps node names to
    PyTorch module names for the summary (:func:`compute_nodes`); ``reduce_range``: 7-bit weights
    where the flavour takes them (:func:`cascadec.quantize.flavours.resolve_reduce_range`). A flavour
    whose ``float_dtype`` is "fp16" gets everything outside its Q/DQ pairs in FP16
    (:func:`float_parts_to_fp16`)."""
    from onnxruntime.quantization import quantize_static

    calibrate, calib_options = calibration_method(method, percentile)
    kwargs = flavour.quantize_kwargs(reduce_range)
    kwargs["extra_options"] = {**kwargs["extra_options"], **calib_options}
    input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
    reader = (
        None
        if cache is not None and cache.is_file()
        else ImageReader(images, input_name, *([calibration_batch] if calibration_batch else []))
    )
    tmp = Path(tempfile.mkdtemp(prefix="cascadec-q-", dir=out_path.parent))
    try:
        with _quiet():
            quantize_static(
                str(prepared),
                str(tmp / "model.onnx"),
                reader,
                calibrate_method=calibrate,
                nodes_to_exclude=list(exclude_nodes) or None,
                nodes_to_quantize=list(only_nodes) if only_nodes is not None else None,
                calibration_cache_path=str(cache) if cache is not None else None,
                **kwargs,
            )
        if flavour.float_dtype == "fp16":
            float_parts_to_fp16(tmp / "model.onnx")
        onnx.checker.check_model(str(tmp / "model.onnx"))
        os.replace(tmp / "model.onnx", out_path)
    except UserError:
        raise
    except Exception as exc:  # the quantizer's errors are many unrelated classes
        raise UserError(f"INT8 quantization ({flavour.name}) failed: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**graph_summary(out_path, names), "float_parts": flavour.float_dtype}


def int8_for_timing(src: Path, out_path: Path, x_shape: Sequence[int], *, preprocess: bool = False) -> Path:
    """The ONNX Runtime flavour of ``src`` (U8S8, per-channel weights, as the quantize stage builds
    it) calibrated on one seeded random batch of ``x_shape``: for timing only (the latency table
    at ``prune.latency.precision: int8``, the refinement's meter). Int8 kernels run at the same
    speed whatever the ranges, so no data set is read. ``preprocess``: ``quant_pre_process``
    first, as the stage does for a whole network (a one-layer graph needs none). Weights take
    this CPU's ``reduce_range`` as the stage's default (``auto``) does."""
    from cascadec.quantize.flavours import get_flavour, resolve_reduce_range

    images = np.random.default_rng(0).standard_normal(tuple(x_shape), dtype=np.float32)
    source = src
    if preprocess:
        source = out_path.with_name(out_path.stem + ".prepared.onnx")
        prepare(src, source)
    try:
        quantize_int8(
            source,
            out_path,
            get_flavour("onnxruntime"),
            images,
            calibration_batch=len(images),
            reduce_range=resolve_reduce_range("auto"),
        )
    finally:
        if source != src:
            source.unlink(missing_ok=True)
    return out_path


def graph_summary(path: Path, names: Mapping[str, str] | None = None) -> dict:
    """What a quantized file holds: Q/DQ pairs, how many compute layers read int8, which stay
    float (by PyTorch module name where ``names`` knows the node)."""
    model = onnx.load(str(path), load_external_data=False)
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized, floating = [], []
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            name = (names or {}).get(node.name) or module_of(node)
            (quantized if node.input and node.input[0] in dq_out else floating).append(name)
    ops = [n.op_type for n in model.graph.node]
    return {
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "int8_layers": len(quantized),
        "float_layers": floating,
        "bytes": path.stat().st_size,
    }


def convert_fp16(fp32_path: Path, out_path: Path) -> dict:
    """The FP16 graph (inputs and outputs stay float32, so callers feed what they fed before)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with _quiet():
            model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        _topological_order(model.graph)  # the converter appends the input casts after their readers
        onnx.checker.check_model(model)
        tmp = out_path.with_name(out_path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, out_path)
    except Exception as exc:
        raise UserError(f"FP16 conversion failed: {first_line(exc)}") from exc
    return {"bytes": out_path.stat().st_size}


FP16_QDQ_OPSET = 19  # QuantizeLinear / DequantizeLinear take float16 scales from opset 19 on


def float_parts_to_fp16(path: Path) -> None:
    """Rewrite the Q/DQ graph at ``path`` with its float parts in FP16: the tensors between the Q/DQ
    pairs, the layers left in float, the biases, and the Q/DQ scales themselves (so DequantizeLinear
    writes FP16 straight into the INT8 layer TensorRT fuses it with; a Cast there would break the
    fusion). Inputs and outputs stay float32. This is what ModelOpt's ONNX PTQ writes with
    ``high_precision_dtype="fp16"``; a strongly typed TensorRT network then runs the non-INT8 layers
    in FP16 instead of FP32. Float16 scales need opset 19, so an older graph is converted to it
    first (``onnx.version_converter``)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < FP16_QDQ_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, FP16_QDQ_OPSET)
    with _quiet():
        model = convert_float_to_float16(model, keep_io_types=True)
    _topological_order(model.graph)
    onnx.save(model, str(path))


def _topological_order(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the order for the checker to name
            ordered += rest
            break
        pending = rest
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def ort_kernels(path: Path) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime's CPU provider actually runs (its optimised
    model): an INT8 file whose Q/DQ pairs were not fused into int8 kernels would run
    dequantize-then-float, slower than FP32, and this says so."""
    with tempfile.TemporaryDirectory(prefix="cascadec-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            model = onnx.load(opts.optimized_model_filepath, load_external_data=False)
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def int8_kernel_count(kernels: dict[str, int]) -> int:
    return sum(v for k, v in kernels.items() if k in INT8_KERNELS)
