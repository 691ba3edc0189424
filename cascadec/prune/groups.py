"""Dependency groups of coupled channels, read from Torch-Pruning's DependencyGraph.

This is the only module that imports ``torch_pruning`` for graph analysis (``shrink.py``
uses its pruning functions), so the library could be replaced behind it. A group is a set
of channels that must be removed together (a residual stream, the two sides of a
depthwise conv, the slices of a concat). We reduce each Torch-Pruning group to plain data:
which channels of which module belong to which group channel ("unit").

Groups whose channels cannot be masked exactly are *frozen* (never pruned) with a reason
that ``cascadec inspect`` shows: the first conv's outputs (the paper never masks it), the
classifier's outputs, channel-mixing normalisation (LayerNorm/GroupNorm: removing a
channel changes every other channel's statistics), and non-depthwise grouped convolutions.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cascadec.errors import UserError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHANNEL_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm)


@dataclass
class Member:
    """Channels ``idxs`` of ``module`` belong to group channels ``root_idxs`` (same order)."""

    module: str
    role: str  # "out": the module produces these channels; "in": it consumes them
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class ChannelGroup:
    """Coupled channels that share one importance score and one mask entry per model."""

    index: int
    root: str
    size: int
    members: list[Member]
    mask_points: list[Member] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return sorted({m.module for m in self.members})


@dataclass
class FrozenGroup:
    root: str
    size: int
    reason: str


@dataclass
class GroupIndex:
    """Everything the pruning code needs to know about a network's coupled channels."""

    groups: list[ChannelGroup]
    frozen: list[FrozenGroup]
    first_conv: str | None
    classifier: str | None

    @property
    def num_units(self) -> int:
        return sum(g.size for g in self.groups)

    def offsets(self) -> list[int]:
        """Start of each group in the flat vector of all units (masks, scores)."""
        out, total = [], 0
        for g in self.groups:
            out.append(total)
            total += g.size
        return out

    def by_root(self) -> dict[str, ChannelGroup]:
        return {g.root: g for g in self.groups}


def _execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of conv/linear layers in the order they run, to find the stem and the head."""
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (*_CONV, nn.Linear)):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order


@contextmanager
def _time_limit(seconds: float | None, what: str):
    """Dependency tracing is unbounded on some graphs; refuse instead of hanging."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TimeoutError:
        raise UserError(f"{what} took longer than {seconds:.0f} s; this model is not supported") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor, *, timeout_s: float | None = 300):
    """Trace ``model`` with Torch-Pruning; errors in tracing become one-line UserErrors."""
    import torch_pruning as tp

    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:  # Torch-Pruning traces the autograd graph: every weight must be in it
            p.requires_grad_(True)
        with _time_limit(timeout_s, "dependency analysis"), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    except UserError:
        raise
    except Exception as exc:  # Torch-Pruning raises arbitrary errors on graphs it cannot trace
        raise UserError(
            f"dependency analysis failed for {type(model).__name__}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def _freeze_reason(group_members: list[tuple[nn.Module, Member]], first_conv: str | None, classifier: str | None) -> str | None:
    for module, member in group_members:
        if member.role == "out" and member.module == first_conv:
            return f"holds the output channels of the first conv '{first_conv}' (never pruned)"
        if member.role == "out" and member.module == classifier:
            return f"holds the outputs of the classifier '{classifier}'"
        if isinstance(module, _CHANNEL_MIXING_NORMS):
            return f"passes through {type(module).__name__} '{member.module}', which normalises across channels"
        if isinstance(module, _CONV) and module.groups > 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if not depthwise:
                return f"passes through grouped conv '{member.module}' (groups={module.groups}), not supported yet"
        if isinstance(module, nn.MultiheadAttention):
            return f"passes through attention '{member.module}'"
    return None


def _mask_points(dg, group_members: list[tuple[nn.Module, Member]]) -> list[Member]:
    """Where the mask multiplies a channel: every BatchNorm in the group, plus every conv/linear
    producer whose output does not go straight into one of the group's BatchNorms.

    Masking after BN (not after the conv) is what makes masked == shrunk: a filter zeroed
    before BN would still emit BN's bias.
    """
    in_group = {id(m) for m, _ in group_members}
    points: list[Member] = []
    for module, member in group_members:
        if member.role != "out":
            continue
        if isinstance(module, _BN):
            points.append(member)
        elif isinstance(module, (*_CONV, nn.Linear)):
            node = dg.module2node[module]
            fed_bn = any(isinstance(o.module, _BN) and id(o.module) in in_group for o in node.outputs)
            if not fed_bn:
                points.append(member)
    return points


def build_groups(model: nn.Module, example_input: torch.Tensor, *, timeout_s: float | None = 300) -> GroupIndex:
    """Analyse ``model`` once; the result is plain data reused by masks, cost model and shrink."""
    order = _execution_order(model, example_input)
    first_conv = next((n for n in order if isinstance(model.get_submodule(n), _CONV)), None)
    classifier = order[-1] if order else None
    dg = build_dependency_graph(model, example_input, timeout_s=timeout_s)
    name_of = {m: n for n, m in model.named_modules()}

    groups: list[ChannelGroup] = []
    frozen: list[FrozenGroup] = []
    try:
        all_groups = list(dg.get_all_groups(ignored_layers=[]))
    except Exception as exc:
        raise UserError(f"dependency analysis failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None

    for tp_group in all_groups:
        root_module = tp_group[0].dep.target.module
        root = name_of.get(root_module, str(root_module))
        members: list[tuple[nn.Module, Member]] = []
        for item in tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in name_of:
                continue  # element-wise ops and reshapes carry no weights
            role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            members.append((module, Member(name_of[module], role, list(map(int, item.idxs)), list(map(int, item.root_idxs)))))
        size = len(tp_group[0].idxs)
        reason = _freeze_reason(members, first_conv, classifier)
        if reason is not None:
            frozen.append(FrozenGroup(root, size, reason))
            continue
        if size < 2:
            frozen.append(FrozenGroup(root, size, "a single channel"))
            continue
        group = ChannelGroup(len(groups), root, size, [m for _, m in members])
        group.mask_points = _mask_points(dg, members)
        if not group.mask_points:
            frozen.append(FrozenGroup(root, size, "no BatchNorm, conv or linear output to mask"))
            continue
        groups.append(group)
    return GroupIndex(groups=groups, frozen=frozen, first_conv=first_conv, classifier=classifier)
