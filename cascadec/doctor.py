"""``cascadec doctor``: which GPU stacks this machine can run, and each mismatch in one line.

The GPU paths fail late and obscurely when the pieces disagree: a driver older than the CUDA a
wheel was built for, torch for CUDA 12 beside onnxruntime-gpu for CUDA 13, ``onnxruntime`` and
``onnxruntime-gpu`` installed together (they write one folder, and the last one wins), a
TensorRT whose CUDA libraries are another major, or a TensorRT newer than cascadec supports. The
checks read versions only (no GPU work), so they answer in a second on any machine; a CPU-only
machine passes with a line saying the GPU backends are unavailable.

The facts are gathered once (:func:`gather`) and judged by pure functions (:func:`judge`), so
every rule is tested with made-up facts.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Literal

Status = Literal["ok", "unavailable", "mismatch"]
# the TensorRT majors cascadec builds engines for (pyproject's gpu-cu12 / gpu-cu13 extras pin the same):
# 10 (strongly typed networks from Q/DQ and FP16 ONNX, or its implicit calibrator) and 11 (strongly
# typed only), checked against the strict fakes of both APIs, not on a GPU
SUPPORTED_TENSORRT_MAJORS = (10, 11)


@dataclass
class Facts:
    """Versions as installed; None where a piece is absent."""

    torch: str | None = None
    torch_cuda: str | None = None  # the CUDA torch was built for (None: CPU build)
    driver: str | None = None  # NVIDIA driver version (nvidia-smi)
    driver_cuda: str | None = None  # the newest CUDA the driver supports (nvidia-smi's "CUDA Version")
    onnxruntime_packages: list[str] = field(default_factory=list)  # installed distributions
    onnxruntime: str | None = None
    onnxruntime_providers: list[str] = field(default_factory=list)
    onnxruntime_cuda: str | None = None  # the CUDA onnxruntime-gpu was built for
    tensorrt: str | None = None  # the importable tensorrt module's version
    tensorrt_cuda: str | None = None  # the CUDA major of its libraries (tensorrt-cuXX packages)
    tensorrt_error: str | None = None  # why tensorrt is installed but does not import
    driver_missing: str = "nvidia-smi not found"  # why no driver was read


@dataclass
class Check:
    name: str
    status: Status
    detail: str


def _major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def _distributions(pattern: str) -> dict[str, str]:
    out = {}
    for dist in metadata.distributions():
        try:  # a dist-info left without METADATA by an interrupted pip must not stop the checks
            name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
            if re.fullmatch(pattern, name):
                out[name] = dist.version
        except Exception:
            continue
    return out


def _driver() -> tuple[str | None, str | None, str]:
    """(driver version, newest CUDA it supports, why not) from nvidia-smi's header; time-bounded."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None, "nvidia-smi not found"
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, None, f"nvidia-smi did not run ({type(exc).__name__})"
    driver = re.search(r"Driver Version:\s*([\d.]+)", done.stdout)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", done.stdout)
    if driver is None:
        said = (done.stdout or done.stderr or "").strip().splitlines()
        return None, None, f"nvidia-smi: {said[0][:120] if said else f'exit {done.returncode}'}"
    return driver.group(1), (cuda.group(1) if cuda else None), ""


def _onnxruntime_cuda(version: str | None, packages: list[str]) -> str | None:
    """The CUDA an onnxruntime-gpu build targets: its build info where the build records it, else
    PyPI's rule: 1.19 on for CUDA 12, and from 1.27 for CUDA 13 (that cut-off is the read-only
    audit's in issue 28, not checked against an installed package here)."""
    if "onnxruntime-gpu" not in packages:
        return None
    try:
        from onnxruntime.capi import build_and_package_info as info

        recorded = getattr(info, "cuda_version", None)
        if recorded:
            return str(recorded)
    except Exception:  # whatever a broken install raises: fall back to the version rule
        pass
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) >= (1, 27):
        return "13"
    return "12" if (major, minor) >= (1, 19) else "11"


def gather() -> Facts:
    """This machine's facts. Imports torch and onnxruntime (cascadec needs both anyway) and
    TensorRT if installed; never raises."""
    facts = Facts()
    try:
        import torch

        facts.torch, facts.torch_cuda = torch.__version__, torch.version.cuda
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    facts.driver, facts.driver_cuda, facts.driver_missing = _driver()
    ort_dists = _distributions(r"onnxruntime(-gpu|-directml|-openvino)?")
    facts.onnxruntime_packages = sorted(ort_dists)
    try:
        import onnxruntime

        facts.onnxruntime = onnxruntime.__version__
        facts.onnxruntime_providers = list(onnxruntime.get_available_providers())
    except Exception:
        pass
    facts.onnxruntime_cuda = _onnxruntime_cuda(
        ort_dists.get("onnxruntime-gpu") or facts.onnxruntime, facts.onnxruntime_packages
    )
    trt_libs = _distributions(r"tensorrt-cu\d+(-libs|-bindings)?")
    majors = sorted({m.group(1) for n in trt_libs if (m := re.match(r"tensorrt-cu(\d+)", n))})
    facts.tensorrt_cuda = majors[0] if len(majors) == 1 else ("/".join(majors) if majors else None)
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt  # type: ignore[import-not-found]  # optional and heavy: only here

            facts.tensorrt = str(tensorrt.__version__)
        except Exception as exc:  # e.g. the cuXX_libs stub that downloads from NVIDIA's index
            facts.tensorrt_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return facts


