"""cascadec.prune.masks (+ shrink, importance): masked == shrunk, mask after BN, mask swapping,
and the straight-through gradient equal to the hand-computed Taylor term (METHOD.md Eqs. 3-4)."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import Chain
from helpers.nets import MixedNet as Mixed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cascadec.models import create_model
from cascadec.prune.cascade import build_hierarchy
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance, taylor_importance
from cascadec.prune.masks import ChannelMasks, masked, split_units
from cascadec.prune.shrink import pruned_root_idxs, shrink

EX = torch.randn(1, 1, 16, 16)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (incl. clearly non-zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5 + 0.3)
    return model


def _random_mask(index, keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for group in index.groups:
        v = (torch.rand(group.size, generator=g) < keep).float()
        v[torch.randint(group.size, (1,), generator=g)] = 1.0  # never empty a group
        parts.append(v)
    return torch.cat(parts)


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    model = _randomise_bn(Chain()).eval()
    return model, build_groups(model, EX)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _randomise_bn(create_model("cifar_resnet8", num_classes=10, in_channels=1)).eval()
    return model, build_groups(model, EX)


# --------------------------------------------------------------------------- masked == shrunk


@pytest.mark.parametrize("which", ["chain", "resnet", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_shrunk(which, seed, request) -> None:
    if which == "mixed":
        torch.manual_seed(0)
        model = _randomise_bn(Mixed()).eval()
        index = build_groups(model, EX)
        # the biased conv without BN and the hidden Linear are masked where they are produced
        points = {p.module for g in index.groups for p in g.mask_points}
        assert {"conv2", "fc1", "bn3"} <= points and "conv3" not in points
        assert any({"pw", "dw"} <= set(g.layers) for g in index.groups)  # depthwise couples pw and dw
    else:
        model, index = request.getfixturevalue(which)
    mask = _random_mask(index, 0.5, seed)
    assert 0 < mask.sum() < index.num_units
    x = torch.randn(4, *EX.shape[1:])
    with torch.no_grad(), masked(model, index, mask):
        y_masked = model(x)
    small = shrink(model, index, mask, EX)
    with torch.no_grad():
        y_small = small(x)
        y_full = model(x)  # hooks were removed on exit
    assert (y_masked - y_small).abs().max().item() < 1e-5
    assert (y_masked - y_full).abs().max().item() > 1e-3  # the mask did something
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # shrink leaves the original alone
    assert all(not m._forward_hooks for m in model.modules())
    removed = pruned_root_idxs(index, mask)
    for g, part in zip(index.groups, split_units(index, mask)):
        assert removed.get(g.root, []) == torch.nonzero(part < 0.5).flatten().tolist()


def test_mask_after_bn_gives_exact_zero_before_bn_does_not(chain) -> None:
    model, index = chain
    (g,) = [g for g in index.groups if g.root == "conv2"]
    offset = index.offsets()[g.index]
    unit = 3
    assert abs(model.bn2.bias[unit].item()) > 0.05  # BN bias clearly non-zero
    mask = torch.ones(index.num_units)
    mask[offset + unit] = 0.0

    seen = {}
    pre = model.relu2.register_forward_pre_hook(lambda m, inp: seen.__setitem__("after_bn", inp[0].detach().clone()))
    x = torch.randn(4, *EX.shape[1:])
    try:
        with torch.no_grad(), masked(model, index, mask):
            y_after = model(x)
    finally:
        pre.remove()
    assert torch.count_nonzero(seen["after_bn"][:, unit]) == 0  # exactly zero, not just small
    assert torch.count_nonzero(seen["after_bn"][:, unit + 1]) > 0

    # what masking BEFORE the BN (at the conv output) would give: BN(0) = beta - gamma*mu/sqrt(var+eps) != 0
    def zero_conv_channel(m, inp, out):
        out = out.clone()
        out[:, unit] = 0.0
        return out

    h1 = model.conv2.register_forward_hook(zero_conv_channel)
    h2 = model.relu2.register_forward_pre_hook(lambda m, inp: seen.__setitem__("before_bn", inp[0].detach().clone()))
    try:
        with torch.no_grad():
            y_before = model(x)
    finally:
        h1.remove()
        h2.remove()
    bn = model.bn2
    leak = bn.bias[unit] - bn.weight[unit] * bn.running_mean[unit] / torch.sqrt(bn.running_var[unit] + bn.eps)
    assert abs(leak.item()) > 1e-3
    torch.testing.assert_close(seen["before_bn"][:, unit], torch.full_like(seen["before_bn"][:, unit], leak.item()))

    with torch.no_grad():
        y_small = shrink(model, index, mask, EX)(x)
    assert (y_after - y_small).abs().max().item() < 1e-5
    assert (y_before - y_small).abs().max().item() > 1e-4  # masking before BN is not removal


# --------------------------------------------------------------------------- several masks, one network


def test_set_swaps_masks_on_one_network(chain) -> None:
    model, index = chain
    m1 = _random_mask(index, 0.5, 10)
    m2 = _random_mask(index, 0.5, 11)
    assert not torch.equal(m1, m2)
    x = torch.randn(4, *EX.shape[1:])
    hooks = ChannelMasks(model, index)
    with torch.no_grad(), hooks:
        hooks.set(m1)
        y1 = model(x)
        hooks.set(split_units(index, m2))  # per-group list form
        y2 = model(x)
        hooks.set(m1)
        y1_again = model(x)
        hooks.set(None)
        y_none = model(x)
        assert len(model.bn2._forward_hooks) == 1  # still one hook per mask point: set only swaps vectors
        hooks.install()  # idempotent
        assert len(model.bn2._forward_hooks) == 1
    with torch.no_grad():
        y_full = model(x)
        s1, s2 = shrink(model, index, m1, EX)(x), shrink(model, index, m2, EX)(x)
    assert (y1 - y2).abs().max().item() > 1e-3
    torch.testing.assert_close(y1, y1_again, rtol=0, atol=0)
    torch.testing.assert_close(y_none, y_full, rtol=0, atol=0)
    assert (y1 - s1).abs().max().item() < 1e-5
    assert (y2 - s2).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="mask vectors"):
        hooks.set([m1])


def test_two_networks_sharing_weights_carry_their_own_masks(chain) -> None:
    model, index = chain
    a, b = build_hierarchy(model, index, 2)
    m1, m2 = _random_mask(index, 0.5, 20), _random_mask(index, 0.5, 21)
    x = torch.randn(4, *EX.shape[1:])
    ha = ChannelMasks(a, index).install()
    hb = ChannelMasks(b, index).install()
    try:
        ha.set(m1)
        hb.set(m2)
        with torch.no_grad():
            ya, yb = a(x), b(x)
    finally:
        ha.remove()
        hb.remove()
    with torch.no_grad():
        s1, s2 = shrink(model, index, m1, EX)(x), shrink(model, index, m2, EX)(x)
    assert (ya - s1).abs().max().item() < 1e-5
    assert (yb - s2).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- straight-through gradient = Taylor term


def _taylor_by_hand(model, index, x, y, loss_fn) -> torch.Tensor:
    """sum_{n,h,w} dL/dY_c * Y_c at each group's mask points (summed over a group's points),
    from an unmasked run with hooks capturing the BN outputs."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for g in index.groups:
        for p in g.mask_points:

            def keep(m, inp, out, name=p.module):
                out.retain_grad()
                outputs[name] = out

            handles.append(model.get_submodule(p.module).register_forward_hook(keep))
    try:
        loss_fn(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    parts = []
    for g in index.groups:
        v = torch.zeros(g.size, dtype=torch.float64)
        for p in g.mask_points:
            out = outputs[p.module]
            per_channel = (out.grad * out).double().sum(dim=[d for d in range(out.dim()) if d != 1])
            v.index_add_(0, torch.tensor(p.root_idxs), per_channel[torch.tensor(p.idxs)])
        parts.append(v)
    return torch.cat(parts)


@pytest.mark.parametrize("which", ["chain", "resnet"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_straight_through_gradient_is_taylor_term(which, mode, request) -> None:
    model, index = request.getfixturevalue(which)
    model.train(mode == "train")
    try:
        torch.manual_seed(5)
        x, y = torch.randn(6, *EX.shape[1:]), torch.randint(0, 10, (6,))
        loss_fn = nn.CrossEntropyLoss()
        ones = torch.ones(index.num_units, requires_grad=True)
        with masked(model, index, ones):
            (grad,) = torch.autograd.grad(loss_fn(model(x), y), ones)
        by_hand = _taylor_by_hand(model, index, x, y, loss_fn)
    finally:
        model.eval()
    assert grad.abs().max() > 1e-6
    torch.testing.assert_close(grad.double(), by_hand, rtol=1e-4, atol=1e-7)
    if which == "resnet":
        # a residual group has two mask points; its unit gradient is the sum of both Taylor terms
        assert any(len(g.mask_points) == 2 for g in index.groups)


def test_straight_through_hard_plus_score_trick(chain) -> None:
    """hard + s - s.detach(): forward uses the binary mask, d/ds is the Taylor term at that mask."""
    model, index = chain
    torch.manual_seed(6)
    x, y = torch.randn(6, *EX.shape[1:]), torch.randint(0, 10, (6,))
    hard = _random_mask(index, 0.6, 3)
    s = torch.randn(index.num_units, requires_grad=True)
    with masked(model, index, hard + s - s.detach()):
        out = model(x)
        (g_s,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), s)
    with torch.no_grad(), masked(model, index, hard):
        ref = model(x)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-6)
    m = hard.clone().requires_grad_(True)
    with masked(model, index, m):
        (g_m,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), m)
    torch.testing.assert_close(g_s, g_m)


