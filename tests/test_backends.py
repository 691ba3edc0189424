"""Export -> ONNX Runtime parity, the fallback exporter, and the errors users can hit."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from cascadec.backends import canonical_name, get_runner
from cascadec.backends import onnxruntime_backend as ortb
from cascadec.backends.onnx_export import ExportFallbackWarning, export_onnx
from cascadec.backends.onnxruntime_backend import OrtRunner, intermediate_outputs, value_names
from cascadec.backends.tensorrt_backend import build_engine, require_tensorrt
from cascadec.backends.torch_backend import TorchRunner
from cascadec.errors import UserError


class TinyNet(nn.Module):
    """1-channel 28x28 classifier: the Fashion-MNIST shape, small enough to export in a second."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyNet()
    for m in model.modules():  # non-trivial BN statistics so folding bugs would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch_dim(path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_tiny()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    info = export_onnx(model, torch.randn(1, 1, 28, 28), path)
    return model, path, info


def assert_parity(model: nn.Module, path, shape: tuple[int, ...], batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    ort_out = OrtRunner(path)(x)
    torch_out = TorchRunner(model)(x)
    assert ort_out.shape == torch_out.shape == (batch, torch_out.shape[1])
    assert np.abs(ort_out - torch_out).max() <= 1e-4


@pytest.mark.slow
def test_export_info(tiny):
    _, path, info = tiny
    assert info["exporter"] == "dynamo"
    assert info["opset"] == 18
    assert info["file_size_bytes"] == path.stat().st_size > 0
    assert info["external_data"] is False and info["slimmed"] is True
    assert info["seconds"] > 0 and isinstance(info["warnings"], list)
    assert info["input_shape"][1:] == [1, 28, 28]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert batch_dim(path).dim_param and not batch_dim(path).HasField("dim_value")
    assert not list(path.parent.glob("*.data"))


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_matches_torch_dynamic_batch(tiny, batch):
    model, path, _ = tiny
    assert_parity(model, path, (1, 28, 28), batch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_models_export(tmp_path, name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    info = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / f"{name}.onnx")
    assert info["exporter"] == "dynamo"
    for batch in (1, 3):
        assert_parity(model, tmp_path / f"{name}.onnx", (3, 64, 64), batch)


@pytest.mark.slow
def test_export_leaves_caller_model_alone(tmp_path):
    model = make_tiny().train()
    export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", slim=False)
    assert model.training


def test_legacy_fallback_warns_and_works(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model = make_tiny()
    path = tmp_path / "legacy.onnx"
    with pytest.warns(ExportFallbackWarning, match="simulated torch.export failure"):
        info = export_onnx(model, torch.randn(1, 1, 28, 28), path)
    assert info["exporter"] == "torchscript"
    assert any("legacy TorchScript" in w for w in info["warnings"])
    assert batch_dim(path).dim_param
    for batch in (1, 3):
        assert_parity(model, path, (1, 28, 28), batch)


def test_both_exporters_failing_is_user_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(UserError, match="cannot export TinyNet to ONNX.*unsupported operator foo"):
        export_onnx(make_tiny(), torch.randn(1, 1, 28, 28), tmp_path / "x.onnx")


@pytest.mark.slow
def test_fixed_batch_export(tmp_path):
    path = tmp_path / "fixed.onnx"
    export_onnx(make_tiny(), torch.randn(4, 1, 28, 28), path, dynamic_batch=False, slim=False)
    assert batch_dim(path).dim_value == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"opset": 3}, "opset"), ({"path": "model.txt"}, r"\.onnx"), ({"sample": "not a tensor"}, "sample")],
)
def test_export_argument_errors(tmp_path, kwargs, match):
    args = {"model": make_tiny(), "sample": torch.randn(1, 1, 28, 28), "path": tmp_path / "m.onnx", **kwargs}
    if kwargs.get("path"):
        args["path"] = tmp_path / kwargs["path"]
    opset = args.pop("opset", 18)
    with pytest.raises(UserError, match=match):
        export_onnx(args["model"], args["sample"], args["path"], opset=opset)


