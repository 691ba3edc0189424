"""Physically remove masked channels, so the student really is smaller and faster.

Torch-Pruning does the surgery (it knows how to slice every coupled layer); we only tell
it, per group, which root channels to drop. The same function rebuilds a student's
architecture from its width spec in a fresh process before its weights are loaded.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cascadec.prune.groups import GroupIndex, build_dependency_graph, channel_width


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
            out[group.root] = removed
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


def remove_channels(model: nn.Module, dg, root: str, idxs: list[int]) -> None:
    """Remove root channels ``idxs`` of group ``root`` and everything coupled to them, in place."""
    module = model.get_submodule(root)
    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    extras = _channel_parameters(dg, group)
    group.prune()
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
