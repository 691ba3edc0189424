"""``cascadec doctor``: each mismatch between driver, torch, onnxruntime(-gpu) and TensorRT is one
line naming both sides; a CPU-only machine passes and says what it cannot run."""

from __future__ import annotations

import json

import pytest

from cascadec import doctor as doc
from cascadec.doctor import Facts, judge


def _gpu_machine(**changes) -> Facts:
    """A consistent CUDA 12 machine: driver for 12.4, torch cu124, onnxruntime-gpu 1.20, TensorRT 10 cu12."""
    base = Facts(
        torch="2.5.1+cu124",
        torch_cuda="12.4",
        driver="550.54",
        driver_cuda="12.4",
        onnxruntime_packages=["onnxruntime-gpu"],
        onnxruntime="1.20.1",
        onnxruntime_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        onnxruntime_cuda="12",
        tensorrt="10.7.0",
        tensorrt_cuda="12",
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def _by_name(checks) -> dict[str, doc.Check]:
    return {c.name: c for c in checks}


def test_a_consistent_gpu_machine_passes():
    checks = judge(_gpu_machine())
    assert all(c.status == "ok" for c in checks), checks
    assert doc.doctor(_gpu_machine())["passed"] is True


def test_a_cpu_machine_passes_and_says_what_it_cannot_run():
    facts = Facts(torch="2.14.1", torch_cuda=None, onnxruntime_packages=["onnxruntime"], onnxruntime="1.32.0")
    result = doc.doctor(facts)
    assert result["passed"] is True
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["NVIDIA driver"]["status"] == "unavailable" and "CPU paths" in checks["NVIDIA driver"]["detail"]
    assert checks["tensorrt"]["status"] == "unavailable"


@pytest.mark.parametrize(
    "changes,name,words",
    [
        ({"torch": "2.9.0+cu130", "torch_cuda": "13.0"}, "torch", ["CUDA 13.0", "driver 550.54", "up to 12.4"]),
        (
            {"onnxruntime": "1.27.0", "onnxruntime_cuda": "13"},
            "onnxruntime-gpu",
            ["CUDA 13", "driver 550.54", "torch is built for CUDA 12.4"],
        ),
        (
            {
                "onnxruntime_packages": ["onnxruntime", "onnxruntime-gpu"],
                "onnxruntime_providers": ["CPUExecutionProvider"],
            },
            "onnxruntime",
            ["both installed", "CPU build won", "--force-reinstall"],
        ),
        ({"onnxruntime_providers": ["CPUExecutionProvider"]}, "onnxruntime-gpu", ["no CUDA provider"]),
        ({"tensorrt": "12.0.0"}, "tensorrt", ["TensorRT 12.0.0", "supports TensorRT 10 and 11"]),
        ({"tensorrt_cuda": "13"}, "tensorrt", ["CUDA 13 libraries", "torch for CUDA 12.4", "up to 12.4"]),
        (
            {"tensorrt": None, "tensorrt_error": "OSError: libnvinfer.so.10"},
            "tensorrt",
            ["does not import", "pypi.nvidia.com"],
        ),
    ],
)
def test_each_mismatch_is_one_line_naming_both_sides(changes, name, words):
    checks = judge(_gpu_machine(**changes))
    bad = {c.name: c for c in checks if c.status == "mismatch"}
    assert name in bad, checks
    assert all(w in bad[name].detail for w in words), bad[name].detail
    assert all("\n" not in c.detail for c in bad.values())
    # only the pieces that disagree are named (torch for CUDA 13 disagrees with all three CUDA 12 pieces)
    assert set(bad) == ({"torch", "onnxruntime-gpu", "tensorrt"} if name == "torch" else {name})


def test_the_gpu_extra_beside_the_core_onnxruntime_passes_while_the_gpu_build_wins():
    """cascadec depends on onnxruntime and [gpu] adds onnxruntime-gpu: both installed is the
    documented install, a mismatch only when the CPU build overwrote the GPU one."""
    result = doc.doctor(_gpu_machine(onnxruntime_packages=["onnxruntime", "onnxruntime-gpu"]))
    assert result["passed"] is True


def test_the_onnxruntime_gpu_cuda_major_follows_its_version():
    assert doc._onnxruntime_cuda("1.27.1", ["onnxruntime-gpu"]) == "13"
    assert doc._onnxruntime_cuda("1.20.1", ["onnxruntime-gpu"]) == "12"
    assert doc._onnxruntime_cuda("1.20.1", ["onnxruntime"]) is None  # the CPU package targets no CUDA


@pytest.mark.parametrize("version", ["10.7.0", "11.4.0"])
def test_tensorrt_10_and_11_are_supported(version):
    checks = {c.name: c for c in judge(_gpu_machine(tensorrt=version))}
    assert checks["tensorrt"].status == "ok", checks["tensorrt"]


def test_the_command_exits_3_on_a_mismatch_and_0_otherwise(cli, monkeypatch):
    monkeypatch.setattr(doc, "gather", lambda: _gpu_machine(tensorrt="12.0.0"))
    r = cli("doctor")
    assert r.code == 3 and "supports TensorRT 10" in r.err and "Traceback" not in r.err
    monkeypatch.setattr(doc, "gather", _gpu_machine)
    r = cli("doctor", "--json")
    assert r.code == 0 and json.loads(r.out)["passed"] is True


def test_this_machine_is_described_without_error(cli):
    r = cli("doctor", "--json")
    data = json.loads(r.out)
    assert r.code == (0 if data["passed"] else 3)
    assert {c["name"] for c in data["checks"]} >= {"NVIDIA driver", "torch", "tensorrt"}
    assert data["facts"]["torch"]
