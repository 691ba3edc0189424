"""HSAKD (distill/hsakd.py): the rotation layout, the loss, the teacher's cached heads, and
runs through the cascade, one-shot pruning and the CLI that leave no head in the student or
its exported graph."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn as nn
from helpers.cli import torch_threads
from helpers.tiny_prune import prune_recipe, tiny_data

from cascadec.distill.hsakd import (
    AuxNetwork,
    HsakdLoss,
    HsakdWeights,
    Rotated,
    hsakd_loss,
    joint_labels,
    make_heads,
    rotate_batch,
    teacher_heads,
)
from cascadec.distill.losses import DistillLoss
from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.prune.masks import masked
from cascadec.prune.methods import prune_model
from cascadec.prune.shrink import shrink

CPU = torch.device("cpu")


def test_rotations_are_stacked_rotation_major_with_joint_labels() -> None:
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    r = rotate_batch(x)
    assert r.shape == (8, 1, 3, 3)
    assert torch.equal(r[:2], x)  # upright first: the class CE reads logits[:B]
    assert torch.equal(r[2:4], torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(r[6:8], torch.rot90(x, 3, dims=(2, 3)))
    assert joint_labels(torch.tensor([0, 3])).tolist() == [0, 12, 1, 13, 2, 14, 3, 15]
    net = nn.Conv2d(1, 2, 3)
    assert torch.equal(Rotated(net)(x), net(r))


def test_the_loss_is_the_upright_cross_entropy_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (2,))
    aux = [torch.randn(8, 40) for _ in range(3)]
    w = HsakdWeights(ce=1.0, kd=0.4, aux=1.0, temperature=4.0)
    same = hsakd_loss(logits, labels, logits.clone(), aux, [a.clone() for a in aux], w)
    ce = nn.functional.cross_entropy(logits[:2], labels)
    assert same.item() == pytest.approx(ce.item(), abs=1e-6)
    other = hsakd_loss(logits, labels, logits.clone(), aux, [a.flip(1) for a in aux], w)
    assert other > same + 1e-3  # each stage's distribution counts
    with pytest.raises(UserError, match="kd: true"):
        HsakdLoss(None, None, w)(logits, labels, None)


def test_teacher_heads_are_trained_once_and_cached_by_the_teachers_weights(tmp_path) -> None:
    teacher, loader, _ = tiny_data(32)
    example = torch.randn(1, 1, 16, 16)
    kwargs = dict(
        weights=HsakdWeights(), epochs=1, lr=0.05, data={"name": "tiny"}, device=CPU, cache=tmp_path, max_steps=2
    )
    first = teacher_heads(teacher, example, loader, **kwargs)
    assert first.report["source"] == "trained" and first.points == ["layer1", "layer2", "layer3"]
    assert first.classes == 10
    assert all(h[-1].out_features == 40 for h in first.teacher_heads)  # class x rotation
    again = teacher_heads(teacher, example, loader, **kwargs)
    assert again.report["source"].startswith("cache ")
    for a, b in zip(first.teacher_heads.state_dict().values(), again.teacher_heads.state_dict().values()):
        assert torch.equal(a, b)
    other = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()  # other weights: other heads
    assert teacher_heads(other, example, loader, **kwargs).report["source"] == "trained"
    for damaged in tmp_path.glob("*.safetensors"):
        damaged.write_bytes(b"not a safetensors file")
    assert teacher_heads(teacher, example, loader, **kwargs).report["source"] == "trained"
    with pytest.raises(UserError, match="square"):
        teacher_heads(teacher, torch.randn(1, 1, 16, 12), loader, **kwargs)


def test_aux_network_trains_its_heads_and_leaves_no_hook() -> None:
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 16, 16)
    points = ["layer1", "layer2", "layer3"]
    heads = make_heads(net, points, x, 10)
    wrapped = AuxNetwork(net, heads, points)
    logits = wrapped(x)
    assert logits.shape == (8, 10) and [a.shape for a in wrapped.aux] == [(8, 40)] * 3
    teacher = AuxNetwork(net, heads, points)
    with torch.no_grad():
        t_logits = teacher(x)
    t_aux = [a.detach() for a in teacher.aux]
    loss = HsakdLoss(wrapped, teacher, HsakdWeights())
    wrapped(x)
    value = loss(wrapped(x), torch.tensor([1, 2]), t_logits)
    value.backward()
    assert all(p.grad is not None for p in heads.parameters())
    assert t_aux[0].shape == (8, 40)
    wrapped.remove()
    teacher.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.fixture(scope="module")
def tiny_setup():
    return tiny_data(32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cascade", "oneshot"])
def test_hsakd_runs_leave_a_plain_student(method, tiny_setup, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CASCADEC_CACHE", str(tmp_path))
    teacher, loader, val = tiny_setup
    example = torch.randn(1, 1, 16, 16)
    recipe = prune_recipe(method, {"distill": {"kd": True, "method": "hsakd"}})
    with torch_threads(1):
        torch.manual_seed(0)
        run = prune_model(teacher, recipe, loader, val, example, CPU)
    assert run.history["hsakd"]["points"] == ["layer1", "layer2", "layer3"]
    student = run.student.eval()
    assert set(student.state_dict()) == set(teacher.state_dict())  # no head in the network
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad(), masked(student, run.analysis.index, run.mask):
        y = student(x)
    assert y.shape == (4, 10)
    assert torch.allclose(y, shrink(student, run.analysis.index, run.mask, example)(x), atol=1e-5)
    if method == "cascade":
        # the joint losses carry the stage terms: the same run with plain KL has other ones
        torch.manual_seed(0)
        plain = prune_model(teacher, prune_recipe(method), loader, val, example, CPU)
        assert run.history["joint"][0]["losses"] != plain.history["joint"][0]["losses"]
        assert len(run.history["student"]) == 2  # start + one epoch, distilled through the heads


def test_hsakd_recipe_keys_are_checked() -> None:
    assert prune_recipe("cascade").distill.method == "kl"
    with pytest.raises(ValueError, match="needs kd: true"):
        prune_recipe("cascade", {"distill": {"kd": False, "method": "hsakd"}})
    with pytest.raises(ValueError, match="hints: none"):
        prune_recipe("cascade", {"distill": {"method": "hsakd", "hints": "stages"}})
    assert DistillLoss().kd_weight == prune_recipe("cascade").distill.kd_weight


@pytest.mark.slow
def test_hsakd_through_the_cli_exports_no_head_and_passes_parity(
    cli, tmp_path, tiny_recipe, finished_run, monkeypatch
) -> None:
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))  # the session's teacher
    out = tmp_path / "hsakd"
    with torch_threads(1):
        result = cli(
            "compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out, "--set", "distill.method=hsakd"
        )
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["passed"] is True
    graph = onnx.load(str(out / "student.onnx")).graph
    plain = onnx.load(str(finished_run.path / "student.onnx")).graph
    assert [n.op_type for n in graph.node] == [n.op_type for n in plain.node]  # the same network, no head
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:] == [10]
    assert {i.name for i in graph.initializer} == {i.name for i in plain.initializer}  # the network's weights only
