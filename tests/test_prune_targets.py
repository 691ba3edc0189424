"""cascadec.prune.targets + cost: budgets met within 2 %, rounding, infeasibility, analytic cost
== measured cost of the shrunk net, and the TA keep fractions of the hierarchy."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers.nets import MixedNet as DepthwiseNet
from helpers.tiny_prune import prune_recipe
from torch import nn

from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.prune.cascade import ta_fractions
from cascadec.prune.cost import CostModel, count_macs, count_params
from cascadec.prune.groups import build_groups
from cascadec.prune.masks import split_units
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver

TOL = 0.02


class Setup:
    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model.eval()
        self.example = example
        self.index = build_groups(model, example)
        self.cost = CostModel.build(model, self.index, example)


@pytest.fixture(scope="module")
def r8() -> Setup:
    torch.manual_seed(0)
    return Setup(create_model("cifar_resnet8", num_classes=10, in_channels=1), torch.randn(1, 1, 16, 16))


@pytest.fixture(scope="module")
def r18() -> Setup:
    torch.manual_seed(0)
    return Setup(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64))


@pytest.fixture(scope="module")
def dwnet() -> Setup:
    torch.manual_seed(0)
    return Setup(DepthwiseNet(), torch.randn(1, 1, 16, 16))


def _scores(setup: Setup, seed: int) -> torch.Tensor:
    return torch.rand(setup.index.num_units, generator=torch.Generator().manual_seed(seed))


def _achieved(setup: Setup, metric: str, mask: torch.Tensor) -> float:
    return setup.cost.metric(metric, mask) / setup.cost.base(metric)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("net", ["r8", "r18"])
@pytest.mark.parametrize(
    "kind, value",
    [
        ("flops_reduction", 0.5),
        ("flops_reduction", 0.75),
        ("flops_reduction", 0.9),
        ("params_reduction", 0.5),
        ("params_reduction", 0.75),
        ("params_reduction", 0.9),
        ("keep_ratio", 0.25),
        ("keep_ratio", 0.5),
        ("keep_ratio", 0.8),
    ],
)
def test_solve_meets_target_within_2_percent(net, kind, value, request) -> None:
    setup: Setup = request.getfixturevalue(net)
    budget = Budget.from_target(setup.cost, **{kind: value})
    metric = {"flops_reduction": "flops", "params_reduction": "params", "keep_ratio": "units"}[kind]
    target_fraction = value if kind == "keep_ratio" else 1.0 - value
    assert budget.metric == metric and budget.keep_fraction == pytest.approx(target_fraction)
    solver = MaskSolver(setup.index, setup.cost)
    mask = solver.solve(_scores(setup, 0), budget)
    assert mask.shape == (setup.index.num_units,)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    achieved = _achieved(setup, metric, mask)
    assert abs(achieved - target_fraction) <= TOL, (achieved, target_fraction)
    assert achieved <= target_fraction + 1e-9  # the budget is a ceiling
    for part in split_units(setup.index, mask):  # min_channels = 1
        assert part.sum() >= 1


def test_keep_ratio_mask_is_a_global_top_k(r8) -> None:
    """One threshold for the whole network (not per layer): every kept unit outranks every removed one."""
    scores = _scores(r8, 3)
    mask = MaskSolver(r8.index, r8.cost).solve(scores, Budget.from_target(r8.cost, keep_ratio=0.5))
    assert int(mask.sum()) == r8.index.num_units // 2
    assert scores[mask > 0].min() > scores[mask == 0].max()
    # and the per-layer keep ratios differ (a per-layer threshold would give 0.5 everywhere)
    ratios = {round(float(p.mean()), 3) for p in split_units(r8.index, mask)}
    assert len(ratios) > 1


def test_min_channels_floor(r8) -> None:
    solver = MaskSolver(r8.index, r8.cost, min_channels=4)
    scores = torch.zeros(r8.index.num_units)
    scores[: r8.index.groups[0].size] = 1.0  # every other group would be emptied by a pure top-k
    mask = solver.solve(scores, Budget.from_target(r8.cost, keep_ratio=0.3))
    for part in split_units(r8.index, mask):
        assert part.sum() >= 4


@pytest.mark.parametrize(
    "net, kind, value",
    [
        ("r8", "flops_reduction", 0.5),
        ("r18", "flops_reduction", 0.5),
        ("r18", "flops_reduction", 0.75),
        ("r18", "params_reduction", 0.75),
        ("r8", "keep_ratio", 0.5),
    ],
)
def test_round_to_8_widths(net, kind, value, request) -> None:
    setup: Setup = request.getfixturevalue(net)
    solver = MaskSolver(setup.index, setup.cost, round_to=8)
    budget = Budget.from_target(setup.cost, **{kind: value})
    mask = solver.solve(_scores(setup, 1), budget)
    for g, part in zip(setup.index.groups, split_units(setup.index, mask)):
        kept = int(part.sum())
        assert kept % 8 == 0 or kept == g.size, (g.root, kept, g.size)
        assert kept >= min(8, g.size)
    assert abs(_achieved(setup, budget.metric, mask) - budget.keep_fraction) <= TOL
    assert _achieved(setup, budget.metric, mask) <= budget.keep_fraction + 1e-9


@pytest.mark.parametrize("kind", ["flops_reduction", "params_reduction"])
def test_infeasible_target_raises(r8, kind) -> None:
    solver = MaskSolver(r8.index, r8.cost)
    with pytest.raises(UserError, match="infeasible"):
        solver.solve(_scores(r8, 0), Budget.from_target(r8.cost, **{kind: 0.999}))


class StemTiedNet(nn.Module):
    """A user's own small network (issue 32, item 6): a stem, two branches concatenated and added
    back to the stem's output, a squeeze-excitation gate, a head. Every wide conv's outputs are
    tied to the stem's, so with the stem kept by policy almost nothing is prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.branch_a = nn.Conv2d(32, 16, 3, padding=1, bias=False)
        self.branch_b = nn.Conv2d(32, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn1(torch.cat([self.branch_a(x), self.branch_b(x)], 1))
        y = y * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(x + y).mean((2, 3)))


