"""The backend registry: every execution engine cascadec can verify or time, in one table.

As timm's model registry does for architectures, one entry per backend says what the CLI
and recipes call it (name and aliases), what artifact it runs (the PyTorch model, the ONNX
file or a TensorRT engine), where it runs, and how to check that this machine can run it.
``verify``, ``profile``, ``export`` and the CLI read this table and nothing else, so a new
backend is one :class:`Backend` entry plus the module holding its runner.

| name              | runs                                   | where                                  |
|-------------------|----------------------------------------|----------------------------------------|
| torch             | the PyTorch model                      | the run's device (profile: CPU)        |
| onnxruntime       | student.onnx                           | CPU execution provider                 |
| onnxruntime-cuda  | student.onnx                           | CUDA execution provider                |
| tensorrt          | student.plan (``cascadec export --trt``) | TensorRT engine on CUDA              |
| onnxruntime-trt   | student.onnx                           | TensorRT execution provider (CUDA, CPU behind it) |
| torch-cuda        | the PyTorch model                      | CUDA (profile: static buffers, optional CUDA graph) |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cascadec.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

# The table is read when the CLI starts (its --backend help lists the names), so this module
# imports no engine: the runner modules (torch, onnxruntime, tensorrt) load in require() and
# get_runner(), when a backend is actually used. `cascadec --help` then answers in a fraction
# of a second instead of the five it takes to import torch and ONNX Runtime.
Runner = Callable[["np.ndarray"], "np.ndarray"]  # every runner is a cascadec.backends.runner.BaseRunner
Artifact = Literal["torch", "onnx", "engine"]
Place = Literal["cpu", "cuda", "tensorrt"]


@dataclass(frozen=True)
class Backend:
    """One execution engine. ``runs`` is the artifact it reads; ``device`` is where it runs
    (for ONNX Runtime, which execution provider: ``cpu``, ``cuda`` or ``tensorrt``)."""

    name: str
    runs: Artifact
    device: Place
    description: str
    aliases: tuple[str, ...] = ()

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def suffix(self) -> str | None:
        """The file suffix of the artifact this backend can time on its own (``profile FILE``)."""
        return {"onnx": ".onnx", "engine": ".plan"}.get(self.runs)

    def require(self, *, timing: bool = False) -> None:
        """One line, before any work, when this machine cannot run the backend.

        ``timing``: the latency protocol also needs CUDA through torch (streams and events),
        which verification on an ONNX Runtime GPU provider does not."""
        from cascadec.backends import cuda_runners, onnxruntime_backend, tensorrt_backend

        if self.runs == "onnx" and self.gpu:
            onnxruntime_backend.require_providers(self.device)
            if timing:
                cuda_runners.require_cuda(f"backend {self.name}")
        elif self.runs == "torch" and self.gpu:
            cuda_runners.require_cuda(f"backend {self.name}")
        elif self.runs == "engine":
            tensorrt_backend.require_tensorrt(gpu=True)  # imports tensorrt (heavy, optional) only here


_ENTRIES: tuple[Backend, ...] = (
    Backend("torch", "torch", "cpu", "the PyTorch model (the reference every backend is gated against)"),
    Backend("onnxruntime", "onnx", "cpu", "student.onnx on ONNX Runtime's CPU execution provider", ("ort",)),
    Backend(
        "onnxruntime-cuda", "onnx", "cuda", "student.onnx on ONNX Runtime's CUDA execution provider", ("ort-cuda",)
    ),
    Backend("tensorrt", "engine", "cuda", "student.plan, a TensorRT engine (cascadec export --trt)", ("trt",)),
    Backend(
        "onnxruntime-trt",
        "onnx",
        "tensorrt",
        "student.onnx on ONNX Runtime's TensorRT execution provider",
        ("ort-trt", "onnxruntime-tensorrt"),
    ),
    Backend("torch-cuda", "torch", "cuda", "the PyTorch model on CUDA (profile: optional CUDA graph)"),
)
REGISTRY: dict[str, Backend] = {b.name: b for b in _ENTRIES}
ALIASES: dict[str, str] = {alias: b.name for b in _ENTRIES for alias in b.aliases}
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def get_backend(name: str) -> Backend:
    """The entry for ``name`` or an alias; unknown names are a user error listing the valid ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        valid = ", ".join([*BACKENDS, *ALIASES])
        raise UserError(f"unknown backend {name!r}; valid backends: {valid}")
    return REGISTRY[key]


def canonical_name(name: str) -> str:
    """Resolve aliases, so results are always keyed the same way in the report."""
    return get_backend(name).name


def list_backends(runs: Artifact | None = None) -> list[str]:
    """Backend names, optionally only those that run one kind of artifact."""
    return [b.name for b in _ENTRIES if runs is None or b.runs == runs]


def default_engine_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``student.onnx`` -> ``student.plan``: where ``cascadec export --trt`` writes the engine."""
    return Path(onnx_path).with_suffix(".plan")


def divergence_device(name: str) -> str:
    """The ONNX Runtime device that reproduces backend ``name`` for the first-divergent-layer search.

    TensorRT (engine or execution provider) runs on CUDA, so its intermediates are taken from
    the CUDA provider when onnxruntime-gpu is present (TensorRT fuses layers and keeps no
    per-node tensors to read), otherwise from the CPU.
    """
    backend = get_backend(name)
    if not backend.gpu or backend.runs == "torch":
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
    """The numpy-in/numpy-out runner for ``name``; each backend needs the model, the ONNX file
    or the engine.

    ``device`` is the PyTorch device of the run; GPU backends pick CUDA (``cuda:N`` is kept
    when given). ``engine_path`` defaults to the ``.plan`` next to ``onnx_path``.
    """
    from cascadec.backends import onnxruntime_backend, tensorrt_backend, torch_backend

    backend = get_backend(name)
    gpu_device = device if str(device).startswith("cuda") else "cuda:0"
    if backend.runs == "torch":
        if model is None:
            raise UserError(f"the {backend.name} backend needs a model")
        return torch_backend.TorchRunner(model, device=gpu_device if backend.gpu else device)
    if backend.runs == "engine":
        backend.require()  # one clear line on machines without TensorRT or a GPU
        if engine_path is None:
            if onnx_path is None:
                raise UserError("the tensorrt backend needs an engine (build one with 'cascadec export RUN --trt')")
            engine_path = default_engine_path(onnx_path)
        return tensorrt_backend.TrtRunner(engine_path, device=gpu_device)
    if onnx_path is None:
        raise UserError(f"the {backend.name} backend needs an ONNX file (export the model first)")
    if backend.device == "cpu":
        ort_device = device  # historical: --device cuda with plain onnxruntime asks for the CUDA provider
    elif backend.device == "cuda":
        ort_device = gpu_device
    else:
        ort_device = backend.device
    return onnxruntime_backend.OrtRunner(onnx_path, device=ort_device)
