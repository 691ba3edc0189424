"""The latency table: every conv/linear layer of a network timed alone on the target backend,
on a grid of widths, cached per machine (``prune/latency.py`` turns it into predictions).

* Every conv/linear layer is timed alone, as a one-node ONNX graph (conv + ReLU, which every
  backend fuses as it does in the exported network) at the layer's input resolution and the
  target batch, on a grid of (input, output) widths at multiples of the backend's channel block
  (probed first: 16 on this AVX-512 CPU; 8 where latency is smooth in width), under the profile
  protocol in small (one warm-up per table, then per grid point untimed first calls and a timed
  loop; the median counts, less the runtime's per-call overhead). Layers of identical
  configuration share their timings, and only the axes a prunable group reaches get a grid.
* The whole network, exported as ``export`` exports it, is timed too: it scales the layers' sum.
* The table is cached per (layer configurations, batch, backend, device, threads, machine,
  versions) under the cascadec cache folder with the environment it was measured in, and
  reused by the next run on the same machine; a damaged entry is measured again.

The backend is behind one callable (``LayerTimer``): ONNX Runtime on CPU or CUDA here; tests
pass a fake. TensorRT is not offered: one engine build per grid point takes minutes.

``precision: int8`` (``prune.latency.precision``) times every graph as the quantize stage's
ONNX Runtime flavour (U8S8 Q/DQ, which ORT runs as VNNI int8 kernels), so a target met in INT8
prunes only what INT8 does not already give; the unpruned network is then timed in FP32 too
(``reference_ms``): "3x faster in INT8" is counted from the FP32 network a user starts from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cascadec.backends import get_backend
from cascadec.errors import UserError, first_line
from cascadec.fileio import write_json_atomic
from cascadec.names import LATENCY_BACKENDS
from cascadec.profile.protocol import Timing, measure
from cascadec.prune.cost import CostModel

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the precisions a table can be timed in, and the backends that run each fast
LATENCY_PRECISIONS = {"fp32": LATENCY_BACKENDS, "int8": ("onnxruntime",)}
TABLE_VERSION = 5
# widths the channel-block probe times (multiples of 4, so blocks of 4, 8, 16 and 32 show)
PROBE_WIDTHS = tuple(range(32, 100, 4))
BLOCK_CANDIDATES = (4, 8, 16, 32)


@dataclass(frozen=True)
class LayerConfig:
    """What decides one layer's latency apart from its widths."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    depthwise: bool
    input_hw: tuple[int, ...]  # spatial size of the input (linear: the token dims before features)
    bias: bool

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class LayerTable:
    """Measured milliseconds of one configuration on a grid of widths."""

    config: LayerConfig
    in_grid: list[int]
    out_grid: list[int]
    ms: list[list[float]]  # [len(in_grid)][len(out_grid)]

    def at(self, cin: float, cout: float) -> float:
        """Bilinear between grid points; clamped at the grid's ends (below the smallest width
        measured the latency is taken as that width's, which over-predicts, never under)."""
        return float(_bilinear(self.in_grid, self.out_grid, np.asarray(self.ms), cin, cout))


