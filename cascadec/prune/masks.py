"""Channel masks applied as forward hooks at each group's mask points (after BatchNorm).

A mask is one vector per group (length = group size). Values are usually 0/1; during
score learning they carry a straight-through gradient (``hard + s - s.detach()``), so the
gradient reaching the mask is the signed Taylor term sum_{h,w} dL/dY * Y (docs/paper.md Eqs. 3-4).

The hooks read whatever vectors are currently set, so one network can be driven by
several mask sets in turn (one per model of a TA chain), and several networks that share
weights can each carry their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from cascadec.prune.groups import MASKED_NORMS, GroupIndex

_BN_OR_CONV = (*MASKED_NORMS, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def split_units(index: GroupIndex, flat: torch.Tensor) -> list[torch.Tensor]:
    """Cut a flat per-unit vector into one vector per group."""
    return list(torch.split(flat, [g.size for g in index.groups]))


class ChannelMasks:
    """Owns the hooks of one network; ``set`` swaps which per-group vectors they apply."""

    def __init__(self, model: nn.Module, index: GroupIndex) -> None:
        self.model = model
        self.index = index
        self.vectors: list[torch.Tensor | None] = [None] * len(index.groups)
        # module name -> list of (group position, idxs, root_idxs)
        self._plan: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gpos, group in enumerate(index.groups):
            for point in group.mask_points:
                self._plan.setdefault(point.module, []).append(
                    (gpos, torch.tensor(point.idxs, dtype=torch.long), torch.tensor(point.root_idxs, dtype=torch.long))
                )
        self._handles: list = []

    def set(self, vectors: Sequence[torch.Tensor] | torch.Tensor | None) -> None:
        """Set per-group vectors (a list, or one flat vector over all units); None = no mask."""
        if vectors is None:
            self.vectors = [None] * len(self.index.groups)
        elif isinstance(vectors, torch.Tensor):
            self.vectors = split_units(self.index, vectors)
        else:
            if len(vectors) != len(self.index.groups):
                raise ValueError(f"expected {len(self.index.groups)} mask vectors, got {len(vectors)}")
            self.vectors = list(vectors)

    def install(self) -> ChannelMasks:
        if self._handles:
            return self
        for name, plan in self._plan.items():
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._make_hook(module, plan)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ChannelMasks:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _make_hook(self, module: nn.Module, plan):
        # Linear (and channels-last MLPs) carry channels last; GRN says where it keeps them
        channel_dim_last = not isinstance(module, _BN_OR_CONV) and getattr(module, "channel_dim", -1) == -1

        def hook(mod, inputs, output):
            full = None
            for gpos, idxs, root_idxs in plan:
                vec = self.vectors[gpos]
                if vec is None:
                    continue
                channels = output.shape[-1] if channel_dim_last else output.shape[1]
                if full is None:
                    full = torch.ones(channels, dtype=output.dtype, device=output.device)
                values = vec.to(device=output.device, dtype=output.dtype)[root_idxs.to(output.device)]
                full = full.index_put((idxs.to(output.device),), values)
            if full is None:
                return output
            if channel_dim_last:
                return output * full
            shape = [1, -1] + [1] * (output.dim() - 2)
            return output * full.view(shape)

        return hook


@contextmanager
def masked(model: nn.Module, index: GroupIndex, vectors) -> Iterator[ChannelMasks]:
    """Run ``model`` with the given masks for the duration of a block."""
    masks = ChannelMasks(model, index)
    masks.set(vectors)
    with masks:
        yield masks