def test_taylor_importance_is_mean_abs_taylor_over_batches(chain) -> None:
    model, index = chain
    torch.manual_seed(7)
    xs, ys = torch.randn(12, *EX.shape[1:]), torch.randint(0, 10, (12,))
    loader = DataLoader(TensorDataset(xs, ys), batch_size=4, shuffle=False)
    loss_fn = nn.CrossEntropyLoss()
    model.train()  # taylor_importance must evaluate with running statistics and restore the mode
    scores = taylor_importance(model, index, loader, loss_fn, device=torch.device("cpu"), batches=2)
    assert model.training
    model.eval()
    expected = torch.zeros(index.num_units, dtype=torch.float64)
    for b in range(2):  # only the first two batches count
        expected += _taylor_by_hand(model, index, xs[4 * b : 4 * b + 4], ys[4 * b : 4 * b + 4], loss_fn).abs()
    expected /= 2
    assert scores.shape == (index.num_units,)
    assert (scores >= 0).all()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no stray .grad on weights


def test_l1_importance_by_hand(chain) -> None:
    model, index = chain
    scores = l1_importance(model, index)
    for g, part in zip(index.groups, split_units(index, scores)):
        conv = model.get_submodule(g.root)
        norms = conv.weight.detach().abs().flatten(1).sum(1)
        torch.testing.assert_close(part, norms / norms.mean())