def _interp_weights(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    hi = int(np.searchsorted(grid, x))
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


def _bilinear(in_grid: Sequence[int], out_grid: Sequence[int], ms: np.ndarray, cin: float, cout: float) -> float:
    i0, i1, a = _interp_weights(in_grid, cin)
    o0, o1, b = _interp_weights(out_grid, cout)
    top = ms[i0, o0] * (1 - b) + ms[i0, o1] * b
    bottom = ms[i1, o0] * (1 - b) + ms[i1, o1] * b
    return top * (1 - a) + bottom * a


def width_grid(full: int, points: int, multiple: int = 8, narrow: int = 0) -> list[int]:
    """``points`` widths from about full/points to full, rounded to ``multiple`` (runtimes block
    channels by 8 or 16, so widths that are multiples are the ones a rounded student has), and
    ``multiple`` itself, the narrowest a rounded student keeps: below the lowest grid point the
    table can only repeat that point's time, which priced a 16-channel MobileNetV2 layer as a
    240-channel one and refused a 3x target its narrowest student beats twice over. ``narrow``
    (half the channel block, 0: none) is timed too: the one width below the block a latency
    target may keep (``LatencyTable.narrow``)."""
    if full <= multiple or points <= 1:
        out = {full} if points <= 1 or full <= 1 else {max(1, full // 2), full}
        if points > 1 and 0 < narrow < full:
            out.add(narrow)
        return sorted(out)
    out = {full, multiple}
    if 0 < narrow < multiple:
        out.add(narrow)
    for k in range(1, points):
        w = int(round(full * k / points / multiple)) * multiple
        out.add(min(full, max(multiple, w)))
    return sorted(out)


# --------------------------------------------------------------------------- layers of a network


def layer_configs(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerConfig]:
    """Each conv/linear layer's configuration, in the order the cost model lists them."""
    found: dict[str, LayerConfig] = {}
    hooks = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, name: str) -> None:
        if name in found:
            return
        x = inputs[0]
        if isinstance(module, _CONV):
            found[name] = LayerConfig(
                kind="conv",
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel=tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=tuple(module.padding) if isinstance(module.padding, tuple) else (0,) * len(module.kernel_size),
                dilation=tuple(module.dilation),
                groups=module.groups,
                depthwise=module.groups > 1 and module.groups == module.in_channels == module.out_channels,
                input_hw=tuple(int(s) for s in x.shape[2:]),
                bias=module.bias is not None,
            )
        else:
            found[name] = LayerConfig(
                kind="linear",
                in_channels=module.in_features,
                out_channels=module.out_features,
                kernel=(),
                stride=(),
                padding=(),
                dilation=(),
                groups=1,
                depthwise=False,
                input_hw=tuple(int(s) for s in x.shape[1:-1]),
                bias=module.bias is not None,
            )

    for name, module in model.named_modules():
        if isinstance(module, (*_CONV, nn.Linear)):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def layer_onnx(config: LayerConfig, cin: int, cout: int, batch: int) -> tuple[bytes, tuple[int, ...]]:
    """A one-layer ONNX graph (conv or Gemm, then ReLU) at these widths; returns it and its input shape."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if config.kind == "conv":
        groups = cin if config.depthwise else config.groups
        if config.depthwise:
            cout = cin
        weight = rng.standard_normal((cout, cin // groups, *config.kernel), dtype=np.float32) * 0.05
        x_shape = (batch, cin, *config.input_hw)
        pads = list(config.padding) * 2
        inits = [numpy_helper.from_array(weight, "w")]
        inputs = ["x", "w"]
        if config.bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
            inputs.append("b")
        node = helper.make_node(
            "Conv",
            inputs,
            ["y"],
            kernel_shape=list(config.kernel),
            strides=list(config.stride),
            pads=pads,
            dilations=list(config.dilation),
            group=groups,
        )
    else:
        weight = rng.standard_normal((cin, cout), dtype=np.float32) * 0.05
        x_shape = (batch, *config.input_hw, cin)
        inits = [numpy_helper.from_array(weight, "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        if config.bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
    nodes = [node]
    last = "y"
    if config.kind == "linear" and config.bias:
        nodes.append(helper.make_node("Add", ["y", "b"], ["yb"]))
        last = "yb"
    nodes.append(helper.make_node("Relu", [last], ["out"]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), x_shape


# A timer takes one ONNX graph and its input shape and returns the median milliseconds per call.
LayerTimer = Callable[[bytes, tuple[int, ...]], float]


def median_ms(run: Callable[[], object], *, min_iters: int = 10, min_seconds: float = 0.05) -> float:
    """The profile protocol (``profile.protocol.measure``) for one grid point: three untimed
    calls (allocation, kernel choice), then at least ``min_iters`` runs and ``min_seconds``; the
    median. The 200 ms warm-up that ``profile`` pays per model is paid once per table
    (``ort_timer``), not per grid point: a table has hundreds of points."""
    timing = Timing(min_duration_s=min_seconds, min_iters=min_iters)
    return float(np.median(measure(run, timing, warm_calls=3)))


def ort_timer(device: str = "cpu", threads: int | None = None) -> LayerTimer:
    """ONNX Runtime: one session per grid point, the feed prepared beforehand (as ``profile``)."""
    from cascadec.backends.onnxruntime_backend import _create_session

    warm = False

    def time_layer(graph: bytes, x_shape: tuple[int, ...]) -> float:
        nonlocal warm
        session = _create_session(graph, device, threads, "latency table layer")
        rng = np.random.default_rng(0)
        if session.get_inputs()[0].type == "tensor(uint8)":  # an INT8 layer (int8_graph)
            feed = {"x": rng.integers(0, 256, x_shape, dtype=np.uint8)}
        else:
            feed = {"x": rng.standard_normal(x_shape, dtype=np.float32)}
        if not warm:  # trtexec's 200 ms, once per table: CPU frequency and the thread pool ramp up
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:
                session.run(["out"], feed)
            warm = True
        return median_ms(lambda: session.run(["out"], feed))

    return time_layer


# What a graph is timed as: itself (FP32) or its quantized form, made before any timing starts:
# quantizing between timed calls (ORT's calibrator runs its own sessions) made them noisier here
GraphTransform = Callable[[bytes, tuple[int, ...]], bytes]


def int8_graph(graph: bytes, x_shape: tuple[int, ...]) -> bytes:
    """A one-layer graph as the quantize stage's ONNX Runtime flavour quantizes it (about 25 ms
    a graph here, against the quarter second a grid point's timing takes), with uint8 in and
    out: inside a quantized network ONNX Runtime passes uint8 from one ``QLinearConv`` to the
    next, so the float Quantize in front and Dequantize behind the layer, which a one-layer graph
    would otherwise time (memory-bound, and as large as a depthwise conv's own time at high
    resolution), are taken off (``uint8_boundaries``)."""
    import tempfile

    from cascadec.quantize.ptq import int8_for_timing

    with tempfile.TemporaryDirectory(prefix="cascadec-int8-layer-") as tmp:
        src = Path(tmp) / "layer.onnx"
        src.write_bytes(graph)
        return uint8_boundaries(int8_for_timing(src, Path(tmp) / "layer.int8.onnx", x_shape).read_bytes())


def uint8_boundaries(graph: bytes) -> bytes:
    """A quantized one-layer graph whose input feeds a QuantizeLinear and whose output comes out
    of a DequantizeLinear, with both taken off: the graph reads and writes the quantized tensors
    (same names as before: ``x`` and ``out``). A graph without them is returned as it is."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(graph)
    g = model.graph
    first = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == g.input[0].name), None)
    last = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == g.output[0].name), None)
    if first is None or last is None:
        return graph

    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]

    x_shape, y_shape = dims(g.input[0]), dims(g.output[0])
    kept = [n for n in g.node if n is not first and n is not last]
    for node in kept:  # rename so the graph's I/O keep their names: x in, out out
        node.input[:] = [g.input[0].name if i == first.output[0] else i for i in node.input]
        node.output[:] = [g.output[0].name if o == last.input[0] else o for o in node.output]
    uint8 = onnx.TensorProto.UINT8
    new_input = helper.make_tensor_value_info(g.input[0].name, uint8, x_shape)
    new_output = helper.make_tensor_value_info(g.output[0].name, uint8, y_shape)
    del g.node[:]
    g.node.extend(kept)
    g.input[0].CopyFrom(new_input)
    g.output[0].CopyFrom(new_output)
    return model.SerializeToString()