def test_missing_and_corrupt_onnx(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OrtRunner(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02")
    with pytest.raises(UserError, match="cannot load"):
        OrtRunner(bad)
    with pytest.raises(UserError):
        intermediate_outputs(bad, np.zeros((1, 1, 28, 28), np.float32), ["x"])


def test_wrong_input_shape_is_user_error(tiny):
    _, path, _ = tiny
    with pytest.raises(UserError, match="does not match"):
        OrtRunner(path)(np.zeros((1, 3, 28, 28), np.float32))


def test_unknown_backend_lists_valid_names():
    with pytest.raises(UserError, match="valid backends: torch, onnxruntime, onnxruntime-cuda, tensorrt"):
        get_runner("openvino", onnx_path="x.onnx")


def test_get_runner_names(tiny):
    model, path, _ = tiny
    assert canonical_name("ORT") == "onnxruntime"
    assert isinstance(get_runner("ort", onnx_path=path), OrtRunner)
    assert isinstance(get_runner("onnxruntime", onnx_path=path), OrtRunner)
    assert isinstance(get_runner("torch", model=model), TorchRunner)
    with pytest.raises(UserError, match="needs an ONNX file"):
        get_runner("onnxruntime")
    with pytest.raises(UserError, match="needs a model"):
        get_runner("torch", onnx_path=path)


def test_cuda_provider_missing(tiny, monkeypatch):
    _, path, _ = tiny
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        OrtRunner(path, device="cuda")
    with pytest.raises(UserError, match="TensorrtExecutionProvider"):
        OrtRunner(path, device="tensorrt")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        get_runner("onnxruntime-cuda", onnx_path=path)
    with pytest.raises(UserError, match="unknown onnxruntime device"):
        OrtRunner(path, device="tpu")


def test_ort_threads(tiny):
    _, path, _ = tiny
    assert OrtRunner(path, threads=1)(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    with pytest.raises(UserError, match="threads"):
        OrtRunner(path, threads=0)


def test_tensorrt_missing(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(UserError, match="TensorRT is not installed: pip install 'cascadec\\[gpu\\]'"):
        require_tensorrt()
    with pytest.raises(UserError, match="TensorRT is not installed"):
        build_engine("m.onnx", "m.engine")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        get_runner("trt", onnx_path=tiny[1])


def test_intermediate_outputs(tiny):
    _, path, _ = tiny
    names = value_names(path)
    assert names[-1] == "logits"
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)
    picked = [names[0], names[len(names) // 2], "logits"]
    values = intermediate_outputs(path, x, picked)
    assert list(values) == picked
    assert values[names[0]].shape[0] == 2
    np.testing.assert_allclose(values["logits"], OrtRunner(path)(x), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="no value named 'nope'"):
        intermediate_outputs(path, x, ["nope"])


def test_torch_runner_errors():
    with pytest.raises(UserError, match="nn.Module"):
        TorchRunner("not a model")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="device"):
        TorchRunner(make_tiny(), device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            TorchRunner(make_tiny(), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ortb.ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_ort_cuda_matches_torch(tiny):
    model, path, _ = tiny
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
    runner = get_runner("onnxruntime-cuda", onnx_path=path)
    assert runner.providers[0] == "CUDAExecutionProvider"
    assert np.abs(runner(x) - TorchRunner(model)(x)).max() <= 1e-3


class _RecordingSession:
    """Stands in for ort.InferenceSession on a machine without GPU providers; records what was asked."""

    asked: list = []

    def __init__(self, model, sess_options=None, providers=None):
        type(self).asked.append(providers)
        self._providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self._providers

    def get_inputs(self):
        return [types.SimpleNamespace(name="input", shape=["batch", 1, 28, 28])]

    def get_outputs(self):
        return [types.SimpleNamespace(name="logits", shape=["batch", 10])]


def test_onnxruntime_trt_backend_asks_for_the_tensorrt_provider(tiny, monkeypatch):
    _, path, _ = tiny
    assert canonical_name("ort-trt") == "onnxruntime-trt" == canonical_name("onnxruntime-tensorrt")
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="no TensorrtExecutionProvider .* install onnxruntime-gpu and TensorRT 10"):
        get_runner("onnxruntime-trt", onnx_path=path)
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(ortb.ort, "InferenceSession", _RecordingSession)
    _RecordingSession.asked.clear()
    loaded = []
    monkeypatch.setattr(ortb, "import_module", lambda name: loaded.append(name))
    runner = get_runner("onnxruntime-trt", onnx_path=path)
    # TF32 off in the CUDA provider behind it; TensorRT itself computes an fp32 graph in TF32 (its
    # default, which the provider cannot turn off): recorded and gated as tf32
    no_tf32 = ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert _RecordingSession.asked == [["TensorrtExecutionProvider", no_tf32, "CPUExecutionProvider"]]
    assert runner.precision == "tf32"
    assert loaded == ["tensorrt"]  # pip TensorRT's libraries loaded before the provider looks for them
    cuda = get_runner("onnxruntime-cuda", onnx_path=path, device="cuda:1")
    assert _RecordingSession.asked[-1] == [
        ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": "0"}),
        "CPUExecutionProvider",
    ]
    assert cuda.precision == "fp32" and loaded == ["tensorrt"]  # the CUDA provider needs no TensorRT


def test_divergence_device(monkeypatch):
    from cascadec.backends import divergence_device

    assert divergence_device("ort") == "cpu"
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert divergence_device("tensorrt") == "cpu" and divergence_device("onnxruntime-cuda") == "cpu"
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert divergence_device("tensorrt") == "cuda" and divergence_device("onnxruntime-trt") == "cuda"
