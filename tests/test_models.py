"""cascadec.models: registry, CIFAR nets, adaptation and weight loading (offline, CPU, fast)."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cascadec.errors import UserError
from cascadec.models import create_model, list_models, model_info, register_model
from cascadec.models.adapt import adapt_input_channels, adapt_num_classes, find_classifier, find_first_conv
from cascadec.models.registry import weights_report
from cascadec.models.weights import load_weights, torchvision_checkpoint_path


@pytest.fixture(autouse=True)
def _no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty torch hub and no permission to download."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("CASCADEC_OFFLINE", "1")
    return home


def _out(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(*shape))


# --------------------------------------------------------------------------- registry


def test_list_models_has_ours_and_torchvision_classification_only() -> None:
    names = list_models()
    assert names == sorted(names)
    for name in (
        "resnet18",
        "mobilenet_v3_small",
        "vit_b_16",
        "cifar_resnet8",
        "cifar_resnet20",
        "cifar_resnet56",
        "cifar_vgg16_bn",
        "fmnist_resnet8",
    ):
        assert name in names
    for name in (
        "fasterrcnn_resnet50_fpn",
        "deeplabv3_resnet50",
        "r3d_18",
        "raft_large",
        "quantized_resnet18",
        "fcn_resnet50",
    ):
        assert name not in names


def test_model_info() -> None:
    info = model_info("resnet50")
    assert info["family"] == "resnet" and info["source"] == "torchvision"
    assert info["input_size"] == (3, 224, 224) and info["num_classes"] == 1000
    assert "ResNet50_Weights.IMAGENET1K_V2" in info["weights"]
    assert model_info("inception_v3")["input_size"] == (3, 299, 299)
    assert model_info("resnext50_32x4d")["family"] == "resnext"
    ours = model_info("cifar_resnet20")
    assert ours["source"] == "cascadec" and ours["input_size"] == (3, 32, 32)
    assert model_info("fmnist_resnet8")["input_size"] == (1, 28, 28)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet18", (1, 1, 28, 28)),
        ("mobilenet_v3_small", (1, 1, 28, 28)),
        ("cifar_resnet8", (1, 1, 28, 28)),
        ("cifar_resnet20", (1, 1, 32, 32)),
        ("cifar_vgg16_bn", (1, 1, 32, 32)),
    ],
)
def test_build_adapted(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, num_classes=10, in_channels=1)
    assert _out(model, shape).shape == (shape[0], 10)
    assert find_first_conv(model)[1].in_channels == 1
    assert model.cascadec_model_name == name and weights_report(model) is None


def test_cifar_resnet_depths_and_projection_shortcuts() -> None:
    model = create_model("cifar_resnet56")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 56  # 55 3x3 convs + fc
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2  # stage 2 and 3 entries, no lambdas
    assert _out(model, (1, 3, 32, 32)).shape == (1, 10)
    assert _out(create_model("fmnist_resnet8"), (1, 1, 28, 28)).shape == (1, 10)
    vgg = create_model("cifar_vgg16_bn", num_classes=100)
    assert isinstance(vgg.classifier, nn.Linear) and vgg.classifier.in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 13


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "efficientnet_b0",
        "densenet121",
        "regnet_x_400mf",
        "shufflenet_v2_x0_5",
        "mnasnet0_5",
        "squeezenet1_1",
        "googlenet",
    ],
)
def test_torchvision_families_adapt(name: str) -> None:
    model = create_model(name, num_classes=7, in_channels=1)
    assert _out(model, (1, 1, 32, 32)).shape == (1, 7)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet81")
    with pytest.raises(UserError, match="unknown model"):
        model_info("no_such_net")


@pytest.mark.parametrize("bad", [0, -3, "10", 2.5, True])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(UserError, match="num_classes"):
        create_model("cifar_resnet8", num_classes=bad)  # type: ignore[arg-type]


def test_register_model_and_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    from cascadec.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave no trace

    @register_model(name="test_tiny_net", input_size=(1, 8, 8), num_classes=3)
    def tiny(*, num_classes: int = 3, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))

    assert "test_tiny_net" in list_models()
    assert model_info("test_tiny_net")["input_size"] == (1, 8, 8)
    with pytest.raises(UserError, match="already registered"):
        register_model(name="test_tiny_net")(tiny)


# --------------------------------------------------------------------------- adapt


def test_adapt_sums_rgb_filters_so_grey_input_is_preserved() -> None:
    rgb = create_model("resnet18", num_classes=10).eval()
    grey = adapt_input_channels(create_model("resnet18", num_classes=10), 1).eval()
    grey.load_state_dict({**rgb.state_dict(), "conv1.weight": rgb.conv1.weight.sum(1, keepdim=True)})
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_adapt_heads_conv_classifier_and_aux() -> None:
    import torchvision.models as tvm

    squeeze = adapt_num_classes(tvm.squeezenet1_1(), 5)
    assert find_classifier(squeeze)[1].out_channels == 5 and squeeze.num_classes == 5
    google = tvm.googlenet(aux_logits=True, init_weights=False)
    adapt_num_classes(adapt_input_channels(google, 1), 4)
    assert google.fc.out_features == 4 and google.aux1.fc2.out_features == 4
    assert google.transform_input is False
    assert adapt_input_channels(google, 1) is google  # no-op
    with pytest.raises(UserError, match="in_channels"):
        adapt_input_channels(google, 0)
    with pytest.raises(UserError, match="no Linear or Conv2d"):
        adapt_num_classes(nn.Sequential(nn.ReLU()), 3)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    src = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    dst = create_model("cifar_resnet8", num_classes=10, in_channels=1, weights=str(path))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))
    report = weights_report(dst)
    assert report is not None
    assert not report.head_reinitialised and not report.skipped and len(report.loaded) == len(state)


def test_checkpoint_dict_and_prefixes(tmp_path: Path) -> None:
    src = create_model("cifar_resnet8")
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = create_model("cifar_resnet8")
    load_weights(dst, path)
    torch.testing.assert_close(dst.fc.weight, src.fc.weight)


def test_head_reinitialised_and_stem_adapted(tmp_path: Path) -> None:
    src = create_model("cifar_resnet8", num_classes=10, in_channels=3)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = create_model("cifar_resnet8", num_classes=5, in_channels=1, weights=path)
    report = weights_report(dst)
    assert report is not None
    assert report.head_reinitialised and set(report.skipped) == {"fc.weight", "fc.bias"}
    assert report.adapted == ["conv1.weight"]
    assert dst.fc.out_features == 5
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)
    assert "re-initialised" in report.summary()


def test_wrong_architecture_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "r8.pt"
    torch.save(create_model("cifar_resnet8").state_dict(), path)
    with pytest.raises(UserError, match=r"r8\.pt.*missing keys \(layer1\.1\.") as err:
        create_model("cifar_resnet20", weights=path)
    assert "\n" not in str(err.value)
    wide = tmp_path / "vgg.pt"
    torch.save(create_model("cifar_vgg16_bn").state_dict(), wide)
    with pytest.raises(UserError, match=r"unexpected keys|missing keys"):
        create_model("cifar_resnet8", weights=wide)


def test_corrupt_files(tmp_path: Path) -> None:
    state = create_model("cifar_resnet8").state_dict()
    good_st, good_pt = tmp_path / "good.safetensors", tmp_path / "good.pt"
    save_file(state, str(good_st))
    torch.save(state, good_pt)
    cases = {
        "trunc.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "junk.safetensors": os.urandom(256),
        "empty.safetensors": b"",
        "trunc.pt": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "junk.pt": os.urandom(256),
        "empty.pth": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=name.replace(".", r"\.")) as err:
            create_model("cifar_resnet8", weights=tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        create_model("cifar_resnet8", weights=tmp_path / "absent.pt")


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(create_model("cifar_resnet8"), path)
    with pytest.raises(UserError, match=r"state_dict"):
        create_model("cifar_resnet8", weights=path)
    bad = tmp_path / "notes.pt"
    torch.save({"epoch": 1, "lr": torch.tensor(0.1)}, bad)
    with pytest.raises(UserError, match="'epoch'"):
        create_model("cifar_resnet8", weights=bad)


# --------------------------------------------------------------------------- torchvision names


@pytest.mark.parametrize("spec", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_not_cached_offline(_no_hub: Path, spec: str) -> None:
    expected = _no_hub / "hub" / "checkpoints"
    with pytest.raises(UserError, match="is missing") as err:
        create_model("resnet18", weights=spec)
    message = str(err.value)
    assert str(expected) in message and "resnet18-" in message and ".safetensors" in message
    assert not expected.exists() or not any(expected.iterdir())


def test_torchvision_download_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASCADEC_OFFLINE")

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    with pytest.raises(UserError, match=r"download failed .*no network"):
        create_model("mobilenet_v3_small", weights="DEFAULT")


def test_torchvision_weights_from_cache(_no_hub: Path) -> None:
    import torchvision.models as tvm

    pretrained = tvm.resnet18()
    cached = torchvision_checkpoint_path(tvm.ResNet18_Weights.IMAGENET1K_V1)
    assert cached.parent == _no_hub / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.save(pretrained.state_dict(), cached)
    model = create_model("resnet18", num_classes=10, in_channels=1, weights="IMAGENET1K_V1")
    report = weights_report(model)
    assert report is not None
    assert report.head_reinitialised and report.adapted == ["conv1.weight"]
    torch.testing.assert_close(model.conv1.weight, pretrained.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].bn2.running_var, pretrained.layer4[1].bn2.running_var)


def test_torchvision_weights_name_errors() -> None:
    with pytest.raises(UserError, match="not for model 'resnet18'"):
        create_model("resnet18", weights="ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        create_model("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(UserError, match="unknown torchvision weights"):
        create_model("resnet18", weights="Nope_Weights.X")
    with pytest.raises(UserError, match="no torchvision weights"):
        create_model("cifar_resnet20", weights="DEFAULT")
    with pytest.raises(UserError, match="needs the model"):
        load_weights(nn.Linear(2, 2), "IMAGENET1K_V1")


def test_a_head_too_large_for_memory_is_one_line(cli) -> None:
    """Found by the hostile-argument search: ``inspect cifar_resnet8 --num-classes 1000000000``
    asked torch for 256 GB and ended in an internal error (exit 1)."""
    from cascadec.errors import UserError
    from cascadec.models import create_model

    with pytest.raises(UserError, match=r"num_classes=10000000000\): its weights do not fit in memory"):
        create_model("cifar_resnet8", num_classes=10**10)
    result = cli("inspect", "cifar_resnet8", "--num-classes", "1000000000")
    assert result.code == 2 and "do not fit in memory" in result.err and "Traceback" not in result.err
