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


def test_stage_hint_terms_are_normalised_by_the_teacher_features_energy() -> None:
    """Each stage term is the adapted feature's MSE divided by the teacher feature's mean square:
    scaling both features by 10 leaves the loss as it was (without the division it grows 100x)."""
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    points = stage_points(net, x)[:1]
    adapters = identity_adapters(net, points, x)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 16, 28, 28, generator=g) * 3.0
    s = t + torch.randn(2, 16, 28, 28, generator=g)
    loss = hint_loss({points[0]: s}, {points[0]: t}, points, adapters)
    expected = ((s - t) ** 2).mean() / (t**2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    scaled = hint_loss({points[0]: 10 * s}, {points[0]: 10 * t}, points, adapters)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)


def _hinted_trainer(kind: str):
    from cascadec.prune.cascade import CascadeTrainer
    from cascadec.prune.cost import CostModel
    from cascadec.prune.groups import build_groups
    from cascadec.prune.targets import Budget, MaskSolver

    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    example = torch.randn(1, 1, 16, 16)
    index = build_groups(model, example)
    cost = CostModel.build(model, index, example)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a teacher whose features differ from the shared network's
        for p in teacher.parameters():
            p.mul_(1.5)
    trainer = CascadeTrainer(
        copy.deepcopy(model),
        teacher,
        index,
        MaskSolver(index, cost),
        Budget.from_target(cost, flops_reduction=0.5),
        torch.rand(index.num_units) + 0.1,
        num_tas=1,
        ta_ratios=None,
        cascade_update=True,
        loss=DistillLoss(),
        device=CPU,
        hints=hint_spec(kind, None, model, example),
    )
    return trainer, teacher


@pytest.mark.parametrize("kind", ["stages", "paper"])
def test_joint_hints_compare_each_model_with_the_right_features(kind, monkeypatch) -> None:
    """Stage hints pull every model towards the pretrained teacher's stages; the paper's hints
    pull each model towards the model above it (the teacher for the top one). A swap of the two
    feature sources, or of the adapters, fails here."""
    from cascadec.distill.hints import FeatureTap
    from cascadec.prune import cascade as cascade_module

    trainer, teacher = _hinted_trainer(kind)
    seen: list[tuple[dict, dict, object]] = []

    def spy(student, reference, points, adapters):
        seen.append(
            (
                {k: v.detach().clone() for k, v in student.items()},
                {k: v.detach().clone() for k, v in reference.items()},
                adapters,
            )
        )
        return hint_loss(student, reference, points, adapters)

    monkeypatch.setattr(cascade_module, "hint_loss", spy)
    images, labels = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    points = trainer.hints.points
    tap = FeatureTap(teacher, points)
    with torch.no_grad():
        teacher(images)
    teacher_features = {k: v.detach().clone() for k, v in tap.features.items()}
    tap.remove()
    trainer.joint_loss(images, labels)
    assert len(seen) == len(trainer.models) == 2
    top, student = seen  # the loop runs from the top model down
    for _features, _reference, adapters in seen:
        assert (adapters is not None) == (kind == "stages")
    for p in points:
        assert torch.allclose(top[1][p], teacher_features[p])  # the top model: the teacher either way
        if kind == "stages":
            assert torch.allclose(student[1][p], teacher_features[p])
        else:
            assert torch.allclose(student[1][p], top[0][p])  # the model above, not the teacher
            assert not torch.allclose(student[1][p], teacher_features[p])


def test_hint_weights_default_to_one_for_stages_and_the_papers_lambda_h() -> None:
    """Stage hints weigh 1.0; the paper's hints its lambda_H = 0.001 (docs/paper.md, Losses)."""
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    assert hint_spec("stages", None, net, x).weight == 1.0
    assert hint_spec("paper", None, net, x).weight == 0.001
    assert hint_spec("stages", 0.25, net, x).weight == 0.25


def test_the_student_phase_averages_and_syncs_its_hint_adapters_across_ranks(tiny_setup) -> None:
    """Stage hints train adapters beside the student: on several ranks their gradients must be
    averaged and their state synchronised like the student's, or each rank's adapters drift
    apart. A recording stand-in for the rank group (every collective an identity) shows which
    tensors reach the averaging in the one-shot student phase."""
    from dataclasses import dataclass

    from cascadec.train.distributed import Dist
    from cascadec.train.runtime import Runtime

    averaged: list[set[int]] = []
    synced: list[list] = []

    @dataclass(frozen=True)
    class Recording(Dist):
        def barrier(self) -> None:
            pass

        def sync_grads(self, params) -> None:
            averaged.append({id(p) for p in params})

        def agree(self, loss, stop):
            return loss, stop

        def all_reduce_mean(self, tensor):
            return tensor

        def sync_state(self, models, extra=()) -> None:
            synced.append(list(models))

        def broadcast_object(self, obj):
            return obj

    teacher, loader, val = tiny_setup
    recipe = _recipe(RUNS["oneshot-stages"])
    runtime = Runtime(device=CPU, dist=Recording(0, 2, 0), grad_sync="after-backward")
    torch.manual_seed(0)
    prune_model(teacher, recipe, loader, val, torch.randn(1, 1, 16, 16), CPU, runtime)
    beside = [m for models in synced for m in models[1:]]
    assert beside and all(isinstance(m, torch.nn.ModuleDict) for m in beside), synced  # the adapters
    adapter_params = {id(p) for m in beside for p in m.parameters()}
    assert adapter_params and all(adapter_params <= ids for ids in averaged[-3:])