def _stem_refusal(model: nn.Module, example: torch.Tensor, reduction: float, prune_stem: bool = False) -> str | None:
    """The one line ``check_feasible`` refuses the target with (None: feasible)."""
    from cascadec.prune.analysis import analyse, check_feasible

    recipe = prune_recipe("oneshot", {"prune": {"target": {"flops_reduction": reduction}, "prune_stem": prune_stem}})
    try:
        check_feasible(model, recipe, analyse(model, recipe, example))
    except UserError as refused:
        return str(refused)
    return None


def test_a_target_refused_for_the_stems_policy_says_how_to_lift_it() -> None:
    """Refused at 30 % fewer FLOPs with the first conv's outputs kept: the one line says the
    target is met with prune.prune_stem, and it is."""
    model, x = StemTiedNet().eval(), torch.zeros(1, 3, 16, 16)
    line = _stem_refusal(model, x, 0.3)
    assert line is not None and line.startswith("target infeasible")
    assert line.endswith("with them prunable the target is met: --set prune.prune_stem=true"), line
    assert _stem_refusal(model, x, 0.3, prune_stem=True) is None


def test_a_target_the_stem_cannot_rescue_is_refused_without_the_hint(r8) -> None:
    """ResNet-8 at 99.9 % fewer FLOPs is infeasible with or without the stem: no false way out."""
    line = _stem_refusal(r8.model, r8.example, 0.999)
    assert line is not None and "infeasible" in line and "prune_stem" not in line


def test_budget_needs_exactly_one_target(r8) -> None:
    with pytest.raises(UserError, match="exactly one"):
        Budget.from_target(r8.cost)
    with pytest.raises(UserError, match="exactly one"):
        Budget.from_target(r8.cost, flops_reduction=0.5, keep_ratio=0.5)
    with pytest.raises(UserError, match="outside"):
        Budget.from_target(r8.cost, flops_reduction=1.0)


