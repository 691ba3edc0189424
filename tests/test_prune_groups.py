"""cascadec.prune.groups: dependency groups, frozen groups and mask points on tiny nets."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import Chain
from torch import nn

from cascadec.models import create_model
from cascadec.prune.groups import build_groups
from cascadec.prune.masks import masked
from cascadec.prune.shrink import shrink


class GroupNormNet(nn.Module):
    """conv2 feeds a GroupNorm(2, 8): its channels prune a whole norm group at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.gn(self.conv2(x)))
        x = torch.relu(self.bn(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class LayerNormNet(nn.Module):
    """ConvNeXt-style channels-last LayerNorm after conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.ln(self.conv2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.relu(self.bn(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


EX = torch.randn(1, 1, 16, 16)


@pytest.fixture(scope="module")
def chain_index():
    torch.manual_seed(0)
    return build_groups(Chain(), EX)


@pytest.fixture(scope="module")
def resnet_index():
    torch.manual_seed(0)
    return build_groups(create_model("cifar_resnet8", num_classes=10, in_channels=1), EX)


def _outs(group) -> set[str]:
    return {m.module for m in group.members if m.role == "out"}


def _ins(group) -> set[str]:
    return {m.module for m in group.members if m.role == "in"}


# --------------------------------------------------------------------------- plain chain


def test_chain_one_group_per_hidden_conv(chain_index) -> None:
    idx = chain_index
    assert idx.first_conv == "conv1"
    assert idx.classifier == "fc"
    by_root = idx.by_root()
    assert set(by_root) == {"conv2", "conv3"}
    assert _outs(by_root["conv2"]) == {"conv2", "bn2"}
    assert _ins(by_root["conv2"]) == {"conv3"}
    assert _outs(by_root["conv3"]) == {"conv3", "bn3"}
    assert _ins(by_root["conv3"]) == {"fc"}
    assert by_root["conv2"].size == 12 and by_root["conv3"].size == 16
    assert idx.num_units == 28
    # offsets index the flat unit vector group by group
    sizes = [g.size for g in idx.groups]
    assert idx.offsets() == [sum(sizes[:i]) for i in range(len(sizes))]
    assert [g.index for g in idx.groups] == list(range(len(idx.groups)))


def test_chain_first_conv_and_classifier_frozen_with_reason(chain_index) -> None:
    frozen = {f.root: f for f in chain_index.frozen}
    assert set(frozen) == {"conv1", "fc"}
    assert "first conv" in frozen["conv1"].reason and "conv1" in frozen["conv1"].reason
    assert frozen["conv1"].size == 8
    assert "classifier" in frozen["fc"].reason and "fc" in frozen["fc"].reason
    assert frozen["fc"].size == 10
    # nothing frozen is also prunable
    prunable_outs = set().union(*(_outs(g) for g in chain_index.groups))
    assert "conv1" not in prunable_outs and "bn1" not in prunable_outs and "fc" not in prunable_outs


def test_chain_mask_points_are_the_batchnorms(chain_index) -> None:
    for g in chain_index.groups:
        points = [p.module for p in g.mask_points]
        bn = g.root.replace("conv", "bn")
        assert points == [bn], (g.root, points)  # not the conv that feeds the BN
        (p,) = g.mask_points
        assert p.role == "out"
        assert sorted(p.idxs) == list(range(g.size)) and sorted(p.root_idxs) == list(range(g.size))


# --------------------------------------------------------------------------- residual net


def test_resnet_couples_block_outputs(resnet_index) -> None:
    idx = resnet_index
    owner = {}
    for g in idx.groups:
        for name in _outs(g):
            owner.setdefault(name, set()).add(g.root)
    # stage 2 and 3: the block's last conv and its projection shortcut share one group
    for stage, width in (("layer2", 32), ("layer3", 64)):
        conv2, short = f"{stage}.0.conv2", f"{stage}.0.shortcut.0"
        assert owner[conv2] == owner[short], (conv2, owner[conv2], owner[short])
        (root,) = owner[conv2]
        g = idx.by_root()[root]
        assert g.size == width
        assert {conv2, f"{stage}.0.bn2", short, f"{stage}.0.shortcut.1"} <= _outs(g)
        # mask points: both BatchNorms before the add (masked == shrunk), no conv
        assert {p.module for p in g.mask_points} == {f"{stage}.0.bn2", f"{stage}.0.shortcut.1"}
    # stage 3's stream feeds the classifier; stage 2's stream feeds stage 3's block input
    assert "fc" in _ins(idx.by_root()[next(iter(owner["layer3.0.conv2"]))])
    assert {"layer3.0.conv1", "layer3.0.shortcut.0"} <= _ins(idx.by_root()[next(iter(owner["layer2.0.conv2"]))])
    # each block's inner conv is its own group
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"):
        assert len(owner[name]) == 1
        g = idx.by_root()[next(iter(owner[name]))]
        assert _outs(g) == {name, name.replace("conv1", "bn1")}
        assert [p.module for p in g.mask_points] == [name.replace("conv1", "bn1")]
    assert len(idx.groups) == 5


def test_prune_stem_makes_the_stem_group_prunable_and_exact() -> None:
    """``prune.prune_stem``: the first conv's outputs (and the stage-1 residual stream tied to them)
    become one prunable group, which the exactness trial keeps (masked == shrunk)."""
    from cascadec.prune.trial import prove_groups

    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    index = prove_groups(model, build_groups(model, EX, prune_stem=True), EX)
    stem = [g for g in index.groups if "conv1" in _outs(g)]
    assert len(stem) == 1 and {"conv1", "layer1.0.conv2"} <= _outs(stem[0])
    assert "conv1" not in {f.root for f in index.frozen}
    assert "fc" in {f.root for f in index.frozen}  # the classifier stays frozen either way


def test_resnet_stage1_stream_is_frozen_with_the_stem(resnet_index) -> None:
    """Identity shortcuts tie layer1's output to the stem conv, kept by default (prune.prune_stem)."""
    idx = resnet_index
    prunable_outs = set().union(*(_outs(g) for g in idx.groups))
    assert "conv1" not in prunable_outs and "layer1.0.conv2" not in prunable_outs
    frozen = {f.root: f.reason for f in idx.frozen}
    assert "first conv" in frozen["conv1"]
    assert "classifier" in frozen["fc"]


def test_resnet20_couples_all_blocks_of_a_stage() -> None:
    torch.manual_seed(0)
    idx = build_groups(create_model("cifar_resnet20", num_classes=10, in_channels=1), EX)
    for stage in ("layer2", "layer3"):
        (g,) = [g for g in idx.groups if f"{stage}.0.conv2" in _outs(g)]
        assert {f"{stage}.{b}.conv2" for b in range(3)} <= _outs(g)
        assert {p.module for p in g.mask_points} == {f"{stage}.{b}.bn2" for b in range(3)} | {f"{stage}.0.shortcut.1"}


# --------------------------------------------------------------------------- frozen by normalisation / grouping


def test_layer_norm_group_is_frozen() -> None:
    torch.manual_seed(0)
    idx = build_groups(LayerNormNet(), EX)
    frozen = {f.root: f.reason for f in idx.frozen}
    assert "LayerNorm" in frozen["conv2"] and "across channels" in frozen["conv2"]
    prunable_outs = set().union(*(_outs(g) for g in idx.groups))
    assert "conv2" not in prunable_outs
    # the unaffected group (conv3 -> BN) stays prunable
    assert "conv3" in idx.by_root()


def _masked_equals_shrunk(model: nn.Module, idx, keep: torch.Tensor, x: torch.Tensor) -> nn.Module:
    student = shrink(model, idx, keep, x).eval()
    with torch.no_grad(), masked(model, idx, keep):
        expected = model(x)
    with torch.no_grad():
        got = student(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    return student


def test_group_norm_units_are_whole_groups() -> None:
    """GroupNorm(2, 8): a unit is one group of 4 channels; removing it leaves the other group's
    statistics as they were, so masked == shrunk, and the norm keeps 1 group of 4 channels."""
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    idx = build_groups(model, EX)
    group = idx.by_root()["conv2"]
    assert group.size == 2 and group.root_units == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert {p.module for p in group.mask_points} == {"gn"}  # after the norm, so its bias is masked too
    keep = torch.ones(idx.num_units)
    keep[idx.offsets()[group.index] + 1] = 0.0
    student = _masked_equals_shrunk(model, idx, keep, torch.randn(2, 1, 16, 16))
    assert (student.gn.num_groups, student.gn.num_channels, student.conv2.out_channels) == (1, 4, 4)


def test_single_group_norm_is_frozen() -> None:
    torch.manual_seed(0)
    model = GroupNormNet()
    model.gn = nn.GroupNorm(1, 8)
    frozen = {f.root: f.reason for f in build_groups(model, EX).frozen}
    assert "GroupNorm 'gn'" in frozen["conv2"] and "across channels" in frozen["conv2"]


class GroupedConvNet(nn.Module):
    """A non-depthwise grouped conv (groups=2) between two prunable groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        x = torch.relu(self.bn1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def test_grouped_conv_units_take_one_position_from_every_group() -> None:
    """Both sides of conv2 (groups=2) prune by the same position in each group, which keeps it one
    grouped conv with equal groups (how Torch-Pruning slices it), and masked == shrunk."""
    torch.manual_seed(0)
    model = GroupedConvNet().eval()
    idx = build_groups(model, EX)
    by_root = idx.by_root()
    assert by_root["conv1"].root_units == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert by_root["conv2"].root_units == [[0, 3], [1, 4], [2, 5]]
    keep = torch.ones(idx.num_units)
    for root, unit in (("conv1", 2), ("conv1", 3), ("conv2", 0)):
        keep[idx.offsets()[by_root[root].index] + unit] = 0.0
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.bias.uniform_(-0.5, 0.5)
    student = _masked_equals_shrunk(model, idx, keep, torch.randn(2, 1, 16, 16))
    assert (student.conv2.in_channels, student.conv2.out_channels, student.conv2.groups) == (4, 4, 2)


def test_grouped_conv_fed_by_a_concat_of_two_groups_is_frozen() -> None:
    """Each half of conv's input comes from another producer: position p of group 0 and of group 1
    lie in different groups, so neither can remove it alone."""

    class ConcatIntoGroupedConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(1, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.conv0(x))
            x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    idx = build_groups(ConcatIntoGroupedConv(), EX)
    frozen = {f.root: f.reason for f in idx.frozen}
    assert "grouped conv 'conv' (groups=2)" in frozen["a"] and "another layer" in frozen["a"]
    assert "b" in frozen


def test_round_to_counts_channels_in_tied_units() -> None:
    """round_to=4 on conv1's group (units of 2 channels, one per group of conv2) rounds to 2 units,
    so every kept width is a multiple of 4 channels, not of 4 units (8 channels)."""
    from cascadec.prune.cost import CostModel
    from cascadec.prune.targets import Budget, MaskSolver

    torch.manual_seed(0)
    model = GroupedConvNet().eval()
    idx = build_groups(model, EX)
    group = idx.by_root()["conv1"]
    assert group.unit_channels == 2
    cost = CostModel.build(model, idx, EX)
    solver = MaskSolver(idx, cost, round_to=4)
    assert int(solver.step[group.index]) == 2
    start = idx.offsets()[group.index]
    for reduction in (0.1, 0.3, 0.5):
        keep = solver.solve(torch.rand(idx.num_units), Budget.from_target(cost, flops_reduction=reduction))
        channels = len(group.root_channels(torch.nonzero(keep[start : start + group.size]).flatten().tolist()))
        assert channels % 4 == 0 and channels > 0