def call_overhead_graph() -> tuple[bytes, tuple[int, ...]]:
    """A graph that does next to nothing: its time is what every timed call pays besides the
    layer (the runtime's dispatch), subtracted from each layer's time."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["out"])],
        "overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "c"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), (1, 8)


def probe_graph(width: int, batch: int) -> tuple[bytes, tuple[int, ...]]:
    """The probe layer at one output width: a 3x3 conv from 64 channels, at a resolution that
    keeps a call near a millisecond whatever the batch."""
    hw = max(7, round(56 / max(1, batch) ** 0.5))
    config = LayerConfig("conv", 64, width, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, (hw, hw), True)
    return layer_onnx(config, 64, width, batch)


def channel_block(ms: Sequence[float], widths: Sequence[int] = PROBE_WIDTHS, *, step: float = 0.10) -> int:
    """The channel block the backend's kernels work in, read off one layer timed at widths 4
    apart. Latency that climbs in steps every B channels (AVX-512 ONNX Runtime pads convolution
    channels to 16: 52 and 64 output channels cost the same, 68 costs a third more) jumps by
    more than ``step`` after a multiple of B and nowhere else. The largest candidate B wins whose
    boundaries jump at least half the time, and off whose boundaries no jump exceeds ``step`` or
    half the median boundary jump (the steps are uneven: some are a few per cent). 1: no such staircase, latency is smooth in width (predictions
    interpolate and rounding buys nothing)."""
    t = np.asarray(ms, dtype=np.float64)
    w = np.asarray(widths, dtype=np.int64)
    if len(t) != len(w) or len(t) < 4 or not np.all(np.isfinite(t)) or np.any(t <= 0):
        return 1
    jumps = t[1:] / t[:-1] - 1.0
    for block in sorted(BLOCK_CANDIDATES, reverse=True):
        boundary = w[:-1] % block == 0
        if not boundary.any() or boundary.all():
            continue
        off, on = jumps[~boundary], jumps[boundary]
        # steps: at least half the boundaries jump, and nothing off them comes near a typical step
        # (latency linear in width jumps ~10 % per 4 channels at 36 and evenly everywhere)
        if np.all(off <= step) and np.mean(on > step) >= 0.5 and off.max() < 0.5 * np.median(on):
            return block
    return 1


def probe_channel_block(
    timer: LayerTimer, batch: int, transform: GraphTransform | None = None
) -> tuple[int, list[float]]:
    """Time the probe layer across ``PROBE_WIDTHS`` and read its channel block (``channel_block``)."""
    graphs = [probe_graph(width, batch) for width in PROBE_WIDTHS]
    if transform is not None:
        graphs = [(transform(*g), g[1]) for g in graphs]
    # two passes, the faster of each: one slow call (a stray process) must not fake a step
    ms = [min(a, b) for a, b in zip(*([timer(*g) for g in graphs] for _ in range(2)))]
    return channel_block(ms), ms


# --------------------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    """Per-layer tables of one network on one backend, plus the whole network's measured latency."""

    backend: str
    batch: int
    layers: dict[str, str]  # layer name -> configuration key
    tables: dict[str, LayerTable]  # configuration key -> table
    network_ms: float | None = None  # the unpruned network, exported whole, on the backend
    precision: str = "fp32"  # what the layers and network_ms were timed in
    # the unpruned network in FP32 where ``precision`` is not: the speed-up a target names counts from it
    reference_ms: float | None = None
    call_overhead_ms: float = 0.0  # already subtracted from every entry of ``tables``
    # the channel block the backend's kernels step by (``channel_block``; 1: smooth in width) and
    # the multiple the grid and a latency target's widths use (the block, or 8 where smooth)
    channel_block: int = 1
    multiple: int = 8
    # the one width below ``multiple`` the grid times and a latency target may keep (half the
    # channel block; 0: none). Kernels pad a width inside a block up to it, but one narrower
    # than the block can take another path: on this AVX-512 CPU's ONNX Runtime a 3x3 conv
    # reading 8 channels runs far faster than one reading 16, and without it a group as wide
    # as the block (the Fashion-MNIST ResNet-8's first stage) could not be narrowed at all
    narrow: int = 0
    probe_ms: list[float] = field(default_factory=list)
    build_seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        return self.tables[self.layers[name]].at(cin, cout)

    def to_json(self) -> dict:
        return {
            "version": TABLE_VERSION,
            "backend": self.backend,
            "batch": self.batch,
            "layers": self.layers,
            "tables": {
                k: {"config": asdict(t.config), "in_grid": t.in_grid, "out_grid": t.out_grid, "ms": t.ms}
                for k, t in self.tables.items()
            },
            "network_ms": self.network_ms,
            "precision": self.precision,
            "reference_ms": self.reference_ms,
            "call_overhead_ms": self.call_overhead_ms,
            "channel_block": self.channel_block,
            "multiple": self.multiple,
            "narrow": self.narrow,
            "probe_ms": self.probe_ms,
            "build_seconds": self.build_seconds,
            "environment": self.environment,
        }

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        tables = {}
        for k, t in data["tables"].items():
            c = t["config"]
            config = LayerConfig(
                **{**c, **{f: tuple(c[f]) for f in ("kernel", "stride", "padding", "dilation", "input_hw")}}
            )
            tables[k] = LayerTable(config, list(t["in_grid"]), list(t["out_grid"]), [list(r) for r in t["ms"]])
        return cls(
            backend=data["backend"],
            batch=int(data["batch"]),
            layers=dict(data["layers"]),
            tables=tables,
            network_ms=data.get("network_ms"),
            precision=str(data.get("precision", "fp32")),
            reference_ms=data.get("reference_ms"),
            call_overhead_ms=float(data.get("call_overhead_ms", 0.0)),
            channel_block=int(data["channel_block"]),
            multiple=int(data["multiple"]),
            narrow=int(data.get("narrow", 0)),
            probe_ms=[float(v) for v in data.get("probe_ms") or []],
            build_seconds=float(data.get("build_seconds", 0.0)),
            environment=dict(data.get("environment") or {}),
            cached=True,
        )

    def summary(self) -> dict[str, Any]:
        full = sum(self.tables[k].ms[-1][-1] for k in self.layers.values())
        return {
            "backend": self.backend,
            "batch": self.batch,
            "precision": self.precision,
            "reference_ms": self.reference_ms,
            "layers": len(self.layers),
            "configurations": len(self.tables),
            "grid_points": sum(len(t.in_grid) * len(t.out_grid) for t in self.tables.values()),
            "layers_sum_ms": full,
            "network_ms": self.network_ms,
            "channel_block": self.channel_block,
            "multiple": self.multiple,
            "narrow": self.narrow,
            "build_seconds": self.build_seconds,
            "cached": self.cached,
        }


