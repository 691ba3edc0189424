"""The latency protocol's GPU paths on a real NVIDIA GPU: torch CUDA (eager and CUDA graph),
ONNX Runtime CUDA EP through IOBinding. Skipped without a CUDA GPU (always on the CPU CI
machine, where tests/test_profile.py covers the same logic through fakes).
Run on a GPU machine with:  python -m pytest tests/gpu/test_profile_gpu.py -q -p no:cacheprovider
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cascadec.profile.engines import profile_onnx, profile_torch
from cascadec.profile.protocol import COMPUTE_FIELDS, FIELDS, HOST_FIELDS, Timing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch"),
]
FAST = {"timing": Timing(warmup_s=0.2, min_duration_s=0.2, min_iters=20), "progress": False}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def check_split(prof: dict) -> None:
    for stats in prof.values():
        assert set(FIELDS) | set(HOST_FIELDS) | set(COMPUTE_FIELDS) == set(stats)
        assert 0 < stats["compute_p50_ms"] <= stats["host_p50_ms"]  # copies and sync are part of host latency only
        assert stats["iterations"] >= 20


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_torch_cuda_host_and_compute(cuda_graph):
    check_split(profile_torch(net(), (3, 32, 32), batches=(1, 8), device="cuda", cuda_graph=cuda_graph, **FAST))


def test_torch_cuda_runner_output_matches_eager():
    from cascadec.backends.cuda_runners import TorchCudaRunner

    model, x = net(), np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    expected = model(torch.from_numpy(x)).detach().numpy()
    for graph in (False, True):
        got = TorchCudaRunner(model, x.shape, cuda_graph=graph)(x)
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)


def test_onnxruntime_cuda_iobinding(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from cascadec.backends.cuda_runners import OrtDeviceRunner
    from cascadec.backends.onnx_export import export_onnx

    path = tmp_path / "net.onnx"
    export_onnx(net(), torch.zeros(1, 3, 32, 32), path)
    check_split(profile_onnx(path, (3, 32, 32), batches=(1, 8), device="cuda", **FAST))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    expected = net()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(OrtDeviceRunner(path, (3, 32, 32)).bind(2)(x), expected, atol=1e-3, rtol=1e-3)
    runner = OrtDeviceRunner(path, (3, 32, 32))
    # TF32 off: the session is timed and gated as fp32 (issue 28); ORT reports its options back
    assert runner.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    for _ in range(3):  # a fresh input each time: compute must see it whole (stage waits for the copy)
        x = np.random.default_rng(_).standard_normal((2, 3, 32, 32), dtype=np.float32)
        expected = net()(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(runner.bind(2)(x), expected, atol=1e-4, rtol=1e-4)
