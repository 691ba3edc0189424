"""Real TensorRT engines on an NVIDIA GPU, compared with ONNX Runtime (CPU).

Skipped unless ``tensorrt`` imports and torch sees a CUDA GPU (never the case on the CPU
CI machine). Run on a GPU machine with:  python -m pytest tests/gpu -q -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


def _why_skip() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'cascadec[gpu]' on an NVIDIA machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001
        return f"tensorrt fails to import: {exc}"
    return None


REASON = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from cascadec.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    model = Tiny().eval()
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    export_onnx(model, torch.zeros(1, 1, 28, 28), path)
    return path


def run_engine(plan_path, x: np.ndarray) -> np.ndarray:
    """Execute a serialized engine with the TensorRT 10 tensor-address API on torch buffers."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    assert engine is not None
    context = engine.create_execution_context()
    context.set_input_shape("input", tuple(x.shape))
    inp = torch.from_numpy(np.ascontiguousarray(x)).cuda()
    out = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
    context.set_tensor_address("input", inp.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out.cpu().numpy()


@pytest.mark.parametrize("fp16, atol", [(False, 1e-2), (True, 5e-2)], ids=["fp32", "fp16"])
def test_engine_matches_onnxruntime(tiny_onnx, tmp_path, fp16, atol):
    from cascadec.backends.onnxruntime_backend import OrtRunner
    from cascadec.backends.tensorrt_backend import build_engine

    plan = tmp_path / "tiny.plan"
    meta = build_engine(tiny_onnx, plan, fp16=fp16, batches=(1, 4, 8))
    assert plan.stat().st_size > 0 and (tmp_path / "tiny.timing.cache").is_file()
    assert json.loads((tmp_path / "tiny.plan.json").read_text())["precision"] == ("fp16" if fp16 else "fp32")
    assert meta["profile"]["max"] == [8, 1, 28, 28]

    ort = OrtRunner(tiny_onnx)
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28), dtype=np.float32)
    for batch in (1, 3, 8):  # inside the profile, including a size that is not min/opt/max
        got, want = run_engine(plan, x[:batch]), ort(x[:batch])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


def test_int8_engine_builds_with_calibration(tiny_onnx, tmp_path):
    from cascadec.backends.tensorrt_backend import build_engine

    images = np.random.default_rng(1).standard_normal((64, 1, 28, 28), dtype=np.float32)
    meta = build_engine(tiny_onnx, tmp_path / "tiny.plan", int8=True, batches=(1, 8), calibration_images=images)
    # build_engine keys the cache by the images: tiny.calib-<count>-<digest>.cache
    assert meta["precision"] == "int8" and Path(meta["calibration_cache"]).is_file()
    assert Path(meta["calibration_cache"]).name.startswith("tiny.calib-64-")
    assert run_engine(tmp_path / "tiny.plan", images[:8]).shape == (8, 10)


def test_trt_runner_matches_onnxruntime_and_splits_the_call(tiny_onnx, tmp_path):
    """TrtRunner on a real engine: __call__ and stage/compute/fetch agree with ONNX Runtime."""
    from cascadec.backends.onnxruntime_backend import OrtRunner
    from cascadec.backends.tensorrt_backend import TrtRunner, build_engine

    plan = tmp_path / "tiny.plan"
    build_engine(tiny_onnx, plan, batches=(1, 4, 8))
    runner = TrtRunner(plan)
    assert (runner.input_name, runner.output_name, runner.precision) == ("input", "logits", "fp32")
    assert runner.input_shape == (1, 28, 28) and isinstance(runner.stream, torch.cuda.Stream)
    ort = OrtRunner(tiny_onnx)
    x = np.random.default_rng(2).standard_normal((8, 1, 28, 28), dtype=np.float32)
    for batch in (1, 3, 8, 3):  # re-binding buffers when the batch changes, and back
        np.testing.assert_allclose(runner(x[:batch]), ort(x[:batch]), atol=1e-3, rtol=1e-3)
    runner.stage(x[:4])
    for _ in range(3):
        runner.compute()  # enqueued back to back on runner.stream, no host sync in between
    np.testing.assert_allclose(runner.fetch(), ort(x[:4]), atol=1e-3, rtol=1e-3)


def test_trt_runner_refuses_a_truncated_engine(tiny_onnx, tmp_path):
    from cascadec.backends.tensorrt_backend import TrtRunner, build_engine
    from cascadec.errors import UserError

    plan = tmp_path / "tiny.plan"
    build_engine(tiny_onnx, plan, batches=(1, 8))
    plan.write_bytes(plan.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot deserialize"):
        TrtRunner(plan)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_verify_gates_a_real_engine_by_its_precision(tiny_onnx, tmp_path, fp16):
    """verify_backends with the tensorrt backend: the engine's precision picks the tolerances."""
    import shutil

    from cascadec.backends.tensorrt_backend import build_engine
    from cascadec.verify.gates import DEFAULT_TOLERANCES, Gate, Tolerance
    from cascadec.verify.parity import verify_backends

    torch.manual_seed(0)
    model = Tiny().eval()  # same seed as tiny_onnx's model
    onnx_path = tmp_path / "student.onnx"
    shutil.copy(tiny_onnx, onnx_path)
    build_engine(onnx_path, tmp_path / "student.plan", fp16=fp16, batches=(1, 16, 32))
    x = np.random.default_rng(3).standard_normal((64, 1, 28, 28), dtype=np.float32)
    # random inputs give near-tied logits, where fp16 may flip a few top-1s: the tensor tolerances are the point here
    gate = Gate(tolerances={**DEFAULT_TOLERANCES, "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_top1_agreement=0.9)})
    out = verify_backends(model, onnx_path, x, backends=["tensorrt"], samples=64, progress=False, gate=gate)
    result = out["backends"]["tensorrt"]
    assert result["precision"] == ("fp16" if fp16 else "fp32")
    assert result["passed"], result["failures"]


@pytest.mark.skipif(
    REASON is not None or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="needs onnxruntime-gpu",
)
def test_first_divergence_on_cuda(tiny_onnx, tmp_path):
    """The search runs the graph on the CUDA provider; a faithful graph has no divergent node."""
    from cascadec.verify.diagnose import find_first_divergence

    torch.manual_seed(0)
    model = Tiny().eval()
    x = np.random.default_rng(4).standard_normal((4, 1, 28, 28), dtype=np.float32)
    assert find_first_divergence(model, tiny_onnx, x, device="cuda") is None