def environment(backend: str, device: str, threads: int | None, precision: str = "fp32") -> dict[str, Any]:
    """What the table's numbers depend on besides the network: it keys the cache (an FP32
    table's key is what it was before precisions existed, so its cache entries stay valid)."""
    import onnxruntime

    from cascadec.envinfo import cpu_model, gpu_name

    return {
        "backend": backend,
        "device": device,
        "threads": threads,
        "cpu": cpu_model(),
        **({"gpu": gpu_name()} if device == "cuda" else {}),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        **({"precision": precision} if precision != "fp32" else {}),
    }


def _cache_file(configs: dict[str, LayerConfig], batch: int, grid_points: int, multiple: int | None, env: dict) -> Path:
    from cascadec.teacher import cache_root

    payload = json.dumps(
        {
            "v": TABLE_VERSION,
            "layers": {n: c.key() for n, c in configs.items()},
            "batch": batch,
            "grid": grid_points,
            "multiple": multiple or "auto",
            "env": env,
        },
        sort_keys=True,
    )
    return cache_root() / "latency" / f"{hashlib.sha256(payload.encode()).hexdigest()[:16]}.json"


def build_table(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    cost: CostModel | None = None,
    backend: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    grid_points: int = 4,
    multiple: int | None = None,
    timer: LayerTimer | None = None,
    network_ms: Callable[[], float] | None = None,
    reference_ms: Callable[[], float] | None = None,
    precision: str = "fp32",
    use_cache: bool = True,
    progress: bool = False,
) -> LatencyTable:
    """Measure (or load) the table. Only the axes a prunable group changes get a grid (``cost``
    says which: a layer whose inputs no group reaches is timed at its full input width).
    ``multiple`` None probes the backend's channel block first (``probe_channel_block``) and
    grids at its multiples: a grid at multiples of 8 on a backend that steps by 16 interpolates
    across the steps and predicts students faster than they are. ``precision`` int8 times the
    quantized graphs (``ort_timer``); ``reference_ms`` then times the unpruned network in FP32."""
    if backend not in LATENCY_BACKENDS:
        raise UserError(
            f"latency targets are measured on {' or '.join(LATENCY_BACKENDS)}; {backend!r} is not supported "
            "(a TensorRT table would need one engine build per grid point)"
        )
    check_precision(backend, precision)
    device = get_backend(backend).device
    if device == "cuda":
        from cascadec.backends.onnxruntime_backend import require_providers

        require_providers("cuda")
    configs = layer_configs(model, example_input)
    env = environment(backend, device, threads, precision)
    path = _cache_file(configs, batch, grid_points, multiple, env)
    if use_cache and path.is_file():
        try:
            return LatencyTable.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry is measured again and replaced
    timer = timer or ort_timer(device, threads)
    transform = int8_graph if precision == "int8" else None
    prunable_in, prunable_out = _prunable_axes(configs, cost)
    start = time.perf_counter()
    probe_ms: list[float] = []
    narrow = 0
    if multiple is None:
        block, probe_ms = probe_channel_block(timer, batch, transform)
        multiple = block if block > 1 else 8
        # a staircase backend: half a block may take another kernel path (LatencyTable.narrow);
        # a multiple the recipe fixes is kept to exactly
        narrow = block // 2 if block >= 8 else 0
    else:
        block = multiple
    tables: dict[str, LayerTable] = {}
    layers: dict[str, str] = {}
    jobs: dict[str, tuple[LayerConfig, list[int], list[int]]] = {}
    for name, config in configs.items():
        in_grid = (
            width_grid(config.in_channels, grid_points, multiple, narrow)
            if name in prunable_in
            else [config.in_channels]
        )
        out_grid = (
            width_grid(config.out_channels, grid_points, multiple, narrow)
            if name in prunable_out
            else [config.out_channels]
        )
        if config.depthwise:
            in_grid = sorted(set(in_grid) | set(out_grid)) if (name in prunable_in or name in prunable_out) else in_grid
            out_grid = [config.out_channels]
        elif config.kind == "conv" and config.groups > 1:
            # a grouped conv keeps whole positions of every group: widths are multiples of it
            in_grid, out_grid = (
                _whole_groups(in_grid, config.in_channels, config.groups),
                _whole_groups(out_grid, config.out_channels, config.groups),
            )
        key = json.dumps([config.key(), in_grid, out_grid])
        layers[name] = key
        jobs.setdefault(key, (config, in_grid, out_grid))
    from cascadec.progress import track

    items = list(jobs.items())
    points = {
        (key, cin, cout): layer_onnx(config, cin, cin if config.depthwise else cout, batch)
        for key, (config, in_grid, out_grid) in items
        for cin in in_grid
        for cout in out_grid
    }
    if transform is not None:
        keys = list(points)
        for k in track(keys, f"latency table: {precision} graphs") if progress else keys:
            points[k] = (transform(*points[k]), points[k][1])
    overhead = timer(*call_overhead_graph())
    for key, (config, in_grid, out_grid) in track(items, "latency table") if progress else items:
        ms = [[max(0.0, timer(*points[key, cin, cout]) - overhead) for cout in out_grid] for cin in in_grid]
        tables[key] = LayerTable(config, in_grid, out_grid, ms)
    table = LatencyTable(
        backend=backend,
        batch=batch,
        layers=layers,
        tables=tables,
        network_ms=network_ms() if network_ms else None,
        precision=precision,
        reference_ms=reference_ms() if reference_ms and precision != "fp32" else None,
        call_overhead_ms=overhead,
        channel_block=block,
        multiple=multiple,
        narrow=narrow,
        probe_ms=probe_ms,
        environment=env,
    )
    table.build_seconds = round(time.perf_counter() - start, 2)
    if use_cache:
        try:  # a cache that cannot be written costs the next run a rebuild, not this run
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, table.to_json(), indent=None)
        except (OSError, UserError) as exc:
            from cascadec.progress import log

            log(f"[yellow]latency table not cached ({first_line(exc)}): the next run times it again[/]")
    return table


