"""Physically remove masked channels, so the student really is smaller and faster.

Torch-Pruning does the surgery (it knows how to slice every coupled layer); we only tell
it, per group, which root channels to drop. The same function rebuilds a student's
architecture from its width spec in a fresh process before its weights are loaded.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cascadec.prune.groups import GroupIndex, build_dependency_graph


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


def apply_removals(model: nn.Module, removals: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Remove channels in place, group by group, through Torch-Pruning's handlers."""
    if not removals:
        return model
    dg = build_dependency_graph(model, example_input)
    for root, idxs in removals.items():
        module = model.get_submodule(root)
        pruner = dg.get_pruner_of_module(module)
        group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs)
        group.prune()
    return model


def shrink(model: nn.Module, index: GroupIndex, keep: torch.Tensor, example_input: torch.Tensor) -> nn.Module:
    """A pruned copy of ``model``; the original (and any weights shared with it) is untouched."""
    student = copy.deepcopy(model).eval()
    with torch.no_grad():
        apply_removals(student, pruned_root_idxs(index, keep), example_input)
    return student
