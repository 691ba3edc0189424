"""A strict stand-in for the TensorRT 10 and 11 builder APIs, for CPU machines.

Only the names the TensorRT 10 Python API has (``tensorrt.Builder``, ``IBuilderConfig``,
``IOptimizationProfile``, ``OnnxParser``, ``IInt8EntropyCalibrator2``, ``ITimingCache``, the
``BuilderFlag`` / ``MemoryPoolType`` enums), with their parameter names, arity and types, as the
TensorRT 10 API reference gives them. Anything else fails: a misspelled method or a class that
does not exist is an AttributeError, swapped or missing arguments a TypeError, a calibrator that
returns something other than device pointers, or a profile whose shapes do not match the network,
an AssertionError. A build runs INT8 calibration the way TensorRT does (read the cache, pull
batches until ``get_batch`` returns None, write the cache) when the INT8 flag is set.

``pointers`` maps an address to the array behind it: tests make ``_to_device`` register CPU
arrays here, so calibration batches are checked for their shape without a GPU.

``version`` "11.x" gives TensorRT 11's surface: no ``BuilderFlag.FP16`` / ``BF16`` / ``INT8``,
no ``int8_calibrator`` or calibration profile, no calibrator classes, and every network strongly
typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` deprecated and ignored). Both versions
enforce what strong typing means: a strongly typed network refuses precision builder flags, and a
weakly typed one that holds Q/DQ nodes (seen in the parsed bytes) needs ``BuilderFlag.INT8``.
The parser refuses a DequantizeLinear of anything but INT8, FP8 or INT4 (an int32 bias), as
TensorRT's ONNX parser does.
"""

from __future__ import annotations

import enum
import types

import numpy as np
import onnx

# DequantizeLinear inputs TensorRT's ONNX parser takes (onnx-tensorrt's operator table: INT8; FP8
# and INT4 in TensorRT 10): an int32 bias DequantizeLinear (ONNX Runtime's QDQ default) is refused
_DQ_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT4}


