"""Physically remove masked channels, so the student really is smaller and faster.

Torch-Pruning does the surgery (it knows how to slice every coupled layer); we only tell
it, per group, which root channels to drop. The same function rebuilds a student's
architecture from its width spec in a fresh process before its weights are loaded.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn

from cascadec.prune.groups import GroupIndex, build_dependency_graph, channel_parameter_owners, channel_width


def pruned_root_idxs(index: GroupIndex, keep: torch.Tensor) -> dict[str, list[int]]:
    """Root channel indices to remove, per group root (the content of the width spec)."""
    out: dict[str, list[int]] = {}
    start = 0
    flat = keep.detach().cpu()
    for group in index.groups:
        part = flat[start : start + group.size]
        start += group.size
        removed = torch.nonzero(part < 0.5).flatten().tolist()
        if removed:
            out[group.root] = group.root_channels(removed)
    return out


_PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _channel_parameters(dg, group) -> list[tuple[nn.Module, str, int, list[int]]]:
    """Per-output-channel parameters Torch-Pruning does not know about, on layers that subclass
    conv/linear: timm's ScaledStdConv2d keeps a ``gain`` of shape (out, 1, 1, 1) beside its weight.
    Torch-Pruning slices ``weight`` and ``bias`` only; the rest is sliced here the same way."""
    found = []
    for item in group:
        module = item.dep.target.module
        if (
            not isinstance(module, _PLAIN_LAYERS)
            or type(module) in _PLAIN_LAYERS
            or not dg.is_out_channel_pruning_fn(item.dep.handler)
        ):
            continue
        width = channel_width(module, "out")
        for name, param in module.named_parameters(recurse=False):
            if name not in ("weight", "bias") and param.dim() and param.shape[0] == width:
                found.append((module, name, width, list(item.idxs)))
    return found


def _sync_split_sizes(model: nn.Module) -> None:
    """Modules that store the sizes they split their input by (timm's MixedConv2d, MixNet's
    multi-kernel depthwise conv): the sizes are read back from the pruned sub-convolutions."""
    for module in model.modules():
        if type(module).__name__ == "MixedConv2d" and hasattr(module, "splits"):
            convs = list(module.values())
            module.splits = [c.in_channels for c in convs]
            module.in_channels = sum(module.splits)
            module.out_channels = sum(c.out_channels for c in convs)


# timm's weight-standardised convs (BiT's ResNetV2, NF-Nets): each filter is normalised over its
# input channels on every call, so removing an input channel would change every kept weight
_STANDARDISED_CONVS = ("StdConv2d", "ScaledStdConv2d")


def _computed_weight(conv: nn.Module) -> torch.Tensor | None:
    """The weight ``conv`` hands to ``F.conv2d`` (read by running it once on a tiny input)."""
    captured: dict[str, torch.Tensor] = {}
    original = nn.functional.conv2d

    def capture(x, weight, bias=None, *args, **kwargs):
        captured["weight"] = weight
        return original(x, weight, bias, *args, **kwargs)

    nn.functional.conv2d = capture
    try:
        with torch.no_grad():
            conv(torch.zeros(1, conv.in_channels, *conv.kernel_size, dtype=conv.weight.dtype))
    finally:
        nn.functional.conv2d = original
    weight = captured.get("weight")
    return weight if weight is not None and weight.shape == conv.weight.shape else None


def fold_weight_standardisation(model: nn.Module) -> nn.Module:
    """Replace weight-standardised convs by plain convs holding the weights they compute, in place.

    In eval the two are the same function; only the plain one stays that function when input
    channels are removed (the masked network standardised over all of them, zeros included). The
    shrunk student is exported and served, never trained again, so nothing is lost."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ not in _STANDARDISED_CONVS or not isinstance(child.padding, tuple):
                continue
            weight = _computed_weight(child)
            if weight is None:
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            ).to(child.weight.device, child.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            plain.train(child.training)
            setattr(parent, name, plain)
    return model


def _response_norms(model: nn.Module, group) -> list[tuple[nn.Module, int]]:
    """Global response norms (ConvNeXt-V2) whose channels ``group`` removes, with their width now."""
    owners = {id(p): m for p, (_, m) in channel_parameter_owners(model).items()}
    found = {id(m): m for item in group if (m := owners.get(id(item.dep.target.module))) is not None}
    return [(m, m.weight.shape[0]) for m in found.values()]


def _rescale_response_norm(norm: nn.Module, before: int) -> None:
    """GRN divides each channel's response by the mean response over channels. The masked network
    averaged over all ``before`` channels, zeros included; the shrunk one averages over the kept
    ``after``. Multiplying the weight and eps by before/after gives the masked network's output
    exactly: g / (S/after + eps*before/after) * w*before/after = g / (S/before + eps) * w."""
    after = norm.weight.shape[0]
    if after == before:
        return
    factor = before / after
    with torch.no_grad():
        norm.weight.mul_(factor)
    norm.eps = norm.eps * factor


def remove_channels(model: nn.Module, dg, root: str, idxs: list[int]) -> None:
    """Remove root channels ``idxs`` of group ``root`` and everything coupled to them, in place."""
    module = model.get_submodule(root)
    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    extras = _channel_parameters(dg, group)
    # Torch-Pruning keeps a GroupNorm's num_groups; the units remove whole groups (groups.py), so
    # the norm keeps its group size and loses groups
    spans = [
        (m, m.num_channels // m.num_groups)
        for m in {id(item.dep.target.module): item.dep.target.module for item in group}.values()
        if isinstance(m, nn.GroupNorm)
    ]
    responses = _response_norms(model, group)
    group.prune()
    for norm, span in spans:
        norm.num_groups = norm.num_channels // span
    for norm, before in responses:
        _rescale_response_norm(norm, before)
    for layer, name, width, removed in extras:
        param = getattr(layer, name)
        if param.shape[0] != width:  # a Torch-Pruning version that already sliced it
            continue
        gone = set(removed)
        kept = [i for i in range(width) if i not in gone]
        setattr(layer, name, nn.Parameter(param.data[kept].clone(), requires_grad=param.requires_grad))
    _sync_split_sizes(model)


def apply_removals(model: nn.Module, removals: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Remove channels in place, group by group, through Torch-Pruning's handlers."""
    if not removals:
        return model
    fold_weight_standardisation(model)
    dg = build_dependency_graph(model, example_input)
    for root, idxs in removals.items():
        remove_channels(model, dg, root, idxs)
    return model


def shrink(model: nn.Module, index: GroupIndex, keep: torch.Tensor, example_input: torch.Tensor) -> nn.Module:
    """A pruned copy of ``model``; the original (and any weights shared with it) is untouched."""
    student = copy.deepcopy(model).eval()
    with torch.no_grad():
        apply_removals(student, pruned_root_idxs(index, keep), example_input)
    return student


def _tensors(model: nn.Module):
    return itertools.chain(model.named_parameters(), model.named_buffers())


def shrink_positions(
    model: nn.Module, index: GroupIndex, keep: torch.Tensor, example_input: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """For every floating tensor of ``shrink(model, ...)``: the flat positions in ``model``'s tensor
    of the same name that its entries are (row-major), found by shrinking a float64 copy whose
    entries are their own positions. None where the shrink is not a pure selection (a folded
    weight standardisation or a rescaled response norm changes values): the caller then keeps
    training the masked network. What lets a phase train the shrunk network and write it back.
    The positions are then checked against a real shrink of ``model`` (a rescaling that happens to
    map positions onto positions would pass the first test), and a probe the network cannot run
    (a float64 trace on the CPU) gives None too."""
    probe = copy.deepcopy(model).cpu().double()
    with torch.no_grad():
        for _, t in _tensors(probe):
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=torch.float64).view(t.shape))
    full = {name: t.numel() for name, t in _tensors(probe)}
    try:
        cut = shrink(probe, index, keep.detach().cpu(), example_input.detach().cpu().double())
        real = shrink(copy.deepcopy(model).cpu(), index, keep.detach().cpu(), example_input.detach().cpu())
    except Exception:  # e.g. a float32 constant made inside forward: train masked, as before
        return None
    values = dict(_tensors(model))  # read only: no third copy of the network
    reals = dict(_tensors(real))
    out: dict[str, torch.Tensor] = {}
    for name, t in _tensors(cut):
        if not t.is_floating_point():
            continue
        pos = t.detach().reshape(-1)
        if (
            name not in full
            or not torch.equal(pos, pos.round())
            or (pos.numel() and (pos.min() < 0 or pos.max() >= full[name]))
            or pos.unique().numel() != pos.numel()
        ):
            return None
        out[name] = pos.long()
        picked = values[name].detach().cpu().contiguous().view(-1)[out[name]]
        if name not in reals or not torch.equal(picked, reals[name].detach().reshape(-1)):
            return None
    return out


def write_back(full: nn.Module, shrunk: nn.Module, positions: dict[str, torch.Tensor]) -> None:
    """Copy a (trained) shrunk network's tensors into the full-width one it was cut from, at
    :func:`shrink_positions`; the removed units keep what they held (masks zero them, and the
    shrink step removes them again). Integer buffers of the same shape (BatchNorm's step count)
    are copied whole."""
    targets = dict(_tensors(full))
    with torch.no_grad():
        for name, t in _tensors(shrunk):
            target = targets.get(name)
            if target is None:
                continue
            if name in positions:
                flat = target.detach().contiguous().view(-1).clone()
                flat[positions[name].to(flat.device)] = t.detach().reshape(-1).to(flat.device, flat.dtype)
                target.copy_(flat.view(target.shape))
            elif target.shape == t.shape:
                target.copy_(t)
