"""Backends: one numpy-in/numpy-out runner per execution engine, chosen by name.

:mod:`cascadec.backends.registry` is the one table of backends (names, aliases, what each
runs, where, how to check it is installed); the other modules hold the runners:

* ``torch_backend``: the PyTorch reference; ``onnxruntime_backend``: ONNX Runtime sessions
  (CPU and GPU providers) and intermediate outputs; ``tensorrt_backend``: engine build and
  runner; ``cuda_runners``: static-buffer CUDA runners the latency protocol times;
* ``onnx_export``: PyTorch -> ONNX; ``triton``: a Triton Inference Server model repository.
"""

from cascadec.backends.registry import (
    ALIASES,
    BACKENDS,
    REGISTRY,
    Backend,
    Runner,
    canonical_name,
    default_engine_path,
    divergence_device,
    get_backend,
    get_runner,
    list_backends,
)

__all__ = [
    "ALIASES",
    "BACKENDS",
    "REGISTRY",
    "Backend",
    "Runner",
    "canonical_name",
    "default_engine_path",
    "divergence_device",
    "get_backend",
    "get_runner",
    "list_backends",
]