# --------------------------------------------------------------------------- analytic cost == measured cost


@pytest.mark.parametrize("net", ["r8", "r18", "dwnet"])
def test_analytic_cost_equals_measured_cost_of_shrunk_net(net, request) -> None:
    setup: Setup = request.getfixturevalue(net)
    ones = torch.ones(setup.index.num_units)
    assert setup.cost.macs(ones) == count_macs(setup.model, setup.example)
    assert setup.cost.params(ones) == count_params(setup.model)
    solver = MaskSolver(setup.index, setup.cost)
    masks = [solver.solve(_scores(setup, 5), Budget.from_target(setup.cost, flops_reduction=0.6))]
    if net != "r18":  # shrinking resnet18 is the slow part; one mask is enough there
        g = torch.Generator().manual_seed(9)
        m = (torch.rand(setup.index.num_units, generator=g) < 0.4).float()
        for part in split_units(setup.index, m):
            part[0] = 1.0
        masks.append(m)
    for mask in masks:
        small = shrink(setup.model, setup.index, mask, setup.example)
        assert setup.cost.macs(mask) == count_macs(small, setup.example)
        assert setup.cost.params(mask) == count_params(small)
        assert count_macs(small, setup.example) < count_macs(setup.model, setup.example)


def test_count_macs_by_hand() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    # conv: 5*5 positions * 3*3 kernel * 2 in * 4 out; linear: 100 * 3 (no bias, no BN counted)
    assert count_macs(model, torch.zeros(1, 2, 5, 5)) == 25 * 9 * 2 * 4 + 100 * 3
    assert count_params(model) == (4 * 2 * 9 + 4) + 8 + (100 * 3 + 3)


# --------------------------------------------------------------------------- TA fractions


@pytest.mark.parametrize("k0", [0.1, 0.3, 0.5])
def test_ta_fractions_paper_formula_for_three_tas(k0) -> None:
    f = ta_fractions(k0, 3)
    assert f == pytest.approx([k0, 1 + (k0 - 1) / 1.5, 1 + (k0 - 1) / 2.5, 1.0])


@pytest.mark.parametrize("num_tas", [1, 2, 4, 5])
def test_ta_fractions_uniform_and_increasing(num_tas) -> None:
    k0 = 0.3
    f = ta_fractions(k0, num_tas)
    assert len(f) == num_tas + 1
    assert f[0] == k0 and f[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(f, f[1:])]
    assert all(s > 0 for s in steps)
    assert steps == pytest.approx([(1 - k0) / num_tas] * num_tas)


def test_ta_fractions_no_tas_and_explicit() -> None:
    assert ta_fractions(0.4, 0) == [0.4]
    assert ta_fractions(0.4, 2, [0.6, 1.0]) == [0.4, 0.6, 1.0]
    with pytest.raises((ValueError, UserError), match="increase"):
        ta_fractions(0.4, 2, [0.3, 1.0])
    with pytest.raises((ValueError, UserError), match="end with 1.0"):
        ta_fractions(0.4, 1, [1.2])
    with pytest.raises((ValueError, UserError), match="end with 1.0"):
        ta_fractions(0.4, 1, [0.8])


def test_budget_scaled_for_tas(r8) -> None:
    student = Budget.from_target(r8.cost, flops_reduction=0.75)
    budgets = [student.scaled(f, r8.cost) for f in ta_fractions(student.keep_fraction, 2)]
    assert [b.keep_fraction for b in budgets] == pytest.approx([0.25, 0.625, 1.0])
    assert budgets[-1].value == pytest.approx(r8.cost.base_macs)
    full = MaskSolver(r8.index, r8.cost).solve(_scores(r8, 0), budgets[-1])
    assert full.sum() == r8.index.num_units