def _unsupported_dequantize(blob: bytes) -> str | None:
    """The parser error for a DequantizeLinear whose quantized input is an initializer of another type."""
    if b"DequantizeLinear" not in blob:
        return None
    graph = onnx.load_from_string(blob).graph
    types = {init.name: init.data_type for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and types.get(node.input[0], onnx.TensorProto.INT8) not in _DQ_TYPES:
            name = onnx.TensorProto.DataType.Name(types[node.input[0]])
            return f"DequantizeLinear {node.name}: input of type {name}; expected INT8, FP8 or INT4"
    return None


def make(
    *,
    input_shape=(-1, 1, 28, 28),
    parse_ok: bool = True,
    build_ok: bool = True,
    builder_ok: bool = True,
    pointers: dict | None = None,
    version: str = "10.8.0",
):
    """``builder_ok`` False: ``Builder(logger)`` fails as pybind11 does when TensorRT's factory
    returns nullptr (a CUDA mismatch). A timing cache whose bytes are not this fake's own
    (``b"TIMING"``) or empty is one from another GPU or version: ``set_timing_cache`` returns
    False and keeps no cache, as TensorRT does with ``ignore_mismatch=False``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    events: list[tuple] = []
    trt.events = events
    pointers = {} if pointers is None else pointers

    flags = {"FP16": 0, "BF16": 1, "INT8": 2, "TF32": 3} if major < 11 else {"TF32": 3}
    BuilderFlag = enum.Enum("BuilderFlag", flags)
    WEAK_TYPING = {f for f in BuilderFlag if f.name in ("FP16", "BF16", "INT8")}

    class NetworkDefinitionCreationFlag(enum.Enum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 5

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0
        DLA_MANAGED_SRAM = 1

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity[n] for n in Severity.__members__)

        def __init__(self, min_severity=Severity.WARNING):
            assert isinstance(min_severity, Severity), f"Logger(min_severity=...) got {min_severity!r}"

    class ITensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, tuple(shape)

    class INetworkDefinition:
        def __init__(self, strongly_typed=False):
            self._inputs = []
            self.strongly_typed = strongly_typed
            self.qdq = False  # the parsed model holds QuantizeLinear / DequantizeLinear

        @property
        def num_inputs(self):
            return len(self._inputs)

        def get_input(self, index):
            if not isinstance(index, int):
                raise TypeError("get_input(index: int)")
            return self._inputs[index]

    class ParserError:
        def __init__(self, text):
            self._text = text

        def desc(self):
            return self._text

        def __str__(self):
            return f"In node 0: {self._text}"

    class OnnxParser:
        def __init__(self, network, logger):
            if not isinstance(network, INetworkDefinition) or not isinstance(logger, Logger):
                raise TypeError("OnnxParser(network: INetworkDefinition, logger: ILogger)")
            self._network, self._errors = network, []

        def parse(self, model, path=None):
            if not isinstance(model, (bytes, bytearray, memoryview)):
                raise TypeError("parse(model: buffer, path: str = None)")
            if not parse_ok:
                self._errors.append(ParserError("Unsupported ONNX op: FancyOp"))
                return False
            bad = _unsupported_dequantize(bytes(model))
            if bad:
                self._errors.append(ParserError(bad))
                return False
            self._network._inputs.append(ITensor("input", input_shape))
            self._network.qdq = b"QuantizeLinear" in bytes(model)
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's parameter names
            if not isinstance(input, str):
                raise TypeError("set_shape(input: str, min: Dims, opt: Dims, max: Dims)")
            dims = [tuple(int(d) for d in x) for x in (min, opt, max)]
            assert all(len(d) == len(input_shape) for d in dims), f"rank of {dims} is not the network's"
            for d in dims:
                assert d[1:] == tuple(input_shape[1:]), (
                    f"profile shape {d} does not match the network input {input_shape}"
                )
            assert all(a <= b <= c for a, b, c in zip(*dims)), f"min <= opt <= max does not hold for {dims}"
            self.shapes[input] = dims

    class IInt8Calibrator:
        pass

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        def __init__(self):
            self._base_initialised = True

    class ITimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return memoryview(b"TIMING")

    class IBuilderConfig:
        def __init__(self):
            self.flags, self.profiles, self.pools = set(), [], {}
            self.calibration_profile, self.timing_cache = None, None
            self._int8_calibrator = None

        def set_memory_pool_limit(self, pool, pool_size):
            if not isinstance(pool, MemoryPoolType) or not isinstance(pool_size, int) or isinstance(pool_size, bool):
                raise TypeError("set_memory_pool_limit(pool: MemoryPoolType, pool_size: int)")
            self.pools[pool] = pool_size

        def set_flag(self, flag):
            if not isinstance(flag, BuilderFlag):
                raise TypeError("set_flag(flag: BuilderFlag)")
            self.flags.add(flag)

        def clear_flag(self, flag):
            if not isinstance(flag, BuilderFlag):
                raise TypeError("clear_flag(flag: BuilderFlag)")
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("add_optimization_profile(profile: IOptimizationProfile)")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile):
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("set_calibration_profile(profile: IOptimizationProfile)")
            self.calibration_profile = profile
            return True

        @property
        def int8_calibrator(self):
            return self._int8_calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, calibrator):
            if not isinstance(calibrator, IInt8Calibrator) or not getattr(calibrator, "_base_initialised", False):
                raise TypeError("int8_calibrator must be an IInt8Calibrator whose base __init__ ran")
            self._int8_calibrator = calibrator

        def create_timing_cache(self, serialized_timing_cache):
            if not isinstance(serialized_timing_cache, (bytes, bytearray, memoryview)):
                raise TypeError("create_timing_cache(serialized_timing_cache: buffer)")
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise TypeError("set_timing_cache(cache: ITimingCache, ignore_mismatch: bool)")
            if cache.blob not in (b"", b"TIMING") and not ignore_mismatch:
                return False  # another GPU's or version's cache: rejected, nothing set
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

    class Builder:
        platform_has_fast_fp16 = True
        platform_has_fast_int8 = True

        def __init__(self, logger):
            if not isinstance(logger, Logger):
                raise TypeError("Builder(logger: ILogger)")
            if not builder_ok:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags=0):
            if not isinstance(flags, int):
                raise TypeError("create_network(flags: int = 0)")
            strongly_typed = major >= 11 or bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED.value))
            if strongly_typed:
                events.append(("network", "strongly typed"))
            return INetworkDefinition(strongly_typed)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
                raise TypeError("build_serialized_network(network: INetworkDefinition, config: IBuilderConfig)")
            assert network.num_inputs == 1, "the network was not parsed"
            assert config.profiles, "no optimisation profile: a dynamic batch axis cannot build"
            assert config.timing_cache is not None and MemoryPoolType.WORKSPACE in config.pools
            if network.strongly_typed and config.flags & WEAK_TYPING:
                events.append(("error", "precision flags on a strongly typed network"))
                return None
            if network.qdq and not network.strongly_typed and not any(f.name == "INT8" for f in config.flags):
                events.append(("error", "Q/DQ nodes in a weakly typed network without BuilderFlag.INT8"))
                return None
            if any(f.name == "INT8" for f in config.flags) and not network.qdq:
                _calibrate(config)
            events.append(("build", sorted(f.name for f in config.flags)))
            return memoryview(b"PLAN") if build_ok else None

    def _calibrate(config):
        calibrator = config.int8_calibrator
        assert calibrator is not None, "INT8 without a calibrator"
        assert config.calibration_profile is not None, "INT8 with a dynamic batch axis needs a calibration profile"
        shape = config.calibration_profile.shapes["input"][0]
        assert calibrator.get_batch_size() == shape[0]
        cached = calibrator.read_calibration_cache()
        if cached:
            events.append(("calibration cache read", len(cached)))
            return
        batches = 0
        while True:
            pointers_out = calibrator.get_batch(["input"])
            if pointers_out is None:
                break
            assert isinstance(pointers_out, list) and len(pointers_out) == 1, "get_batch must return [pointer]"
            assert all(isinstance(p, int) and not isinstance(p, bool) for p in pointers_out), (
                "get_batch must return device pointers (ints)"
            )
            array = pointers.get(pointers_out[0])
            assert array is not None, "get_batch returned an address that holds no batch"
            assert tuple(array.shape) == shape and array.dtype == np.float32, f"batch {array.shape} is not {shape}"
            batches += 1
        assert batches >= 1, "calibration saw no batch"
        calibrator.write_calibration_cache(memoryview(b"CALIB%d" % batches))
        events.append(("calibrated", batches))

    trt.BuilderFlag, trt.MemoryPoolType, trt.Logger = BuilderFlag, MemoryPoolType, Logger
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    if major < 11:
        trt.IInt8Calibrator, trt.IInt8EntropyCalibrator2 = IInt8Calibrator, IInt8EntropyCalibrator2
    else:  # TensorRT 11 removed implicit INT8 calibration
        del IBuilderConfig.int8_calibrator, IBuilderConfig.set_calibration_profile
    trt.IOptimizationProfile, trt.IBuilderConfig, trt.ITimingCache = IOptimizationProfile, IBuilderConfig, ITimingCache
    return trt
