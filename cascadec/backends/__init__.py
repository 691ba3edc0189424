"""Backends: one numpy-in/numpy-out runner per execution engine, chosen by name.

Names are what recipes and the CLI use, so the registry is the only place that
knows which class serves which name; aliases map onto one canonical name so
results are always keyed the same way in the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from torch import nn

from cascadec.errors import UserError

Runner = Callable[[np.ndarray], np.ndarray]

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "onnxruntime-cuda", "tensorrt")
ALIASES: dict[str, str] = {"ort": "onnxruntime", "ort-cuda": "onnxruntime-cuda", "trt": "tensorrt"}


def canonical_name(name: str) -> str:
    """Resolve aliases; unknown names are a user error listing the valid ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        valid = ", ".join([*BACKENDS, *ALIASES])
        raise UserError(f"unknown backend {name!r}; valid backends: {valid}")
    return key


def get_runner(
    name: str,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    model: nn.Module | None = None,
    device: str = "cpu",
) -> Runner:
    """Build the runner for ``name``; each backend needs either the model or the ONNX file."""
    key = canonical_name(name)
    if key == "torch":
        if model is None:
            raise UserError("the torch backend needs a model")
        from cascadec.backends.torch_backend import TorchRunner

        return TorchRunner(model, device=device)
    if key == "tensorrt":
        from cascadec.backends.tensorrt_backend import require_tensorrt

        require_tensorrt(gpu=True)  # one clear line on machines without TensorRT or a GPU
        raise UserError("tensorrt as a verify/profile backend is not implemented yet; engines are built by 'cascadec export RUN --trt'")
    if onnx_path is None:
        raise UserError(f"the {key} backend needs an ONNX file (export the model first)")
    from cascadec.backends.onnxruntime_backend import OrtRunner

    ort_device = "cuda" if key == "onnxruntime-cuda" and device == "cpu" else device
    if key == "onnxruntime-cuda" and not ort_device.startswith("cuda"):
        raise UserError(f"the onnxruntime-cuda backend runs on cuda, not {device!r}")
    return OrtRunner(onnx_path, device=ort_device)


__all__ = ["ALIASES", "BACKENDS", "Runner", "canonical_name", "get_runner"]