def check_precision(backend: str, precision: str) -> None:
    """Refuse (exit 2) a precision the table cannot time, or one this backend runs no faster."""
    if precision not in LATENCY_PRECISIONS:
        raise UserError(f"prune.latency.precision {precision!r}: use {' or '.join(LATENCY_PRECISIONS)}")
    if backend not in LATENCY_PRECISIONS[precision]:
        raise UserError(
            f"prune.latency.precision {precision} is timed on {' or '.join(LATENCY_PRECISIONS[precision])} only; "
            f"{backend} has no int8 kernels worth targeting"
        )


def _whole_groups(grid: list[int], full: int, groups: int) -> list[int]:
    """Grid widths rounded up to multiples of a grouped conv's groups (never past its width)."""
    return sorted({min(full, -(-w // groups) * groups) for w in grid})


def _prunable_axes(configs: dict[str, LayerConfig], cost: CostModel | None) -> tuple[set[str], set[str]]:
    if cost is None:
        return set(configs), set(configs)
    names = cost.layer_names
    a_in = cost.a_in.sum(dim=1) > 0
    a_out = cost.a_out.sum(dim=1) > 0
    return {n for n, f in zip(names, a_in.tolist()) if f}, {n for n, f in zip(names, a_out.tolist()) if f}


def export_eval(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """``model`` exported as ``export`` exports it (eval mode, batch axis dynamic), its mode
    restored after: the table, the network timings and the refinement's meter all time that."""
    from cascadec.backends.onnx_export import export_onnx

    was_training = model.training
    try:
        export_onnx(model.eval(), example_input[:1], path)
    finally:
        model.train(was_training)


def network_pair_ms(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    batch: int,
    device: str,
    threads: int | None,
    rounds: int = 3,
    seconds: float = 1.0,
) -> tuple[float, float]:
    """The unpruned network in INT8 and in FP32 (in that order), timed in interleaved rounds
    (``profile_interleaved``): their ratio is what quantization alone gives, and a latency target
    in INT8 budgets the rest, so drift between two separate timings must not move it."""
    import tempfile

    from cascadec.profile.engines import profile_onnx
    from cascadec.profile.protocol import Timing, profile_interleaved
    from cascadec.quantize.ptq import int8_for_timing

    with tempfile.TemporaryDirectory(prefix="cascadec-latency-") as tmp:
        files = {"fp32": Path(tmp) / "network.onnx", "int8": Path(tmp) / "network.int8.onnx"}
        export_eval(model, example_input, files["fp32"])
        int8_for_timing(files["fp32"], files["int8"], (1, *example_input.shape[1:]), preprocess=True)

        def profile_one(which: str, share: Timing) -> dict:
            return profile_onnx(
                files[which],
                list(example_input.shape[1:]),
                [batch],
                device=device,
                timing=share,
                threads=threads,
                progress=False,
                keep_samples=True,
            )

        timing = Timing(warmup_s=0.2, min_duration_s=seconds, min_iters=20)
        pooled, _ = profile_interleaved(profile_one, ["fp32", "int8"], rounds=rounds, timing=timing)
    return pooled["int8"][batch]["p50_ms"], pooled["fp32"][batch]["p50_ms"]


def network_ms(model: nn.Module, example_input: torch.Tensor, *, batch: int, device: str, threads: int | None) -> float:
    """The whole network, exported as ``export`` exports it, timed on the backend."""
    import tempfile

    from cascadec.backends.onnxruntime_backend import _create_session

    with tempfile.TemporaryDirectory(prefix="cascadec-latency-") as tmp:
        path = Path(tmp) / "network.onnx"
        export_eval(model, example_input, path)
        session = _create_session(str(path), device, threads, "latency table network")
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((batch, *example_input.shape[1:]), dtype=np.float32)
        return median_ms(lambda: session.run(None, {name: x}), min_iters=20, min_seconds=1.0)
