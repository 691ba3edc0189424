"""The architectures Torch-Pruning cannot follow end in bounded time, with the right channels
frozen, or with a clean one-line refusal -- never a hang, a traceback or an OOM.

* ShuffleNetV2: its channel shuffle made Torch-Pruning divide by zero; now the groups that
  pass the shuffle are frozen and the branches' inner channels stay prunable.
* Swin: window partition reshapes made the group index lists grow geometrically until
  memory ran out; now those roots are frozen and the MLP hidden channels stay prunable.
  Swin-S/B also ran out of Torch-Pruning's shape-inference step budget (TypeError at a concat).
For both, what is still pruned must be exact: the masked network equals the shrunk one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import EXPLODING_REASON, OPAQUE_RESHAPE_REASON, build_groups
from cascadec.prune.masks import masked
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver

REPO = Path(__file__).resolve().parent.parent
ANALYSIS_BUDGET_S = 60.0  # took 82 s then MemoryError (swin_t, 224 px) / raised (shufflenet) before


def _shrunk_matching_masked(model: nn.Module, index, keep: torch.Tensor, x: torch.Tensor) -> nn.Module:
    """Shrink ``model`` to ``keep`` and check it computes what the masked original does."""
    student = shrink(model, index, keep, x[:1]).eval()
    with torch.no_grad():
        with masked(model, index, keep):
            y_masked = model(x)
        y_shrunk = student(x)
    assert torch.allclose(y_masked, y_shrunk, atol=1e-4, rtol=1e-4), float((y_masked - y_shrunk).abs().max())
    return student


def _masked_equals_shrunk(name: str, size: int) -> tuple[object, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics: a mask placed before BN would show
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    x = torch.randn(2, 3, size, size, generator=gen)
    start = time.perf_counter()
    index = build_groups(model, x[:1])
    seconds = time.perf_counter() - start
    cost = CostModel.build(model, index, x[:1])
    keep = MaskSolver(index, cost).solve(
        torch.rand(index.num_units, generator=gen), Budget.from_target(cost, flops_reduction=0.2)
    )
    assert int(keep.sum()) < keep.numel(), "the mask must remove channels for the check to mean anything"
    _shrunk_matching_masked(model, index, keep, x)
    return index, seconds


@pytest.mark.slow
def test_shufflenet_shuffle_groups_frozen_branches_pruned_exactly() -> None:
    index, seconds = _masked_equals_shrunk("shufflenet_v2_x0_5", 32)
    assert seconds < ANALYSIS_BUDGET_S
    reasons = {f.reason for f in index.frozen}
    assert any(r == OPAQUE_RESHAPE_REASON or r.startswith("Torch-Pruning cannot follow") for r in reasons), reasons
    # the inner channels of every branch2 (1x1 conv -> BN -> depthwise 3x3 -> BN) stay prunable
    inner = [g for g in index.groups if "stage" in g.root]
    assert len(inner) == 16 and all({"branch2.0", "branch2.5"} <= {n.split(".", 2)[2] for n in g.layers} for g in inner)


@pytest.mark.slow
def test_swin_analysis_bounded_and_mlp_pruned_exactly() -> None:
    index, seconds = _masked_equals_shrunk("swin_t", 32)
    assert seconds < ANALYSIS_BUDGET_S
    assert index.groups and all(".mlp." in g.root for g in index.groups)
    assert any(f.reason == EXPLODING_REASON for f in index.frozen)


@pytest.mark.slow
def test_deep_swin_within_the_shape_walk_budget_pruned_exactly() -> None:
    # swin_s/swin_b: 18 blocks in stage 3 used up Torch-Pruning's 500-step shape walk, and
    # PatchMerging's concat then failed on a None width (TypeError: int + NoneType). Depth is
    # what matters, so this is swin_s's block layout at a tenth of its width.
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2, 18, 2],
        num_heads=[1, 2, 4, 8],
        window_size=[7, 7],
        stochastic_depth_prob=0.0,
        num_classes=10,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    start = time.perf_counter()
    index = build_groups(model, x[:1])
    assert time.perf_counter() - start < ANALYSIS_BUDGET_S
    assert len(index.groups) == 24 and all(".mlp." in g.root for g in index.groups)  # one per block's MLP
    # shrinking re-walks the graph once per pruned group (slow at the larger budget), so prune
    # two groups: one in the 18-block stage and one past the last PatchMerging concat
    keep = torch.ones(index.num_units)
    offsets = [0]
    for g in index.groups:
        offsets.append(offsets[-1] + g.size)
    for i in (12, 23):
        keep[offsets[i] : offsets[i] + index.groups[i].size // 2] = 0
    student = _shrunk_matching_masked(model, index, keep, x)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())


class _TwoBranchConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)  # the first conv is never pruned: keep it out of the concat
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_mapping_failure_freezes_instead_of_raising(monkeypatch) -> None:
    from torch_pruning.dependency import index_mapping

    def no_widths(graph, node):  # what Torch-Pruning does when a width was inferred as None
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(index_mapping, "update_concat_index_mapping", no_widths)
    index = build_groups(_TwoBranchConcat().eval(), torch.zeros(1, 3, 8, 8))
    frozen = {f.root: f.reason for f in index.frozen}
    assert frozen.get("a") == OPAQUE_RESHAPE_REASON, frozen
    # nothing that feeds the concat stays prunable (b's channels went with a's frozen group)
    assert not [m.module for g in index.groups for m in g.members if m.module in ("a", "b", "head")]
    assert index_mapping.update_concat_index_mapping is no_widths  # the guard put back what it found


class _StemFeedsBNAndShortcut(nn.Module):
    """MaxViT's pattern: a conv whose output goes into a BatchNorm *and*, untouched, into a
    pooled 1x1 shortcut. A mask after the BN alone would leave the shortcut's channels on."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pre_norm = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.body_bn = nn.BatchNorm2d(24)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 24, 1))
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.body_bn(self.body(torch.relu(self.pre_norm(y)))) + self.shortcut(y)
        return self.head(y.mean(dim=(2, 3)))