def judge(f: Facts) -> list[Check]:
    """One line per piece, and one per disagreement between pieces."""
    checks: list[Check] = []
    torch_cuda = _major(f.torch_cuda)
    driver_cuda = _major(f.driver_cuda)
    # the driver
    if f.driver is None:
        checks.append(
            Check(
                "NVIDIA driver",
                "unavailable",
                f"no NVIDIA driver ({f.driver_missing}): GPU backends unavailable; the CPU paths "
                "(torch, onnxruntime CPU, INT8 on the CPU) work",
            )
        )
    else:
        checks.append(Check("NVIDIA driver", "ok", f"driver {f.driver}, supports CUDA up to {f.driver_cuda or '?'}"))
    # torch
    if f.torch_cuda is None:
        checks.append(Check("torch", "ok", f"torch {f.torch}, a CPU build (torch-cuda backends unavailable)"))
    elif f.driver is not None and driver_cuda is not None and torch_cuda is not None and torch_cuda > driver_cuda:
        checks.append(
            Check(
                "torch",
                "mismatch",
                f"torch {f.torch} is built for CUDA {f.torch_cuda}, but driver {f.driver} supports CUDA up to "
                f"{f.driver_cuda}: update the driver or install torch for CUDA {driver_cuda}",
            )
        )
    else:
        checks.append(Check("torch", "ok", f"torch {f.torch}, built for CUDA {f.torch_cuda}"))
    # onnxruntime
    both = "onnxruntime" in f.onnxruntime_packages and "onnxruntime-gpu" in f.onnxruntime_packages
    if both and "CUDAExecutionProvider" not in f.onnxruntime_providers:
        # cascadec depends on onnxruntime and [gpu] adds onnxruntime-gpu: both write one folder, and
        # only a CPU build without the CUDA provider means the CPU package won
        checks.append(
            Check(
                "onnxruntime",
                "mismatch",
                "onnxruntime and onnxruntime-gpu are both installed and the CPU build won their shared folder (no "
                "CUDA provider): pip install --force-reinstall --no-deps onnxruntime-gpu",
            )
        )
    ort_cuda = _major(f.onnxruntime_cuda)
    if f.onnxruntime_cuda is None:
        checks.append(
            Check(
                "onnxruntime",
                "ok" if f.onnxruntime else "unavailable",
                f"onnxruntime {f.onnxruntime}, CPU (onnxruntime-cuda backends need onnxruntime-gpu)"
                if f.onnxruntime
                else "onnxruntime does not import",
            )
        )
    else:
        problems = []
        if driver_cuda is not None and ort_cuda is not None and ort_cuda > driver_cuda:
            problems.append(f"driver {f.driver} supports CUDA up to {f.driver_cuda}")
        if torch_cuda is not None and ort_cuda is not None and ort_cuda != torch_cuda:
            problems.append(
                f"torch is built for CUDA {f.torch_cuda} (cascadec times ORT's GPU providers with torch's "
                "streams, in one process: both must use one CUDA major)"
            )
        if "CUDAExecutionProvider" not in f.onnxruntime_providers and not both:
            problems.append("the imported onnxruntime has no CUDA provider (not a GPU build)")
        checks.append(
            Check(
                "onnxruntime-gpu",
                "mismatch" if problems else "ok",
                f"onnxruntime-gpu {f.onnxruntime}, built for CUDA {f.onnxruntime_cuda}"
                + (": " + "; ".join(problems) if problems else ""),
            )
        )
    # TensorRT
    if f.tensorrt is None and f.tensorrt_error is None:
        checks.append(Check("tensorrt", "unavailable", "TensorRT not installed (cascadec export --trt unavailable)"))
    elif f.tensorrt is None:
        checks.append(
            Check(
                "tensorrt",
                "mismatch",
                f"tensorrt is installed but does not import ({f.tensorrt_error}): its CUDA libraries are missing or "
                "do not match, or a tensorrt-cuXX-libs stub could not fetch them from NVIDIA's index "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt)",
            )
        )
    else:
        trt_cuda = _major(f.tensorrt_cuda)
        problems = []
        if _major(f.tensorrt) not in SUPPORTED_TENSORRT_MAJORS:
            problems.append(
                f"cascadec supports TensorRT {' and '.join(map(str, SUPPORTED_TENSORRT_MAJORS))}.x "
                f"(pip install 'tensorrt>=10,<{SUPPORTED_TENSORRT_MAJORS[-1] + 1}')"
            )
        if driver_cuda is not None and trt_cuda is not None and trt_cuda > driver_cuda:
            problems.append(
                f"its libraries are for CUDA {f.tensorrt_cuda}, driver {f.driver} supports up to {f.driver_cuda}"
            )
        if torch_cuda is not None and trt_cuda is not None and trt_cuda != torch_cuda:
            problems.append(f"its libraries are for CUDA {f.tensorrt_cuda}, torch for CUDA {f.torch_cuda}")
        checks.append(
            Check(
                "tensorrt",
                "mismatch" if problems else "ok",
                f"TensorRT {f.tensorrt}"
                + (f", CUDA {f.tensorrt_cuda} libraries" if f.tensorrt_cuda else "")
                + (": " + "; ".join(problems) if problems else ""),
            )
        )
    return checks


def doctor(facts: Facts | None = None) -> dict:
    """The checks as JSON-ready data: ``passed`` is False when any piece mismatches."""
    facts = facts or gather()
    checks = judge(facts)
    return {
        "facts": asdict(facts),
        "checks": [asdict(c) for c in checks],
        "passed": not any(c.status == "mismatch" for c in checks),
    }
