"""First divergent layer: a deliberately corrupted middle layer must be the node reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import cascadec.verify.diagnose as div
from cascadec.backends.onnx_export import export_onnx
from cascadec.verify.diagnose import find_first_divergence, mapped_modules, torch_activations
from cascadec.verify.gates import Tolerance

TOL = Tolerance(atol=1e-4, rtol=1e-3)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.stem(x)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    for bn in (net.stem[1], net.middle[1]):  # non-trivial BatchNorm so folding it into the conv matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["slim", "unslimmed"])
def exported(model, tmp_path_factory, request):
    path = tmp_path_factory.mktemp("div") / "net.onnx"
    export_onnx(model, torch.zeros(1, 1, 12, 12), path, slim=request.param)
    return path


X = np.random.default_rng(0).standard_normal((4, 1, 12, 12), dtype=np.float32)


def corrupt(path, out, initializer: str, factor: float = 1.5):
    """Scale one initializer: the node reading it (and only those after it) must diverge."""
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        if init.name == initializer:
            array = numpy_helper.to_array(init) * factor
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float32), initializer))
            break
    else:
        raise AssertionError(f"{initializer} not in {[i.name for i in proto.graph.initializer]}")
    onnx.save(proto, str(out))
    return out


def node_reading(path, initializer: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(path)).graph.node if initializer in n.input)


@pytest.mark.slow
def test_a_faithful_graph_has_no_divergent_node(model, exported):
    assert find_first_divergence(model, exported, X, tolerance=TOL) is None


def test_corrupted_middle_conv_is_the_first_divergent_node(model, exported, tmp_path):
    bad = corrupt(exported, tmp_path / "bad.onnx", "middle.0.weight")
    found = find_first_divergence(model, bad, X, tolerance=TOL)
    target = node_reading(bad, "middle.0.weight")
    assert found is not None
    assert found["node"] == target.name and found["op_type"] == "Conv"
    # the conv has the BatchNorm folded in: it stands for middle.0 or middle.1, never the stem
    assert found["torch_module"] in ("middle.0", "middle.1")
    assert found["reference"] == "torch"
    assert found["max_abs_diff"] > TOL.atol
    assert found["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}
    assert found["samples"] == 4 and found["checked_nodes"] >= 2  # the stem conv was checked and agreed


def test_corrupted_classifier_is_found_after_the_convs(model, exported, tmp_path):
    bad = corrupt(exported, tmp_path / "bad_fc.onnx", "head.4.bias", factor=3.0)
    found = find_first_divergence(model, bad, X, tolerance=TOL)
    assert found is not None and found["op_type"] == "Gemm" and found["torch_module"] == "head.4"


def test_loose_tolerance_hides_a_small_perturbation(model, exported, tmp_path):
    bad = corrupt(exported, tmp_path / "small.onnx", "middle.0.weight", factor=1.0 + 1e-3)
    assert find_first_divergence(model, bad, X, tolerance=TOL) is not None
    assert find_first_divergence(model, bad, X, tolerance=Tolerance(atol=1.0, rtol=1.0)) is None


def test_unmapped_nodes_fall_back_to_cpu_onnxruntime(model, exported, monkeypatch):
    """On another device, a node no module maps to (a functional op) is compared with the CPU graph."""
    real = div.intermediate_outputs
    relu = next(n for n in onnx.load(str(exported)).graph.node if n.op_type == "Relu")

    def fake(path, x, names, *, device="cpu"):
        values = real(path, x, names, device="cpu")
        if device == "gpu-like":  # the "device" computes one ReLU wrongly; everything else is exact
            values = {**values, relu.output[0]: values[relu.output[0]] + 0.5}
        return values

    monkeypatch.setattr(div, "intermediate_outputs", fake)
    # a model with no named modules at all: nothing maps, so only the CPU comparison can find it
    found = find_first_divergence(_Opaque(model), exported, X, device="gpu-like", tolerance=TOL)
    assert found is not None
    assert found["output"] == relu.output[0] and found["reference"] == "onnxruntime-cpu"
    assert found["torch_module"] is None and found["device"] == "gpu-like"
    assert found["max_abs_diff"] == pytest.approx(0.5, rel=1e-5)


class _Opaque(nn.Module):
    """Same function, no submodules: forward hooks see nothing to map ONNX nodes to."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered as a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_torch_activations_and_mapping(model, exported):
    acts, order = torch_activations(model, X)
    assert order[:3] == ["stem.0", "stem.1", "stem.2"] and "head.4" in acts
    assert acts["head.4"].shape == (4, 10)
    mapping = mapped_modules(model, exported, X)
    conv = node_reading(exported, "middle.0.weight")
    assert "middle.1" in mapping[conv.name] or "middle.0" in mapping[conv.name]