def test_producer_with_a_second_consumer_is_masked_exactly() -> None:
    torch.manual_seed(0)
    # a 1x1 conv in front: the first conv's outputs are never pruned, the stem's must be
    net = nn.Sequential(nn.Conv2d(3, 3, 1), _StemFeedsBNAndShortcut()).eval()
    with torch.no_grad():
        net[1].pre_norm.running_mean.uniform_(-0.5, 0.5)
        net[1].pre_norm.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 16)
    index = build_groups(net, x[:1])
    roots = [g.root for g in index.groups]
    group = index.groups[roots.index("1.stem")]
    assert {m.module for m in group.mask_points} >= {"1.stem", "1.pre_norm"}
    keep = torch.ones(index.num_units)
    offset = index.offsets()[roots.index("1.stem")]
    keep[offset : offset + 8] = 0
    student = shrink(net, index, keep, x[:1]).eval()
    with torch.no_grad():
        with masked(net, index, keep):
            y_masked = net(x)
        assert torch.allclose(y_masked, student(x), atol=1e-5)


class _HeadSplit(nn.Module):
    """A stem conv whose channels are reshaped into (heads, dim) and reduced over the heads:
    no layer can be pruned along that layout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(self.stem(x))
        b, c, h, w = y.shape
        y = y.reshape(b, 2, c // 2, h, w).mean(dim=(1, 3, 4))
        return self.head(y)


def test_unmappable_reshape_is_frozen_not_crashed() -> None:
    model = _HeadSplit().eval()
    index = build_groups(model, torch.zeros(1, 3, 8, 8))
    assert all(g.root != "mix" for g in index.groups)
    assert any(f.root == "mix" for f in index.frozen)


def test_time_limit_refuses_with_user_error() -> None:
    from cascadec.prune.groups import build_dependency_graph

    model = create_model("resnet18", num_classes=10).eval()
    with pytest.raises(UserError, match="longer than"):
        build_dependency_graph(model, torch.zeros(1, 3, 32, 32), timeout_s=1e-4)


@pytest.mark.parametrize(
    "args",
    [
        # an input the model cannot take: refused at analysis, before any data or training
        ["inspect", "maxvit_t", "--image-size", "64"],
        ["compress", "vit_b_16", "--recipe", "zoo_smoke", "--set", "data.image_size=64", "--dry-run"],
    ],
)
@pytest.mark.slow
def test_cli_refusals_are_one_line_exit_2(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cascadec", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert args[1] in lines[0] or "input" in lines[0]
