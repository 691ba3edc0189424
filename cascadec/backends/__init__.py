"""Backends: one numpy-in/numpy-out runner per execution engine, chosen by name.

Names are what recipes and the CLI use, so the registry is the only place that
knows which class serves which name; aliases map onto one canonical name so
results are always keyed the same way in the report.

| name              | runs                                   | precision           |
|-------------------|----------------------------------------|---------------------|
| torch             | the PyTorch model                      | fp32                |
| onnxruntime       | student.onnx, CPU execution provider   | fp32                |
| onnxruntime-cuda  | student.onnx, CUDA execution provider  | fp32                |
| tensorrt          | student.plan (``cascadec export --trt``) | the engine's (metadata) |
| onnxruntime-trt   | student.onnx, TensorRT execution provider (CUDA, CPU behind it) | fp32 |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from cascadec.errors import UserError

Runner = Callable[[np.ndarray], np.ndarray]

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "onnxruntime-cuda", "tensorrt", "onnxruntime-trt")
ALIASES: dict[str, str] = {"ort": "onnxruntime", "ort-cuda": "onnxruntime-cuda", "trt": "tensorrt",
                           "ort-trt": "onnxruntime-trt", "onnxruntime-tensorrt": "onnxruntime-trt"}
# which ONNX Runtime device runs each ONNX-backed name
_ORT_DEVICE: dict[str, str] = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "tensorrt"}


def canonical_name(name: str) -> str:
    """Resolve aliases; unknown names are a user error listing the valid ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        valid = ", ".join([*BACKENDS, *ALIASES])
        raise UserError(f"unknown backend {name!r}; valid backends: {valid}")
    return key


def default_engine_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``student.onnx`` -> ``student.plan``: where ``cascadec export --trt`` writes the engine."""
    return Path(onnx_path).with_suffix(".plan")


def divergence_device(name: str) -> str:
    """The ONNX Runtime device that reproduces backend ``name`` for the first-divergent-layer search.

    TensorRT (engine or execution provider) runs on CUDA, so its intermediates are taken from
    the CUDA provider when onnxruntime-gpu is present (TensorRT fuses layers and keeps no
    per-node tensors to read), otherwise from the CPU.
    """
    key = canonical_name(name)
    if key in ("onnxruntime", "torch"):
        return "cpu"
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def get_runner(
    name: str,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    model: nn.Module | None = None,
    device: str = "cpu",
    engine_path: str | os.PathLike[str] | None = None,
) -> Runner:
    """Build the runner for ``name``; each backend needs the model, the ONNX file or the engine.

    ``device`` is the PyTorch device of the run; GPU backends pick CUDA (``cuda:N`` is kept
    when given). ``engine_path`` defaults to the ``.plan`` next to ``onnx_path``.
    """
    key = canonical_name(name)
    if key == "torch":
        if model is None:
            raise UserError("the torch backend needs a model")
        from cascadec.backends.torch_backend import TorchRunner

        return TorchRunner(model, device=device)
    gpu_device = device if str(device).startswith("cuda") else "cuda:0"
    if key == "tensorrt":
        from cascadec.backends.tensorrt_backend import TrtRunner, require_tensorrt

        require_tensorrt(gpu=True)  # one clear line on machines without TensorRT or a GPU
        if engine_path is None:
            if onnx_path is None:
                raise UserError("the tensorrt backend needs an engine (build one with 'cascadec export RUN --trt')")
            engine_path = default_engine_path(onnx_path)
        return TrtRunner(engine_path, device=gpu_device)
    if onnx_path is None:
        raise UserError(f"the {key} backend needs an ONNX file (export the model first)")
    from cascadec.backends.onnxruntime_backend import OrtRunner

    ort_device = _ORT_DEVICE[key]
    if key == "onnxruntime":
        ort_device = device  # historical: --device cuda with plain onnxruntime asks for the CUDA provider
    elif key == "onnxruntime-cuda":
        ort_device = gpu_device
    return OrtRunner(onnx_path, device=ort_device)


__all__ = ["ALIASES", "BACKENDS", "Runner", "canonical_name", "default_engine_path", "divergence_device", "get_runner"]
