"""Feature hints (distill/hints.py): where the stages are, adapters that start as the identity,
the loss, and both kinds through the cascade and one-shot pruning without leaving anything in
the student."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers.tiny_prune import prune_recipe, tiny_data

from cascadec.distill.hints import HintedLoss, block_points, hint_loss, hint_spec, identity_adapters, stage_points
from cascadec.distill.losses import DistillLoss
from cascadec.models import create_model
from cascadec.prune.masks import masked
from cascadec.prune.methods import prune_model
from cascadec.prune.shrink import shrink
from cascadec.recipe import Recipe

CPU = torch.device("cpu")


def test_stages_end_where_the_resolution_changes() -> None:
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    assert stage_points(net, x) == ["layer1", "layer2", "layer3"]
    assert block_points(net, x) == ["layer1.0", "layer2.0", "layer3.0"]  # the paper's last 3 residual blocks
    r18 = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    assert stage_points(r18, x)[-4:] == ["layer1", "layer2", "layer3", "layer4"]
    assert block_points(r18, x) == ["layer3.1", "layer4.0", "layer4.1"]
    mobile = torchvision.models.mobilenet_v2()  # one `features` container holds every resolution
    assert all(p.startswith("features.") for p in stage_points(mobile, torch.randn(1, 3, 64, 64)))


def test_adapters_start_as_the_identity_and_the_loss_is_zero_for_equal_features() -> None:
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    points = stage_points(net, x)
    adapters = identity_adapters(net, points, x)
    feats = torch.randn(2, 16, 7, 7)
    assert torch.allclose(adapters["0"](feats), feats)
    twin = copy.deepcopy(net)
    loss = HintedLoss(DistillLoss(kd_weight=0.0), net, twin, points, adapters, weight=1.0)
    logits = net(x)
    labels = torch.zeros(4, dtype=torch.long)
    plain = DistillLoss(kd_weight=0.0)(logits, labels)
    assert torch.allclose(loss(logits, labels), plain, atol=1e-6)  # the twin's stages equal the student's
    with torch.no_grad():
        twin.layer2[0].conv1.weight.mul_(2.0)
    logits = net(x)
    hinted = loss(logits, labels)
    assert hinted > plain + 1e-3
    hinted.backward()
    assert adapters["1"].weight.grad is not None and adapters["1"].weight.grad.abs().sum() > 0
    loss.remove()
    assert not any(m._forward_hooks for m in net.modules())


def test_hint_loss_without_adapters_is_plain_mse() -> None:
    s = {"a": torch.ones(2, 3, 4, 4)}
    t = {"a": torch.zeros(2, 3, 4, 4)}
    assert hint_loss(s, t, ["a"], None).item() == pytest.approx(1.0)


def _recipe(over: dict) -> Recipe:
    return prune_recipe("cascade", over)


@pytest.fixture(scope="module")
def tiny_setup():
    return tiny_data(32)


RUNS = {
    "cascade-stages": {"distill": {"hints": "stages"}},
    "cascade-paper": {"distill": {"hints": "paper"}},
    "oneshot-stages": {"prune": {"method": "oneshot"}, "distill": {"hints": "stages", "kd": False}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_hinted_runs_leave_a_plain_student(name, tiny_setup) -> None:
    teacher, loader, val = tiny_setup
    example = torch.randn(1, 1, 16, 16)
    recipe = _recipe(RUNS[name])
    torch.manual_seed(0)
    hinted = prune_model(teacher, recipe, loader, val, example, CPU)
    student, a = hinted.student.eval(), hinted.analysis
    # no adapter, no hook: the student's parameters are the teacher's architecture's
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad(), masked(student, a.index, hinted.mask):
        y = student(x)
    assert torch.allclose(y, shrink(student, a.index, hinted.mask, example)(x), atol=1e-5)
    if recipe.prune.method == "cascade":
        # the hint term is in the joint losses: the same run without hints has smaller ones
        torch.manual_seed(0)
        plain = prune_model(teacher, _recipe({"distill": {"hints": "none"}}), loader, val, example, CPU)
        with_hints = hinted.history["joint"][0]["losses"]
        without = plain.history["joint"][0]["losses"]
        assert sum(with_hints) > sum(without)


def test_hint_recipe_keys_are_checked() -> None:
    assert _recipe({"distill": {"hints": "paper"}}).distill.hint_weight is None
    with pytest.raises(ValueError, match="needs distill.hints"):
        _recipe({"distill": {"hint_weight": 0.5}})
    with pytest.raises(ValueError, match="kd: true"):
        _recipe({"distill": {"hints": "paper", "kd": False}})
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    spec = hint_spec("paper", None, net, torch.randn(1, 1, 16, 16))
    assert spec.weight == 0.001 and spec.points == ["layer1.0", "layer2.0", "layer3.0"]
    assert hint_spec("none", None, net, torch.randn(1, 1, 16, 16)) is None
