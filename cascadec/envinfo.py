"""The machine and library versions behind a run's numbers.

Latency and even parity depend on the CPU, thread count, GPU driver and library
versions, so every report records them; a speed-up without its machine is not
reproducible. Nothing here may raise: a missing tool just yields ``None``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

# distribution names to try per library, first match wins (GPU builds ship under other names)
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "cascadec": ("cascadec",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "onnxslim": ("onnxslim",),
    "torch_pruning": ("torch-pruning", "torch_pruning"),
    "numpy": ("numpy",),
}


def cpu_model() -> str:
    """The marketing name of the CPU: /proc/cpuinfo on Linux, platform elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(module: str) -> str | None:
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__  # carries local tags such as torch's +cu130
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # not installed as a distribution (e.g. source checkout): ask the module
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:
        return None


def _tensorrt_version() -> str | None:
    """TensorRT counts only if it imports: a wheel without its CUDA libraries is unusable."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return None
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except Exception:
        return None


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _gpu() -> dict:
    info: dict = {"gpu": None, "gpu_count": 0, "gpu_driver": None, "cuda": None, "cudnn": None}
    try:
        import torch

        if not torch.cuda.is_available():
            return info
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cudnn"] = None if cudnn is None else str(cudnn)
        info["gpu_driver"] = _nvidia_driver()
    except Exception:
        pass
    return info


def environment() -> dict:
    """Describe this machine and the relevant library versions, JSON-ready."""
    try:
        import torch

        torch_threads: int | None = torch.get_num_threads()
    except Exception:
        torch_threads = None
    try:
        import onnxruntime

        providers: list[str] | None = list(onnxruntime.get_available_providers())
    except Exception:
        providers = None
    versions = {name: _version(name) for name in _DISTRIBUTIONS}
    versions["tensorrt"] = _tensorrt_version()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch_threads,
        **_gpu(),
        "onnxruntime_providers": providers,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions,
    }
