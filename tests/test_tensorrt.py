"""TensorRT builder on a CPU machine: the missing-install error, and the API call order
against a small recording fake of the ``tensorrt`` module (no real engine is built here;
tests/gpu/test_tensorrt_gpu.py builds real ones on NVIDIA machines)."""

from __future__ import annotations

import json
import sys
import types

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

    trt.BuilderFlag = Enum("FP16", "INT8")
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
        create_timing_cache = rec("create_timing_cache", Cache())
        set_timing_cache = rec("set_timing_cache")
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
    expected = ["Logger", "Builder", "create_network", "OnnxParser", "parse", "create_builder_config",
                "set_memory_pool_limit", "create_optimization_profile", "profile.set_shape", "add_optimization_profile",
                "set_flag", "create_timing_cache", "set_timing_cache", "build_serialized_network", "get_timing_cache",
                "timing_cache.serialize"]
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
