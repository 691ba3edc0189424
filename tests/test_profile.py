"""The latency protocol returns complete, sane statistics for ONNX Runtime and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cascadec.backends.onnx_export import export_onnx
from cascadec.errors import UserError
from cascadec.profile import FIELDS, compare, measure, profile_onnx, profile_torch, summarize

FAST = {"warmup_s": 0.0, "min_duration_s": 0.02, "min_iters": 5, "progress": False}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "net.onnx"
    export_onnx(small_net(), torch.randn(1, 3, 16, 16), path)
    return path


def check_stats(stats: dict, min_iters: int) -> None:
    assert tuple(stats) == FIELDS
    assert stats["iterations"] >= min_iters
    for key in FIELDS:
        if key != "std_ms":
            assert stats[key] > 0, key
    assert stats["std_ms"] >= 0
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_profile_onnx_fields(onnx_path):
    prof = profile_onnx(onnx_path, (3, 16, 16), batches=(1, 4), threads=1, **FAST)
    assert list(prof) == [1, 4]
    for batch, stats in prof.items():
        check_stats(stats, 5)
        assert stats["throughput"] == pytest.approx(batch * 1e3 / stats["mean_ms"])


def test_profile_onnx_infers_shape_and_shows_progress(onnx_path):
    prof = profile_onnx(onnx_path, None, batches=(2,), **{**FAST, "progress": True})
    check_stats(prof[2], 5)


def test_profile_torch_fields():
    before = torch.get_num_threads()
    prof = profile_torch(small_net(), (3, 16, 16), batches=(1, 3), threads=1, **FAST)
    assert torch.get_num_threads() == before  # thread count restored
    assert list(prof) == [1, 3]
    for stats in prof.values():
        check_stats(stats, 5)


def test_min_iters_and_duration_respected():
    calls = []
    times = measure(lambda: calls.append(1), warmup_s=0.0, min_duration_s=0.0, min_iters=7)
    assert times.size == 7 and len(calls) == 8  # one warm-up call
    times = measure(lambda: None, warmup_s=0.0, min_duration_s=0.05, min_iters=1)
    assert times.size > 1
    assert measure(lambda: None, warmup_s=0.0, min_duration_s=10.0, min_iters=1, max_iters=3).size == 3


def test_summarize_known_values():
    stats = summarize(np.array([1.0, 2.0, 3.0, 4.0]), batch=8)
    assert stats["p50_ms"] == 2.5 and stats["mean_ms"] == 2.5 and stats["min_ms"] == 1.0 and stats["max_ms"] == 4.0
    assert stats["throughput"] == pytest.approx(8 * 1000 / 2.5)
    assert stats["iterations"] == 4


def test_compare_speedup():
    teacher = {1: {"p50_ms": 4.0}, 8: {"p50_ms": 20.0}, 32: {"p50_ms": 60.0}}
    student = {"1": {"p50_ms": 2.0}, "8": {"p50_ms": 5.0}}  # as read back from report.json
    assert compare(teacher, student) == {1: 2.0, 8: 4.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batches": (0,)}, "batch"), ({"batches": ()}, "batch"), ({"min_iters": 0}, "min_iters"),
     ({"warmup_s": -1}, "warmup_s")],
)
def test_protocol_argument_errors(onnx_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        profile_onnx(onnx_path, (3, 16, 16), **{**FAST, **kwargs})


def test_profile_input_errors(onnx_path, tmp_path):
    with pytest.raises(UserError, match="does not match"):
        profile_onnx(onnx_path, (3, 32, 32), batches=(1,), **FAST)
    with pytest.raises(UserError, match="not found"):
        profile_onnx(tmp_path / "missing.onnx", (3, 16, 16), **FAST)
    with pytest.raises(UserError, match="input shape"):
        profile_torch(small_net(), (), **FAST)
