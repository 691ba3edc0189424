"""The GPU extras (issue 28): one per CUDA major, each pinning torch, onnxruntime-gpu and TensorRT
to builds of that major; scripts/check_gpu_extras.py reads the majors from resolved metadata."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_gpu_extras as check  # noqa: E402

from cascadec.doctor import _onnxruntime_cuda  # noqa: E402

EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _spec(extra: str, name: str) -> SpecifierSet:
    for req in EXTRAS[extra]:
        m = re.match(rf"{re.escape(name)}([<>=!~].*)$", req)
        if m:
            return SpecifierSet(m.group(1))
    raise AssertionError(f"{extra} pins no {name}")


@pytest.mark.parametrize("extra, major", [("gpu-cu12", 12), ("gpu-cu13", 13)])
def test_each_extra_pins_one_cuda_major(extra, major):
    # onnxruntime-gpu: every version the pin allows maps to this major under doctor's rule
    ort = _spec(extra, "onnxruntime-gpu")
    for version in ("1.18.1", "1.19.0", "1.22.0", "1.26.0", "1.27.0", "1.31.1"):
        if version in ort:
            assert _onnxruntime_cuda(version, ["onnxruntime-gpu"]) == str(major), version
    # torch from PyPI: CUDA 12 builds up to 2.10, CUDA 13 from 2.11 (read from their metadata)
    torch = _spec(extra, "torch")
    assert ("2.10.0" in torch) == (major == 12) and ("2.11.0" in torch) == (major == 13)
    # TensorRT: the package named for this major, and TensorRT 11 allowed (strongly typed only)
    assert any(r.startswith(f"tensorrt-cu{major}") for r in EXTRAS[extra])
    assert "11.0.0" in _spec(extra, f"tensorrt-cu{major}")
    assert EXTRAS["gpu"] == ["cascadec[gpu-cu13]"]


def test_the_check_reads_cuda_majors_from_metadata():
    torch_requires = ['nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"', "nvidia-cudnn-cu12==9.10.2.21"]
    assert check.cuda_majors(torch_requires) == {12}
    ort_requires = ['nvidia-cuda-runtime-cu13~=13.0; extra == "cuda"', 'nvidia-cudnn-cu13~=9.0; extra == "cudnn"']
    assert check.cuda_majors(ort_requires) == set()  # behind extras: not pulled in unless asked
    assert check.cuda_majors(ort_requires, ("cuda", "cudnn")) == {13}
    reqs, name = check.substitute_tensorrt(["polygraphy>=0.49", "tensorrt-cu12>=10.0.1,<12"])
    assert name == "tensorrt-cu12" and reqs == ["polygraphy>=0.49", "tensorrt-cu12-bindings>=10.0.1,<12"]
