"""TensorRT backend: build a serialized engine (``.plan``) from an ONNX file.

Written against the TensorRT 10 Python API:

* networks are always explicit-batch in TensorRT 10, so ``create_network(0)``
  (``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is deprecated and ignored there);
* a graph that carries its own precision (``cascadec quantize``'s Q/DQ INT8
  ``student.int8.trt.onnx`` or FP16 ``student.fp16.onnx``) is built as a **strongly typed**
  network: TensorRT 10 with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, TensorRT 11 always
  (the flag deprecated and ignored there), with no precision builder flag and no calibrator, so
  one code path serves both; the engine computes in the types the graph names;
* one optimisation profile covers the batch sizes (min / opt / max);
* ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` select reduced precision. INT8 uses implicit
  quantisation with an ``IInt8EntropyCalibrator2`` over calibration images (deprecated since
  10.1 in favour of explicit Q/DQ quantisation, still supported in 10.x; both flags and the
  calibrator are removed in TensorRT 11, where this refuses fp16/int8 with a clear message);
* ``Builder.platform_has_fast_fp16/int8`` are deprecated since 10.5 ("query CUDA directly"), so
  fast fp16/int8 support is read from the compute capability (torch.cuda) and only falls back
  to the builder's properties when they exist;
* fp32 engines clear ``BuilderFlag.TF32`` (on by default since TensorRT 7.1 on Ampere+), so
  "fp32" in the metadata means fp32 arithmetic and the fp32 parity tolerances apply;
* a timing cache (``create_timing_cache`` / ``set_timing_cache`` / ``get_timing_cache``) makes
  rebuilds fast; it is kept next to the engine (or in ``cache_dir``).

Running an engine (:class:`TrtRunner`) uses the TensorRT 10 tensor-address API:
``Runtime.deserialize_cuda_engine``, ``engine.create_execution_context``,
``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``, ``context.set_input_shape``,
``context.set_tensor_address`` and ``context.execute_async_v3(stream_handle)``; device buffers
and the stream are torch.cuda objects (no pycuda / cuda-python dependency).

``require_tensorrt()`` is what every entry point calls first, so machines without TensorRT or
without a CUDA GPU get one line saying what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cascadec.backends.runner import BaseRunner
from cascadec.errors import UserError, first_line
from cascadec.fileio import write_bytes_atomic, write_text_atomic

INSTALL_HINT = "pip install 'cascadec[gpu]' on a machine with an NVIDIA GPU (TensorRT needs CUDA)"
WORKSPACE_BYTES = 1 << 30
# fast fp16 arithmetic from sm_53 (tensor cores from sm_70); fast int8 (dp4a) from sm_61
FP16_MIN_CAPABILITY = (5, 3)
INT8_MIN_CAPABILITY = (6, 1)
CALIBRATION_BATCH = 32


def cuda_device() -> tuple[str, tuple[int, int]] | None:
    """(GPU name, compute capability) of CUDA device 0 through torch, or None without a GPU."""
    try:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    except Exception:  # a torch without CUDA support, a broken driver: no usable GPU
        return None


def require_tensorrt(*, gpu: bool = False) -> ModuleType:
    """Import TensorRT or explain how to get it; with ``gpu``, also insist on a CUDA GPU."""
    try:
        import tensorrt  # type: ignore[import-not-found]  # heavy and optional: imported only here
    except ImportError as exc:
        raise UserError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install (missing libnvinfer...) is as unusable as none
        raise UserError(f"TensorRT is installed but fails to import ({exc}): {INSTALL_HINT}") from exc
    if gpu and cuda_device() is None:
        raise UserError(
            f"TensorRT is installed but no CUDA GPU is visible (torch.cuda.is_available() is False): {INSTALL_HINT}"
        )
    return tensorrt


def profile_batches(batches: Sequence[int]) -> tuple[int, int, int]:
    """min / opt / max batch of the optimisation profile: smallest, the middle one, largest."""
    values = sorted({int(b) for b in batches})
    if not values or values[0] < 1:
        raise UserError(f"TensorRT profile batches must be positive integers, got {list(batches)!r}")
    return values[0], values[len(values) // 2], values[-1]


def _to_device(host: np.ndarray) -> Any:
    """A contiguous CUDA copy of ``host`` (a torch tensor, so ``data_ptr()`` is its address)."""
    return torch.from_numpy(np.ascontiguousarray(host)).to("cuda").contiguous()


def _make_calibrator(trt: ModuleType, images: np.ndarray, cache_path: Path, batch_size: int):
    """An IInt8EntropyCalibrator2 over ``images`` (N x C x H x W float32), cached in ``cache_path``.

    Device buffers come from torch.cuda (no pycuda / cuda-python dependency); TensorRT reads
    the pointer returned by ``get_batch`` while the tensor is alive (kept on ``self``)."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.images = np.ascontiguousarray(images, dtype=np.float32)
            self.batch_size = batch_size
            self.index = 0
            self.device_batch = None

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names):  # noqa: ARG002 - one input
            if self.index + self.batch_size > len(self.images):
                return None

            host = self.images[self.index : self.index + self.batch_size]
            self.index += self.batch_size
            self.device_batch = _to_device(host)  # kept alive on self while TensorRT reads it
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            write_bytes_atomic(cache_path, bytes(cache))

    return EntropyCalibrator()


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    int8: bool = False,
    batches: tuple[int, ...] = (1, 8, 32),
    calibration_images: np.ndarray | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict:
    """Build ``engine_path`` from ``onnx_path``; write ``<engine>.json`` metadata; return it.

    An ONNX file whose graph is already INT8 (Q/DQ) or FP16 is built strongly typed and takes
    neither ``fp16`` nor ``int8`` (``_network_flags``); ``fp16``/``int8`` on an FP32 graph are
    TensorRT 10's builder flags (weakly typed; INT8 through the implicit calibrator).

    Timing cache: ``<engine stem>.timing.cache`` next to the engine (or in ``cache_dir``);
    INT8 calibration cache: ``<engine stem>.calib-<images>-<digest>.cache`` in the same place."""
    trt = require_tensorrt(gpu=True)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX file not found; run cascadec export first")
    from cascadec.backends.onnxruntime_backend import graph_precision

    typed = graph_precision(onnx_path)  # int8 / fp16: the graph names its own types
    if typed != "fp32" and (fp16 or int8):
        raise UserError(
            f"{onnx_path} is already {typed.upper()} (its precision is in the graph): build it without --fp16/--int8"
        )
    for flag, wanted in (("FP16", fp16), ("INT8", int8)):
        if wanted and not hasattr(trt.BuilderFlag, flag):
            raise UserError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (removed in TensorRT 11): build the "
                f"{flag} ONNX instead (cascadec quantize RUN_DIR; export --trt --{flag.lower()} uses it)"
            )
    if int8 and (calibration_images is None or len(calibration_images) == 0):
        raise UserError("an INT8 engine needs calibration images (a few hundred training images)")
    bmin, bopt, bmax = profile_batches(batches)
    cache_root = Path(cache_dir) if cache_dir is not None else engine_path.parent
    cache_root.mkdir(parents=True, exist_ok=True)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    timing_path = cache_root / f"{engine_path.stem}.timing.cache"
    # keyed by the images, so a cache made from other images (another --calib-images) is never reused
    calib_key = (
        f"{len(calibration_images)}-{hashlib.sha256(np.ascontiguousarray(calibration_images).tobytes()).hexdigest()[:12]}"
        if int8
        else "none"
    )
    calib_path = cache_root / f"{engine_path.stem}.calib-{calib_key}.cache"
    device = cuda_device()
    gpu_name, capability = device if device else (None, None)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = _builder(trt, logger)
    network = builder.create_network(_network_flags(trt, strongly_typed=typed != "fp32"))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse this ONNX file ({errors or 'no detail'})")
    if network.num_inputs != 1:
        raise UserError(f"{onnx_path}: expected one input, found {network.num_inputs}")
    inp = network.get_input(0)
    chw = [int(d) for d in tuple(inp.shape)[1:]]
    if any(d < 1 for d in chw):
        raise UserError(f"{onnx_path}: only the batch axis may be dynamic, input shape is {list(inp.shape)}")
    shapes = {"min": [bmin, *chw], "opt": [bopt, *chw], "max": [bmax, *chw]}

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    if not fp16 and not int8 and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT enables TF32 (10-bit mantissa) by default on Ampere and later; an engine
        # recorded as fp32 must compute in fp32, or it fails the fp32 parity tolerances
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        if not _fast(builder, "platform_has_fast_fp16", capability, FP16_MIN_CAPABILITY):
            warnings.warn(
                f"{gpu_name or 'this GPU'} has no fast FP16; the FP16 engine may be no faster than FP32", stacklevel=2
            )
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        if not _fast(builder, "platform_has_fast_int8", capability, INT8_MIN_CAPABILITY):
            warnings.warn(f"{gpu_name or 'this GPU'} has no fast INT8; the INT8 engine may be slow", stacklevel=2)
        config.set_flag(trt.BuilderFlag.INT8)
        cal_batch = max(1, min(CALIBRATION_BATCH, bmax, len(calibration_images)))
        calib_profile = builder.create_optimization_profile()
        calib_shape = [cal_batch, *chw]
        calib_profile.set_shape(inp.name, calib_shape, calib_shape, calib_shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _make_calibrator(trt, calibration_images, calib_path, cal_batch)

    _set_timing_cache(config, timing_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    write_bytes_atomic(engine_path, bytes(memoryview(serialized)))
    timing = config.get_timing_cache()
    if timing is not None:
        write_bytes_atomic(timing_path, bytes(memoryview(timing.serialize())))

    precision = typed if typed != "fp32" else "int8" if int8 else "fp16" if fp16 else "fp32"
    meta: dict[str, Any] = {
        "engine": str(engine_path),
        "onnx": str(onnx_path),
        "tensorrt": str(trt.__version__),
        "gpu": gpu_name,
        "compute_capability": f"{capability[0]}.{capability[1]}" if capability else None,
        "precision": precision,
        "strongly_typed": typed != "fp32" or _major(trt) >= 11,  # every TensorRT 11 network is
        "fp16": bool(fp16),
        "int8": bool(int8),
        "input": inp.name,
        "profile": shapes,
        "max_batch": bmax,
        "timing_cache": str(timing_path),
        "calibration_cache": str(calib_path) if int8 else None,
        "calibration_images": int(len(calibration_images)) if int8 else 0,
    }
    write_text_atomic(metadata_path(engine_path), json.dumps(meta, indent=2) + "\n")
    return meta


def _network_flags(trt: ModuleType, *, strongly_typed: bool) -> int:
    """``create_network``'s flags: 0 (explicit batch, the only mode since TensorRT 10), or for
    a graph that names its own types, strongly typed: TensorRT 10 needs
    ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 networks are strongly typed
    always and ignore the deprecated flag, so none is passed there."""
    if not strongly_typed:
        return 0
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if _major(trt) >= 11:
        return 0
    if flag is None:
        raise UserError(
            f"TensorRT {trt.__version__} cannot build a strongly typed network (needs TensorRT 10 or later) from a "
            "graph that names its own precision"
        )
    return 1 << int(flag.value if hasattr(flag, "value") else flag)


def _major(trt: ModuleType) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def _builder(trt: ModuleType, logger: Any) -> Any:
    """``trt.Builder``, or one line (exit 2) where TensorRT cannot make one: its factory returns
    nullptr (pybind11 raises TypeError, older bindings return None) when TensorRT's CUDA does not
    match the driver or no GPU is usable, which would otherwise surface as an internal error."""
    try:
        builder = trt.Builder(logger)
        detail = "it returned nothing"
    except (TypeError, RuntimeError) as exc:
        builder, detail = None, first_line(exc)
    if builder is None:
        raise UserError(
            f"TensorRT {trt.__version__} could not create a builder ({detail}): usually TensorRT's CUDA does not "
            "match the driver (`nvidia-smi` shows the driver's CUDA version) or no GPU is usable"
        )
    return builder


def _set_timing_cache(config: Any, path: Path) -> None:
    """The timing cache at ``path``, or an empty one where TensorRT rejects it (made on another
    GPU or TensorRT version: ``set_timing_cache`` returns False and keeps none, and the build's
    cache is then written over it)."""
    stored = path.read_bytes() if path.is_file() else b""
    # ignore_mismatch=False: a cache from another GPU is rejected rather than used
    if config.set_timing_cache(config.create_timing_cache(stored), False):
        return
    warnings.warn(f"{path}: timing cache from another GPU or TensorRT version; starting a new one", stacklevel=3)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise UserError("TensorRT refused an empty timing cache; the build cannot record its tactics")


def metadata_path(engine_path: str | os.PathLike[str]) -> Path:
    """``student.plan`` -> ``student.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _fast(builder: Any, attr: str, capability: tuple[int, int] | None, minimum: tuple[int, int]) -> bool:
    if capability is not None:
        return tuple(capability) >= minimum
    return bool(getattr(builder, attr, False))


# ---------------------------------------------------------------- running an engine


def read_metadata(engine_path: str | os.PathLike[str]) -> dict | None:
    """The ``<engine>.json`` build_engine wrote, or None for an engine built elsewhere."""
    path = metadata_path(engine_path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path}: unreadable engine metadata ({type(exc).__name__}); rebuild with 'cascadec export RUN --trt'"
        ) from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: engine metadata is not a JSON object; rebuild with 'cascadec export RUN --trt'")
    return meta


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def _cuda_stream(device: Any) -> Any:
    """A dedicated stream, so compute() never serialises behind unrelated work on the default one."""
    return torch.cuda.Stream(device=device)


def _device_empty(shape: Sequence[int], dtype: Any, device: Any) -> Any:
    return torch.empty(tuple(int(d) for d in shape), dtype=dtype, device=device)


def _h2d(buffer: Any, host: Any, stream: Any) -> None:
    """Host -> device copy ordered on ``stream``, finished before returning."""
    with torch.cuda.stream(stream):
        buffer.copy_(host)
    stream.synchronize()


def _torch_dtype(trt: ModuleType, trt_dtype: Any) -> Any:
    """TensorRT DataType -> torch dtype via numpy (``trt.nptype``)."""
    try:
        return torch.from_numpy(np.empty(0, dtype=trt.nptype(trt_dtype))).dtype
    except Exception as exc:  # bf16/fp8 engine I/O has no numpy type: not an engine cascadec builds
        raise UserError(f"TensorRT engine I/O type {trt_dtype} is not supported by cascadec's runner") from exc


class TrtRunner(BaseRunner):
    """Run a serialized TensorRT engine: numpy in, numpy out, like every other runner.

    ``stage`` / ``compute`` / ``fetch`` split one call so latency code can time the engine
    alone (``compute`` enqueues on :attr:`stream` without host copies or synchronisation)
    apart from the host<->device copies. Device buffers are torch.cuda tensors, kept and
    reused while the batch size stays the same.
    """

    def __init__(self, engine_path: str | os.PathLike[str], device: str = "cuda:0") -> None:
        trt = require_tensorrt(gpu=True)

        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: TensorRT engine not found; build it with 'cascadec export RUN --trt'")
        if not str(device).startswith("cuda"):
            raise UserError(f"TensorRT runs on a CUDA device, not {device!r}")
        self.meta = read_metadata(self.path)
        built_with = (self.meta or {}).get("tensorrt")
        if built_with and _major_minor(built_with) != _major_minor(trt.__version__):
            # engines are not portable across TensorRT versions; deserialising one only logs an error
            raise UserError(
                f"{self.path}: built with TensorRT {built_with}, this is TensorRT {trt.__version__}; "
                "rebuild it with 'cascadec export RUN --trt'"
            )
        self.precision: str = str((self.meta or {}).get("precision") or "fp32")
        self._trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        try:
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as exc:  # some versions raise instead of returning None
            raise UserError(
                f"{self.path}: TensorRT cannot deserialize this engine ({exc}); it is corrupt or was built "
                "with another TensorRT version or GPU; rebuild with 'cascadec export RUN --trt'"
            ) from None
        if self.engine is None:
            raise UserError(
                f"{self.path}: TensorRT cannot deserialize this engine (corrupt, or built with another "
                "TensorRT version or GPU); rebuild with 'cascadec export RUN --trt'"
            )
        if self.meta is None:  # an engine built by trtexec or elsewhere: its precision is not recorded
            warnings.warn(
                f"{self.path}: no {metadata_path(self.path).name}; assuming an fp32 engine for the parity tolerances",
                stacklevel=2,
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise UserError(
                f"{self.path}: expected one input and at least one output, found inputs {inputs}, outputs {outputs}"
            )
        self.input_name: str = inputs[0]
        self.output_name: str = outputs[0]
        self.output_names: list[str] = outputs
        self.input_shape: tuple[int, ...] = tuple(
            int(d) for d in tuple(self.engine.get_tensor_shape(self.input_name))[1:]
        )
        self.batch_range: tuple[int, int] = self._batch_range()
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = _cuda_stream(self.device)
        self._buffers: dict[str, Any] = {}
        self._batch: int | None = None
        self._staged = False

    def _batch_range(self) -> tuple[int, int]:
        """Smallest and largest batch of optimisation profile 0, from the engine or its metadata."""
        try:
            shapes = self.engine.get_tensor_profile_shape(self.input_name, 0)
            return int(tuple(shapes[0])[0]), int(tuple(shapes[2])[0])
        except Exception:  # an engine without profiles (static shapes) or an older binding
            profile = (self.meta or {}).get("profile") or {}
            if profile.get("min") and profile.get("max"):
                return int(profile["min"][0]), int(profile["max"][0])
            return 1, 1 << 30

    def _check(self, x: np.ndarray) -> None:
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            dims = ", ".join(map(str, self.input_shape))
            raise UserError(f"input shape {tuple(x.shape)} does not match {self.path.name} input (N, {dims})")
        low, high = self.batch_range
        if not low <= x.shape[0] <= high:
            raise UserError(
                f"batch {x.shape[0]} is outside {self.path.name}'s optimisation profile ({low}..{high}); "
                "rebuild the engine with that batch size in --batch / profile.batches"
            )

    def _bind(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate device buffers for a new batch size and hand their addresses to TensorRT."""
        if not self.context.set_input_shape(self.input_name, shape):
            raise UserError(f"TensorRT rejected input shape {shape} for {self.path.name}")
        self._buffers = {self.input_name: _device_empty(shape, self._dtypes[self.input_name], self.device)}
        for name in self.output_names:
            out_shape = tuple(int(d) for d in tuple(self.context.get_tensor_shape(name)))
            self._buffers[name] = _device_empty(out_shape, self._dtypes[name], self.device)
        for name, buffer in self._buffers.items():
            self.context.set_tensor_address(name, int(buffer.data_ptr()))
        self._batch = shape[0]

    def stage(self, x: np.ndarray) -> None:
        """Copy ``x`` into the device input buffer (synchronously); set shapes and addresses."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._check(x)
        if self._batch != x.shape[0]:
            self._bind(tuple(int(d) for d in x.shape))
        _h2d(self._buffers[self.input_name], torch.from_numpy(x).to(self._dtypes[self.input_name]), self.stream)
        self._staged = True

    def compute(self) -> None:
        """Enqueue one inference on :attr:`stream`; no host copies, no synchronisation."""
        if not self._staged:
            raise RuntimeError("TrtRunner.compute() before stage(): no input on the device")
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError(f"TensorRT failed to enqueue {self.path.name} (see the TensorRT log above)")

    def fetch(self) -> np.ndarray:
        """Wait for the stream, then copy the first output to the host as float32."""
        self.stream.synchronize()
        return self._buffers[self.output_name].float().cpu().numpy()

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.stage(x)
        self.compute()
        return self.fetch()
