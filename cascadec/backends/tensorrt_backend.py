"""TensorRT backend: only the installation check exists so far.

It exists now so the CLI's ``--trt`` flag and the backend registry can fail with a
clear message instead of an ImportError traceback on machines without TensorRT.
"""

from __future__ import annotations

import os
from types import ModuleType

from cascadec.errors import UserError

INSTALL_HINT = "pip install 'cascadec[gpu]' on a machine with an NVIDIA GPU (TensorRT needs CUDA)"


def require_tensorrt() -> ModuleType:
    """Import TensorRT or explain how to get it; returns the module."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UserError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install (missing libnvinfer...) is as unusable as none
        raise UserError(f"TensorRT is installed but fails to import ({exc}): {INSTALL_HINT}") from exc
    return tensorrt


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    int8: bool = False,
    batches: tuple[int, ...] = (1, 8, 32),
) -> dict:
    """Build a TensorRT engine from an ONNX file.

    The engine builder lands in a later issue. Until then this only checks that
    TensorRT is importable and then refuses, rather than pretending to build.
    """
    require_tensorrt()
    raise UserError("--trt is not available yet: the TensorRT engine builder is not implemented in this version")
