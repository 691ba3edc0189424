"""FBS dynamic gating (prune/fbs.py): exactly ceil(d * C) channels per image, gates that can
be the identity, effective MACs counted image by image, ONNX export with its parity, the
saved student rebuilt with its gates, and a whole CLI run."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from helpers.cli import torch_threads

from cascadec.backends.onnx_export import export_onnx
from cascadec.backends.onnxruntime_backend import OrtRunner
from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.prune.fbs import (
    GatedConv,
    SaliencyGate,
    effective_macs,
    gate_points,
    gated_layers,
    gated_student,
    install_gates,
)
from cascadec.prune.spec import load_student, save_student

CPU = torch.device("cpu")


@pytest.mark.parametrize("keep", [0.1, 0.375, 0.5, 1.0])
def test_gates_keep_exactly_ceil_d_c_channels_per_image(keep) -> None:
    torch.manual_seed(0)
    gate = SaliencyGate(16, 24, keep)
    with torch.no_grad():
        gate.fc.bias.fill_(5.0)  # every saliency > 0: each selected channel computes something
    x = torch.randn(32, 16, 5, 5)
    g = gate(x)
    k = math.ceil(keep * 24)
    assert ((g > 0).sum(1) == k).all()
    # the kept ones are the image's top k saliencies, scaled by them
    s = torch.relu(gate.fc(x.mean((2, 3))))
    top = s.topk(k, dim=1)
    assert torch.equal(g.gather(1, top.indices), top.values)
    if keep < 1:
        assert len({tuple(row.nonzero().flatten().tolist()) for row in g}) > 1  # dynamic: images differ


def _chain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def test_gate_points_skip_the_stem_and_an_identity_gate_changes_nothing() -> None:
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    pairs = gate_points(net)
    assert ("conv1", "bn1") not in pairs and ("layer1.0.conv1", "layer1.0.bn1") in pairs
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs
    gated, _ = gated_student(net, 1.0)
    for layer in gated_layers(gated):
        with torch.no_grad():
            layer.gate.fc.bias.fill_(1.0)  # keep everything at scale 1
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gated.eval()(x), net(x), atol=1e-6)
    assert isinstance(gated.get_submodule("layer1.0.conv1"), GatedConv)
    assert isinstance(gated.get_submodule("layer1.0.bn1"), nn.Identity)


def test_effective_macs_count_the_computed_channels_image_by_image() -> None:
    torch.manual_seed(0)
    net = _chain()
    assert gate_points(net) == [("3", "4")]  # the first conv reads the image: dense
    install_gates(net, gate_points(net), 0.5)
    with torch.no_grad():
        net.get_submodule("3").gate.fc.bias.fill_(5.0)
    x = torch.randn(6, 3, 4, 4)
    loader = [(x, torch.zeros(6, dtype=torch.long))]
    counted = effective_macs(net, loader, device=CPU)
    first = 3 * 8 * 9 * 16
    second_dense, second = 8 * 8 * 9 * 16, 8 * 4 * 9 * 16  # half the outputs computed per image
    gate_fc, linear = 8 * 8, 8 * 4
    assert counted["images"] == 6
    assert counted["dense_macs"] == first + second_dense + gate_fc + linear
    assert counted["effective_macs"] == pytest.approx(first + second + gate_fc + linear)
    assert not any(m._forward_hooks for m in net.modules())


def test_an_untraceable_network_is_refused_in_one_line() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(UserError, match="torch.fx"):
        gate_points(Branchy())


@pytest.mark.slow
def test_a_gated_student_exports_to_onnx_with_parity_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    student, pairs = gated_student(teacher, 0.5)
    for layer in gated_layers(student):
        with torch.no_grad():
            layer.gate.fc.weight.normal_(0, 0.5)  # image-dependent choices
    student.eval()
    x = torch.randn(8, 1, 16, 16)
    export_onnx(student, torch.zeros(1, 1, 16, 16), tmp_path / "student.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "student.onnx")).graph.node}
    assert "TopK" in ops  # the gating is in the graph
    runner = OrtRunner(tmp_path / "student.onnx")
    with torch.no_grad():
        expected = student(x).numpy()
    got = runner(x.numpy())
    assert np.abs(got - expected).max() < 1e-4
    save_student(
        student,
        tmp_path / "run",
        model_name="cifar_resnet8",
        model_kwargs={"num_classes": 10, "in_channels": 1},
        input_shape=[1, 16, 16],
        removals={},
        extra={"fbs": {"keep": 0.5, "gated": [list(p) for p in pairs]}},
    )
    loaded, spec = load_student(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    spec_path = tmp_path / "run" / "student.widths.json"
    broken = json.loads(spec_path.read_text())
    broken["fbs"]["gated"] = [["no.such.conv", "bn"]]
    spec_path.write_text(json.dumps(broken))
    with pytest.raises(UserError, match="fbs gates do not fit"):
        load_student(tmp_path / "run")


@pytest.mark.slow
def test_fbs_through_the_cli(cli, tmp_path, tiny_recipe, finished_run, monkeypatch) -> None:
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))  # the session's teacher
    out = tmp_path / "fbs"
    with torch_threads(1):
        result = cli("compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out, "--set", "prune.method=fbs")
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["passed"] is True
    s, t = report["student"], report["teacher"]
    assert s["flops"] >= t["flops"]  # dense backends compute every channel, plus the gates
    assert 0 < s["effective_flops"] < t["flops"]
    md = (out / "report.md").read_text()
    assert "if gated channels are skipped (FBS)" in md and "ONNX Runtime and TensorRT compute dense" in md
    # an untrained static student of the same MACs per image is timed beside it
    assert (out / "static_equivalent.onnx").is_file() and "Static student, same MACs: CPU latency" in md
    static = report["latency"]["onnxruntime"]["static_equivalent"]
    assert all(row["p50_ms"] > 0 for row in static.values())
    loaded, spec = load_student(out)
    assert spec["method"] == "fbs" and len(gated_layers(loaded)) == len(spec["fbs"]["gated"]) > 0


def test_a_dry_run_shows_what_fbs_gates_instead_of_a_static_target(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    result = cli("compress", "cifar_resnet8", "--recipe", "fmnist_fbs", "--dry-run")
    assert result.code == 0, result.err
    assert "FBS: 8 convolutions gated, ceil(0.5 x C) output channels per image" in result.out
    assert "target 50% fewer FLOPs" not in result.out  # FBS has no static target: no widths promised
    assert list(tmp_path.iterdir()) == []


def test_fbs_recipe_keys_are_checked() -> None:
    from helpers.tiny_prune import prune_recipe

    assert prune_recipe("fbs").prune.fbs.keep == 0.5
    with pytest.raises(ValueError, match="prune.fbs.keep"):
        prune_recipe("fbs", {"prune": {"method": "fbs", "compensate": True}})
    with pytest.raises(ValueError, match="prune.fbs.keep"):
        prune_recipe("fbs", {"prune": {"method": "fbs", "target": {"latency_reduction": 0.5}}})
    with pytest.raises(ValueError):
        prune_recipe("fbs", {"prune": {"method": "fbs", "fbs": {"keep": 0.0}}})


class _Pairs(nn.Module):
    """A stem, then a conv -> BN pair (gated), a conv -> ReLU without BN (not gated) and a conv
    whose output feeds its BN and a second use (not gated: the BN is not its only reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a, self.a_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.b_act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.c, self.c_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_bn(self.a(self.stem_bn(self.stem(x))))
        x = self.b_act(self.b(x))
        y = self.c(x)
        return self.c_bn(y) + y


def test_only_a_conv_whose_one_reader_is_a_batchnorm_is_gated() -> None:
    assert gate_points(_Pairs()) == [("a", "a_bn")]


def test_fresh_gates_start_near_the_identity_and_break_ties_by_gamma() -> None:
    """The gates' first outputs are 1 + 0.01 x the channel's |gamma| rank: within 1 % of the
    identity, all distinct (equal saliencies would leave the pick to each runtime's TopK)."""
    net = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    gated, _ = gated_student(net, 0.5)
    x = torch.randn(2, 1, 16, 16)
    for layer in gated_layers(gated):
        with torch.no_grad():
            g = layer.gate(torch.randn(2, layer.conv.in_channels, 8, 8))
        kept = g[g > 0]
        assert kept.numel() == 2 * layer.gate.k
        assert kept.min() >= 1.0 and kept.max() < 1.01
        assert len(set(g[0][g[0] > 0].tolist())) == layer.gate.k  # no ties
    with torch.no_grad():
        assert torch.isfinite(gated(x)).all()