@pytest.mark.parametrize("value", [0.5, 0.75])
def test_uniform_allocation_keeps_the_same_fraction_of_every_group(r18, value) -> None:
    """Torch-Pruning's default local allocation: one kept fraction for all groups, the best units
    of each group by score, the cost within the budget."""
    solver = MaskSolver(r18.index, r18.cost, allocation="uniform")
    budget = Budget.from_target(r18.cost, flops_reduction=value)
    scores = _scores(r18, 3)
    mask = solver.solve(scores, budget)
    achieved = _achieved(r18, "flops", mask)
    assert budget.keep_fraction - TOL <= achieved <= budget.keep_fraction + 1e-9  # the same target as global
    fractions = [float(part.mean()) for part in split_units(r18.index, mask)]
    # one shared fraction, give or take the channels that spend the rest of the budget
    assert max(fractions) - min(fractions) <= 0.1, fractions
    for part, group_scores in zip(split_units(r18.index, mask), split_units(r18.index, scores)):
        kept, dropped = group_scores[part > 0.5], group_scores[part < 0.5]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()  # within a group, the best units stay


def test_unknown_allocation_is_a_user_error(r8) -> None:
    with pytest.raises(UserError, match="allocation"):
        MaskSolver(r8.index, r8.cost, allocation="layerwise")


def _plain_group(size: int, members: list | None = None):
    from cascadec.prune.groups import ChannelGroup, GroupIndex, Member

    everything = list(range(size))
    group = ChannelGroup(index=0, root="a", size=size, members=members or [Member("a", "out", everything, everything)])
    return GroupIndex(groups=[group], frozen=[], first_conv=None, classifier=None)


def test_the_narrow_width_is_kept_at_its_boundary_and_rounded_above_it() -> None:
    """round_to 8 with a 4-channel narrow width (a latency table's half block): 3 or 4 kept
    channels become 4, 5 become 8 (mutation testing found the boundary unpinned)."""
    solver = MaskSolver(_plain_group(16), None, round_to=8, narrow=4)
    assert [int(solver.widths(torch.tensor([k]))[0]) for k in (1, 3, 4, 5, 8, 9, 16)] == [4, 4, 4, 8, 8, 16, 16]


def test_every_segment_of_a_split_group_ranks_its_best_unit_first() -> None:
    """A group whose units 0-1 and 2-3 feed different layers (two segments): each segment's best
    unit leads, so the group's floor keeps one unit of each (mutation testing: ``>=`` to ``>``
    in the leader test went unnoticed)."""
    from cascadec.prune.groups import Member

    members = [
        Member("a", "out", [0, 1, 2, 3], [0, 1, 2, 3]),
        Member("b", "in", [0, 1], [0, 1]),
        Member("c", "in", [0, 1], [2, 3]),
    ]
    solver = MaskSolver(_plain_group(4, members), None)
    assert solver.num_segments == 2
    scores = torch.tensor([0.9, 0.8, 0.1, 0.3])
    assert solver._leaders(scores).tolist() == [True, False, False, True]
    ranks = solver._ranks_within_group(scores)
    assert sorted(ranks[[0, 3]].tolist()) == [0, 1]  # both leaders before unit 1, which outscores unit 3


def test_a_conv_with_one_output_channel_is_costed_like_any_other() -> None:
    """A one-channel map (a saliency or segmentation head) read by the classifier: the cost
    model's MACs and params of every mask equal the shrunk network's, counted."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # the stem (its outputs are kept by policy)
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 1, 3, padding=1),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).eval()
    example = torch.randn(1, 1, 6, 6)
    index = build_groups(model, example)
    cost = CostModel.build(model, index, example)
    assert index.num_units == 8 and cost.macs(torch.ones(8)) == count_macs(model, example)
    mask = torch.ones(index.num_units)
    mask[: index.num_units // 2] = 0.0
    small = shrink(model, index, mask, example)
    assert cost.macs(mask) == count_macs(small, example) and cost.params(mask) == count_params(small)
