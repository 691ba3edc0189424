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

import onnxruntime
import torch

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
    "polygraphy": ("polygraphy",),
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


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or ``sysctl`` on macOS; empty when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if sys.platform == "darwin" and shutil.which("sysctl"):
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            return frozenset(f.lower().replace(".", "_") for f in out.split())
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset()


def x86_int8_dot() -> str | None:
    """How this x86 CPU multiplies int8: ``"vnni"`` (AVX-512 VNNI or AVX-VNNI: u8 x s8 products
    summed straight into int32) or ``"avx2"`` (no VNNI: ``vpmaddubsw`` adds pairs of products
    into int16 with saturation, which full-range 8-bit weights can overflow); ``None`` on other
    architectures, or when the flags cannot be read. Why ONNX Runtime's ``reduce_range`` exists."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    flags = cpu_flags()
    if not flags:
        return None
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}:
        return "vnni"
    return "avx2" if "avx2" in flags else "sse"


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
        import tensorrt  # type: ignore[import-not-found]  # heavy and optional: imported only here

        return str(tensorrt.__version__)
    except Exception:
        return None


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo: SMT siblings share a core, and the
    physical count is what ONNX Runtime's default thread pool sizes itself by."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cpus() -> int | None:
    """CPUs this process may run on (cgroup/taskset limits), which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _nvidia_smi(fields: tuple[str, ...] = ("name", "driver_version", "memory.total", "compute_cap")) -> dict | None:
    """First GPU's fields from ``nvidia-smi --query-gpu``; time-bounded, None when unavailable.
    Older drivers lack ``compute_cap``, so the query is retried without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    for wanted in (fields, tuple(f for f in fields if f != "compute_cap")):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={','.join(wanted)}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines:
            values = [v.strip() for v in lines[0].split(",")]
            if len(values) == len(wanted):
                return dict(zip(wanted, values))
    return None


def _gpu() -> dict:
    info: dict = {
        "gpu": None,
        "gpu_count": 0,
        "gpu_driver": None,
        "cuda": None,
        "cudnn": None,
        "gpu_compute_capability": None,
        "gpu_memory_gb": None,
    }
    try:
        info["cuda"] = torch.version.cuda  # the CUDA runtime torch was built with (None on CPU builds)
        if not torch.cuda.is_available():
            return info
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        info["gpu_compute_capability"] = f"{major}.{minor}"
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cudnn"] = None if cudnn is None else str(cudnn)
    except Exception:
        pass
    smi = _nvidia_smi()
    if smi:  # nvidia-smi also answers where torch is a CPU build
        info["gpu_driver"] = smi.get("driver_version")
        info["gpu"] = info["gpu"] or smi.get("name")
        info["gpu_compute_capability"] = info["gpu_compute_capability"] or smi.get("compute_cap")
        if info["gpu_memory_gb"] is None and (smi.get("memory.total") or "").isdigit():
            info["gpu_memory_gb"] = round(int(smi["memory.total"]) / 1024, 1)  # MiB
    return info


def gpu_name() -> str | None:
    """The first GPU's name (torch, else nvidia-smi), None without one."""
    return _gpu()["gpu"]


def environment() -> dict:
    """Describe this machine and the relevant library versions, JSON-ready."""
    torch_threads = torch.get_num_threads()
    providers = list(onnxruntime.get_available_providers())
    versions = {name: _version(name) for name in _DISTRIBUTIONS}
    versions["tensorrt"] = _tensorrt_version()
    ort_device = onnxruntime.get_device()
    return {
        "cpu": cpu_model(),
        "cpu_int8_dot": x86_int8_dot(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": _usable_cpus(),
        "ram_gb": _ram_gb(),
        "torch_threads": torch_threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **_gpu(),
        "onnxruntime_device": ort_device,
        "onnxruntime_providers": providers,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions,
    }
