"""TensorRT builder on a CPU machine: the missing-install error, and the API call order
against a small recording fake of the ``tensorrt`` module (no real engine is built here;
tests/gpu/test_tensorrt_gpu.py builds real ones on NVIDIA machines)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cascadec.backends import tensorrt_backend as trtb
from cascadec.errors import UserError


def test_missing_tensorrt_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(UserError, match=r"TensorRT is not installed: pip install 'cascadec\[gpu\]'"):
        trtb.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")


def test_tensorrt_without_gpu_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trtb, "cuda_device", lambda: None)
    with pytest.raises(UserError, match="no CUDA GPU"):
        trtb.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")


def test_profile_batches():
    assert trtb.profile_batches((32, 1, 8)) == (1, 8, 32)
    assert trtb.profile_batches((4,)) == (4, 4, 4)
    with pytest.raises(UserError):
        trtb.profile_batches(())


def fake_tensorrt(calls: list):
    """Just the TensorRT 10 surface build_engine uses; every call is appended to ``calls``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"

    def rec(name, result=None):
        def f(self, *args, **kwargs):  # used as methods: drop self
            calls.append((name, args))
            return result

        return f

    class Enum:
        def __init__(self, *names):
            for n in names:
                setattr(self, n, n)

    trt.BuilderFlag = Enum("FP16", "INT8", "TF32")
    trt.MemoryPoolType = Enum("WORKSPACE")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            calls.append(("Logger", (level,)))

    class Input:
        name, shape = "input", (-1, 1, 28, 28)

    class Network:
        num_inputs = 1
        get_input = staticmethod(lambda i: Input())

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            calls.append(("OnnxParser", ()))

        def parse(self, data):
            calls.append(("parse", (len(data),)))
            return True

    class Cache:
        serialize = rec("timing_cache.serialize", b"TIMING")

    class Profile:
        set_shape = rec("profile.set_shape")

    class Config:
        set_memory_pool_limit = rec("set_memory_pool_limit")
        add_optimization_profile = rec("add_optimization_profile")
        set_flag = rec("set_flag")
        clear_flag = rec("clear_flag")
        create_timing_cache = rec("create_timing_cache", Cache())
        set_timing_cache = rec("set_timing_cache", True)  # TensorRT returns whether it took the cache
        get_timing_cache = rec("get_timing_cache", Cache())

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder", ()))

        create_network = rec("create_network", Network())
        create_builder_config = rec("create_builder_config", Config())
        create_optimization_profile = rec("create_optimization_profile", Profile())
        build_serialized_network = rec("build_serialized_network", b"PLAN")

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    return trt


def test_build_engine_calls_the_api_in_order_and_writes_metadata(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(b"onnx-bytes")
    meta = trtb.build_engine(onnx, tmp_path / "student.plan", fp16=True, batches=(8, 1, 32, 2))

    names = [c[0] for c in calls]
    expected = [
        "Logger",
        "Builder",
        "create_network",
        "OnnxParser",
        "parse",
        "create_builder_config",
        "set_memory_pool_limit",
        "create_optimization_profile",
        "profile.set_shape",
        "add_optimization_profile",
        "set_flag",
        "create_timing_cache",
        "set_timing_cache",
        "build_serialized_network",
        "get_timing_cache",
        "timing_cache.serialize",
    ]
    assert names == expected
    args = dict(calls)
    assert args["create_network"] == (0,)  # explicit batch is implicit in TensorRT 10
    assert args["profile.set_shape"] == ("input", [1, 1, 28, 28], [8, 1, 28, 28], [32, 1, 28, 28])
    assert args["set_flag"] == ("FP16",)
    assert args["set_timing_cache"][1] is False

    assert (tmp_path / "student.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "student.timing.cache").read_bytes() == b"TIMING"
    written = json.loads((tmp_path / "student.plan.json").read_text())
    assert written == meta
    assert written["tensorrt"] == "10.99.0" and written["gpu"] == "Fake GPU" and written["compute_capability"] == "8.0"
    assert written["precision"] == "fp16" and written["max_batch"] == 32
    assert written["profile"] == {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [32, 1, 28, 28]}


def test_fp32_engine_turns_tf32_off(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(b"onnx-bytes")
    meta = trtb.build_engine(onnx, tmp_path / "student.plan")
    assert ("clear_flag", ("TF32",)) in calls and not any(c[0] == "set_flag" for c in calls)
    assert meta["precision"] == "fp32"


def test_int8_needs_calibration_images(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(UserError, match="calibration images"):
        trtb.build_engine(onnx, tmp_path / "m.plan", int8=True)
    with pytest.raises(UserError, match="calibration images"):
        trtb.build_engine(onnx, tmp_path / "m.plan", int8=True, calibration_images=np.zeros((0, 1, 28, 28), np.float32))


def test_fp16_on_tensorrt_without_the_flag_is_refused(monkeypatch, tmp_path):
    trt = fake_tensorrt([])
    trt.BuilderFlag = types.SimpleNamespace()  # TensorRT 11 removed BuilderFlag.FP16/INT8
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(UserError, match="BuilderFlag.FP16"):
        trtb.build_engine(onnx, tmp_path / "m.plan", fp16=True)


# ---------------------------------------------------------------- TrtRunner against a fake runtime


def fake_runtime(calls: list, registry: dict, io_dtypes: dict | None = None):
    """The TensorRT 10 runtime surface TrtRunner uses. ``registry`` maps a device pointer to the
    (CPU) tensor behind it, so the fake engine reads and writes through the addresses it is given.
    ``io_dtypes`` (tensor name -> "FLOAT" / "HALF" / "INT32", default FLOAT) is what the engine
    reports for its I/O; the engine refuses buffers of another dtype, as TensorRT reads raw bytes."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32")
    trt.nptype = lambda t: {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32}[t]
    io_dtypes = {"input": "FLOAT", "logits": "FLOAT", **(io_dtypes or {})}

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            calls.append(("Logger", (level,)))

    class Context:
        def __init__(self):
            self.addresses, self.shape = {}, None

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", (name, tuple(shape))))
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], 10) if name == "logits" else self.shape

        def set_tensor_address(self, name, ptr):
            calls.append(("set_tensor_address", (name,)))
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            calls.append(("execute_async_v3", (stream_handle,)))
            x, out = registry[self.addresses["input"]], registry[self.addresses["logits"]]
            for name, t in (("input", x), ("logits", out)):
                want = trt.nptype(io_dtypes[name])
                assert t.numpy().dtype == want, f"{name}: a {t.dtype} buffer for a {want.__name__} tensor"
            out.copy_(x.flatten(1)[:, :10] * 2 + 1)  # a known function of the input
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("input", "logits")[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_shape(self, name):
            return (-1, 1, 28, 28) if name == "input" else (-1, 10)

        def get_tensor_dtype(self, name):
            return io_dtypes[name]

        def get_tensor_profile_shape(self, name, profile_index):
            assert (name, profile_index) == ("input", 0)
            return [(1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28)]

        def create_execution_context(self):
            calls.append(("create_execution_context", ()))
            return Context()

    class Runtime:
        def __init__(self, logger):
            calls.append(("Runtime", ()))

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize_cuda_engine", (bytes(data),)))
            return Engine() if data == b"PLAN" else None  # TensorRT returns None for a bad plan

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


class FakeStream:
    cuda_stream = 1234

    def __init__(self, calls):
        self.calls = calls

    def synchronize(self):
        self.calls.append(("synchronize", ()))


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    import torch

    calls: list = []
    registry: dict = {}

    def device_empty(shape, dtype, device):
        t = torch.empty(tuple(shape), dtype=dtype)  # CPU stands in for the GPU
        registry[t.data_ptr()] = t
        return t

    def h2d(buffer, host, stream):
        calls.append(("h2d", (tuple(host.shape),)))
        assert host.dtype == buffer.dtype, f"a {host.dtype} host tensor copied into a {buffer.dtype} buffer"
        buffer.copy_(host)
        stream.synchronize()

    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime(calls, registry))
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    monkeypatch.setattr(trtb, "_cuda_stream", lambda device: FakeStream(calls))
    monkeypatch.setattr(trtb, "_device_empty", device_empty)
    monkeypatch.setattr(trtb, "_h2d", h2d)
    plan = tmp_path / "student.plan"
    plan.write_bytes(b"PLAN")
    (tmp_path / "student.plan.json").write_text(json.dumps({"tensorrt": "10.99.1", "precision": "fp16"}))
    return types.SimpleNamespace(calls=calls, plan=plan, dir=tmp_path, registry=registry)


def expected(x):
    return x.reshape(len(x), -1)[:, :10] * 2 + 1


@pytest.mark.parametrize(
    ("io_dtypes", "atol"),
    [({"input": "HALF", "logits": "HALF"}, 1e-2), ({"logits": "INT32"}, 0.0), ({"input": "HALF"}, 1e-2)],
)
def test_trt_runner_casts_to_and_from_the_engines_io_types(runtime, monkeypatch, io_dtypes, atol):
    """An FP16-I/O engine gets half-precision input bytes, an INT32 output comes back as float32:
    the runner converts on both sides (TensorRT reads and writes raw bytes of the engine's types)."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_runtime(runtime.calls, runtime.registry, io_dtypes))
    runner = trtb.TrtRunner(runtime.plan)
    x = np.random.default_rng(2).uniform(-4, 4, (3, 1, 28, 28)).astype(np.float32)
    if io_dtypes.get("logits") == "INT32":
        x = np.round(x)  # integer inputs: the engine's integer output is exact
    out = runner(x)
    assert out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_allclose(out, expected(x), rtol=1e-3, atol=atol)
    import torch

    assert runner._buffers["input"].dtype == {"HALF": torch.float16}.get(io_dtypes.get("input"), torch.float32)


def test_trt_runner_interface_and_call_order(runtime):
    runner = trtb.TrtRunner(runtime.plan)
    assert (runner.input_name, runner.output_name, runner.precision) == ("input", "logits", "fp16")
    assert runner.input_shape == (1, 28, 28) and runner.batch_range == (1, 32)
    assert runner.stream.cuda_stream == 1234
    assert [c[0] for c in runtime.calls] == ["Logger", "Runtime", "deserialize_cuda_engine", "create_execution_context"]

    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    runtime.calls.clear()
    runner.stage(x)
    assert [c[0] for c in runtime.calls] == [
        "set_input_shape",
        "set_tensor_address",
        "set_tensor_address",
        "h2d",
        "synchronize",
    ]
    assert runtime.calls[0][1] == ("input", (4, 1, 28, 28))
    runtime.calls.clear()
    runner.compute()
    assert runtime.calls == [("execute_async_v3", (1234,))]  # enqueue only: no copy, no synchronise
    runtime.calls.clear()
    out = runner.fetch()
    assert runtime.calls == [("synchronize", ())]
    np.testing.assert_allclose(out, expected(x), rtol=0, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (4, 10)


def test_trt_runner_reuses_buffers_until_the_batch_changes(runtime):
    runner = trtb.TrtRunner(runtime.plan)
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal((n, 1, 28, 28), dtype=np.float32) for n in (2, 2, 5))
    runtime.calls.clear()
    np.testing.assert_allclose(runner(a), expected(a), atol=1e-6)
    np.testing.assert_allclose(runner(b), expected(b), atol=1e-6)
    np.testing.assert_allclose(runner(c), expected(c), atol=1e-6)
    assert [c[1] for c in runtime.calls if c[0] == "set_input_shape"] == [
        ("input", (2, 1, 28, 28)),
        ("input", (5, 1, 28, 28)),
    ]


def test_trt_runner_input_errors(runtime):
    runner = trtb.TrtRunner(runtime.plan)
    with pytest.raises(RuntimeError, match="before stage"):
        runner.compute()
    with pytest.raises(UserError, match=r"does not match student.plan input \(N, 1, 28, 28\)"):
        runner(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(UserError, match=r"batch 33 is outside .* \(1\.\.32\)"):
        runner(np.zeros((33, 1, 28, 28), np.float32))


def test_trt_runner_refuses_bad_engines(runtime):
    with pytest.raises(UserError, match="TensorRT engine not found"):
        trtb.TrtRunner(runtime.dir / "nope.plan")
    with pytest.raises(UserError, match="runs on a CUDA device"):
        trtb.TrtRunner(runtime.plan, device="cpu")
    corrupt = runtime.dir / "corrupt.plan"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot deserialize this engine") as info:
        trtb.TrtRunner(corrupt)
    assert "\n" not in str(info.value)
    (runtime.dir / "student.plan.json").write_text(json.dumps({"tensorrt": "10.3.0", "precision": "fp32"}))
    with pytest.raises(UserError, match=r"built with TensorRT 10\.3\.0, this is TensorRT 10\.99\.0"):
        trtb.TrtRunner(runtime.plan)
    (runtime.dir / "student.plan.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable engine metadata"):
        trtb.TrtRunner(runtime.plan)


def test_trt_runner_without_metadata_assumes_fp32(runtime):
    (runtime.dir / "student.plan.json").unlink()
    with pytest.warns(UserWarning, match="assuming an fp32 engine"):
        runner = trtb.TrtRunner(runtime.plan)
    assert runner.precision == "fp32"


def test_tensorrt_backend_name_runs_the_runs_engine(runtime):
    from cascadec.backends import get_runner

    runner = get_runner("trt", onnx_path=runtime.dir / "student.onnx")
    assert isinstance(runner, trtb.TrtRunner) and runner.path == runtime.plan and runner.precision == "fp16"
    assert str(runner.device) == "cuda:0"
    x = np.ones((3, 1, 28, 28), np.float32)
    np.testing.assert_allclose(runner(x), expected(x), atol=1e-6)


def test_tensorrt_backend_without_tensorrt_is_one_line(monkeypatch, tmp_path):
    from cascadec.backends import get_runner

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match=r"TensorRT is not installed: pip install 'cascadec\[gpu\]'"):
        trtb.TrtRunner(tmp_path / "student.plan")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        get_runner("tensorrt", onnx_path=tmp_path / "student.onnx")


# ---------------------------------------------------------------- against the strict TensorRT 10 fake


@pytest.fixture
def strict(monkeypatch, tmp_path):
    """build_engine against tests/helpers/strict_tensorrt.py; calibration batches live on the CPU,
    registered by address so the fake can check what get_batch hands TensorRT."""
    import torch
    from helpers import strict_tensorrt

    pointers: dict = {}

    def to_device(host):
        tensor = torch.from_numpy(np.ascontiguousarray(host)).contiguous()
        pointers[int(tensor.data_ptr())] = tensor.numpy()
        return tensor

    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    monkeypatch.setattr(trtb, "_to_device", to_device)
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(b"onnx-bytes")

    def build(*, parse_ok=True, build_ok=True, **kwargs):
        trt = strict_tensorrt.make(parse_ok=parse_ok, build_ok=build_ok, pointers=pointers)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt, trtb.build_engine(onnx, tmp_path / "student.plan", **kwargs)

    return build, tmp_path


def test_strict_fp32_and_fp16_builds(strict):
    build, tmp_path = strict
    trt, meta = build(batches=(1, 8, 32))
    assert trt.events == [("build", [])] and meta["precision"] == "fp32"  # TF32 cleared
    trt, meta = build(fp16=True, batches=(1, 8, 32))
    assert trt.events == [("build", ["FP16"])] and meta["precision"] == "fp16"
    assert (tmp_path / "student.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "student.timing.cache").read_bytes() == b"TIMING"


def test_strict_int8_calibrates_then_reuses_only_its_own_cache(strict):
    build, tmp_path = strict
    images = np.random.default_rng(0).standard_normal((40, 1, 28, 28), dtype=np.float32)
    trt, meta = build(int8=True, batches=(1, 8, 16), calibration_images=images)
    assert ("calibrated", 2) in trt.events  # 40 images in batches of 16 (the profile's maximum): 2 full batches
    cache = Path(meta["calibration_cache"])
    assert cache.read_bytes() == b"CALIB2" and meta["calibration_images"] == 40
    trt, again = build(int8=True, batches=(1, 8, 16), calibration_images=images)
    assert ("calibration cache read", 6) in trt.events and again["calibration_cache"] == str(cache)
    trt, other = build(int8=True, batches=(1, 8, 16), calibration_images=images[:20])
    assert ("calibrated", 1) in trt.events and other["calibration_cache"] != str(cache)  # other images: recalibrated


def test_strict_parse_and_build_failures_are_user_errors(strict):
    build, tmp_path = strict
    with pytest.raises(UserError, match="cannot parse this ONNX file.*Unsupported ONNX op: FancyOp"):
        build(parse_ok=False)
    with pytest.raises(UserError, match="failed to build an engine"):
        build(build_ok=False)
    assert not list(tmp_path.glob("student.plan*"))  # a failed build leaves no engine and no metadata


def test_a_builder_tensorrt_cannot_create_is_one_line(monkeypatch, tmp_path):
    """TensorRT's factory returns nullptr on a CUDA mismatch (pybind11 raises TypeError): exit 2, one line."""
    from helpers import strict_tensorrt

    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 0)))
    monkeypatch.setitem(sys.modules, "tensorrt", strict_tensorrt.make(builder_ok=False))
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(b"onnx-bytes")
    with pytest.raises(UserError, match="could not create a builder.*nullptr.*nvidia-smi"):
        trtb.build_engine(onnx, tmp_path / "student.plan")
    assert not list(tmp_path.glob("student.plan*"))


def test_a_timing_cache_from_another_gpu_is_replaced_not_fatal(strict):
    """set_timing_cache returns False for another GPU's cache (and keeps none): start a new one."""
    build, tmp_path = strict
    (tmp_path / "student.timing.cache").write_bytes(b"FROM-ANOTHER-GPU")
    with pytest.warns(UserWarning, match="timing cache from another GPU"):
        trt, meta = build(batches=(1, 8, 32))
    assert trt.events == [("build", [])] and meta["precision"] == "fp32"
    assert (tmp_path / "student.timing.cache").read_bytes() == b"TIMING"  # the build's own cache replaced it


# ---------------------------------------------------------------- strongly typed: TensorRT 10 and 11


@pytest.fixture(scope="module")
def typed_graphs(tmp_path_factory):
    """A tiny network as cascadec quantize writes it for TensorRT: FP32, Q/DQ INT8 (the TensorRT
    flavour, S8S8) and FP16, each a real ONNX file."""
    import torch

    from cascadec.backends.onnx_export import export_onnx
    from cascadec.quantize.flavours import get_flavour
    from cascadec.quantize.ptq import convert_fp16, quantize_int8

    root = tmp_path_factory.mktemp("typed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 28 * 28, 10)
    ).eval()
    fp32 = root / "student.onnx"
    export_onnx(model, torch.zeros(1, 1, 28, 28), fp32)
    images = np.random.default_rng(0).standard_normal((8, 1, 28, 28), dtype=np.float32)
    quantize_int8(fp32, root / "student.int8.trt.onnx", get_flavour("tensorrt"), images)
    convert_fp16(fp32, root / "student.fp16.onnx")
    return root


def _strict_build(monkeypatch, tmp_path, onnx, version, **kwargs):
    from helpers import strict_tensorrt

    trt = strict_tensorrt.make(version=version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trtb, "cuda_device", lambda: ("Fake GPU", (8, 9)))
    return trt, trtb.build_engine(onnx, tmp_path / "student.plan", batches=(1, 8), **kwargs)


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
@pytest.mark.parametrize("name, precision", [("student.int8.trt.onnx", "int8"), ("student.fp16.onnx", "fp16")])
def test_qdq_and_fp16_graphs_build_strongly_typed(typed_graphs, monkeypatch, tmp_path, version, name, precision):
    """The graph names its types: a strongly typed network, no precision flag, no calibrator, one
    code path on TensorRT 10 and 11; the metadata says what the engine computes in."""
    trt, meta = _strict_build(monkeypatch, tmp_path, typed_graphs / name, version)
    assert ("network", "strongly typed") in trt.events and trt.events[-1] == ("build", [])
    assert meta["precision"] == precision and meta["strongly_typed"] and meta["calibration_cache"] is None
    for flag in ("fp16", "int8"):  # the graph's own precision: no builder flag on top of it
        with pytest.raises(UserError, match=f"already {precision.upper()}"):
            _strict_build(monkeypatch, tmp_path, typed_graphs / name, version, **{flag: True})


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
def test_an_int32_bias_dequantize_is_refused_by_the_parser(typed_graphs, monkeypatch, tmp_path, version):
    """ONNX Runtime's QDQ default quantizes biases to int32 with a DequantizeLinear, which TensorRT's
    parser does not take: the TensorRT flavour keeps biases float, and a file that has one fails with
    the parser's error in one line."""
    from cascadec.quantize.flavours import get_flavour
    from cascadec.quantize.ptq import quantize_int8

    flavour = get_flavour("tensorrt")
    assert flavour.quantize_kwargs()["extra_options"]["QuantizeBias"] is False
    images = np.random.default_rng(0).standard_normal((8, 1, 28, 28), dtype=np.float32)
    biased = tmp_path / "biased.onnx"
    with monkeypatch.context() as mp:
        mp.setattr(type(flavour), "quantize_kwargs", _with_int32_bias(type(flavour).quantize_kwargs))
        quantize_int8(typed_graphs / "student.onnx", biased, flavour, images)
    with pytest.raises(UserError, match="DequantizeLinear.*INT32"):
        _strict_build(monkeypatch, tmp_path, biased, version)


def _with_int32_bias(kwargs):
    def patched(self, reduce_range=False):
        out = kwargs(self, reduce_range)
        out["extra_options"] = {**out["extra_options"], "QuantizeBias": True}
        return out

    return patched


def test_a_weakly_typed_qdq_network_fails_on_tensorrt_10(typed_graphs, monkeypatch, tmp_path):
    """What strong typing buys: without the flag, TensorRT 10 refuses Q/DQ nodes unless INT8 is set."""
    monkeypatch.setattr(trtb, "_network_flags", lambda trt, strongly_typed: 0)
    with pytest.raises(UserError, match="failed to build"):
        _strict_build(monkeypatch, tmp_path, typed_graphs / "student.int8.trt.onnx", "10.8.0")


def test_tensorrt_11_builds_fp32_and_refuses_the_removed_flags(typed_graphs, monkeypatch, tmp_path):
    trt, meta = _strict_build(monkeypatch, tmp_path, typed_graphs / "student.onnx", "11.0.0")
    assert meta["precision"] == "fp32" and trt.events[-1] == ("build", [])  # TF32 cleared
    assert meta["strongly_typed"] is True  # every TensorRT 11 network is
    _, meta10 = _strict_build(monkeypatch, tmp_path, typed_graphs / "student.onnx", "10.8.0")
    assert meta10["strongly_typed"] is False  # TensorRT 10 builds an FP32 graph weakly typed
    for flag in ("fp16", "int8"):
        with pytest.raises(UserError, match=f"no BuilderFlag.{flag.upper()}.*cascadec quantize"):
            _strict_build(monkeypatch, tmp_path, typed_graphs / "student.onnx", "11.0.0", **{flag: True})
