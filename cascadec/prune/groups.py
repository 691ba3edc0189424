"""Dependency groups of coupled channels, read from Torch-Pruning's DependencyGraph.

This is the only module that reads ``torch_pruning``'s graph (``shrink.py`` uses its pruning
functions), so the library could be replaced behind it; the private symbols the guards below
patch live in ``prune/tp_adapter.py``, pinned to the Torch-Pruning versions tested. A group is a set
of channels that must be removed together (a residual stream, the two sides of a
depthwise conv, the slices of a concat). We reduce each Torch-Pruning group to plain data:
which channels of which module belong to which group channel ("unit").

Groups whose channels cannot be masked exactly are *frozen* (never pruned) with a reason
that ``cascadec inspect`` shows: the first conv's outputs (the paper never masks it), the
classifier's outputs, channel-mixing normalisation (LayerNorm/GroupNorm: removing a
channel changes every other channel's statistics), non-depthwise grouped convolutions, and
channels that a reshape moves into another axis.

That last case is where Torch-Pruning itself breaks, so analysis is guarded around it:

* ShuffleNetV2's channel shuffle (``view(b, 2, c/2, h, w)``, transpose, ``view`` back) makes
  ``update_reshape_index_mapping`` divide by an inferred channel count of 0
  (ZeroDivisionError). We catch that per reshape node, leave its mapping as identity and
  freeze every group that passes through the node, so the wrong mapping is never used.
* Swin's window partition and MaxViT's block/grid partition reshape the channel axis
  repeatedly; each pass through a ``_FlattenIndexMapping`` multiplies the index list by its
  stride, and around the residual loops the lists grow geometrically until memory runs
  out. We build the groups root by root with a cap on the indices one mapping may
  produce, and freeze a root whose group exceeds it.
* Swin-S/B are deep enough to exhaust Torch-Pruning's shape-inference step budget, which then
  returns None widths into a concat (TypeError). Such a model is traced again with a larger
  budget (SHAPE_WALK_BUDGET); a concat that still fails is treated like an opaque reshape.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from cascadec.errors import UserError, first_line
from cascadec.prune.tp_adapter import IndexExplosion, default_walk_budget, guarded_index_mapping, no_index_remap
from cascadec.train.bn import BATCHNORMS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_MIXING_NORMS = (nn.LayerNorm,)
# layers whose output the mask multiplies (the channel-wise norms): masking after them, not after
# the conv before them, is what leaves a removed channel nothing (not even the norm's bias) to emit
MASKED_NORMS = (*BATCHNORMS, nn.GroupNorm)
EXPLODING_REASON = (
    "Torch-Pruning's walk of its channels does not converge (a reshape into windows/heads wider than any "
    "layer, or a slice-add that pads channels)"
)
OPAQUE_RESHAPE_REASON = (
    "passes a reshape or concat Torch-Pruning cannot map (a channel shuffle, a head/window split, "
    "a concat of unknown widths)"
)
# Torch-Pruning's shape inference counts every step of a walk against MAX_RECURSION_DEPTH (500)
# and answers None past it; a deep chain of same-width blocks (swin_s/swin_b: 18 blocks in one
# stage) exhausts that before it reaches PatchMerging's concat, whose mapping then fails on
# None. The budget bounds work, not Python stack depth, and the analysis has its own timeout.
SHAPE_WALK_BUDGET = 2000


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
    # Torch-Pruning root channels behind each unit, where a unit is several of them (one GroupNorm
    # group, one position in every group of a grouped conv); None: unit i is root channel i
    root_units: list[list[int]] | None = None

    @property
    def unit_channels(self) -> int:
        """Root channels per unit (the fewest, where tied units differ)."""
        return 1 if self.root_units is None else min(len(u) for u in self.root_units)

    def root_channels(self, units) -> list[int]:
        """The root channels Torch-Pruning removes for these units."""
        if self.root_units is None:
            return sorted(units)
        return sorted(c for u in units for c in self.root_units[u])

    @property
    def layers(self) -> list[str]:
        return sorted({m.module for m in self.members})

    def segments(self) -> list[int]:
        """Segment id of each unit: units reach exactly the same layers within a segment.

        Most groups are one segment. A group that is split (MixNet's mixed conv takes channels
        0..59 into one kernel size and 60..119 into another, MobileViTv2 splits query, key and
        value) has one segment per part; removing every unit of a segment leaves a layer with
        zero channels, so the solver keeps at least one unit of each."""
        reach: list[list[int]] = [[] for _ in range(self.size)]
        for number, member in enumerate(self.members):
            roots = set(member.root_idxs)
            if len(roots) < self.size:
                for r in roots:
                    reach[r].append(number)
        ids: dict[tuple[int, ...], int] = {}
        return [ids.setdefault(tuple(r), len(ids)) for r in reach]


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
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        # e.g. ViT/MaxViT assert their fixed 224 px input; a too-small image fails in a pool
        shape = "x".join(map(str, example_input.shape[1:]))
        name = getattr(model, "cascadec_model_name", type(model).__name__)
        raise UserError(f"{name} does not accept a {shape} input: {first_line(exc)}") from None
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


def _widest_layer(model: nn.Module) -> int:
    """The most channels/features any layer or parameter of ``model`` has along one axis."""
    widest = 1
    for module in model.modules():
        for attr in ("in_channels", "out_channels", "in_features", "out_features", "num_features", "embed_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                widest = max(widest, value)
    for p in model.parameters():
        widest = max(widest, *p.shape) if p.dim() else widest
    return widest


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor, *, timeout_s: float | None = 300):
    """Trace ``model`` with Torch-Pruning; errors in tracing become one-line UserErrors.

    The graph gets an ``opaque_reshapes`` attribute: the reshape nodes whose channel
    mapping Torch-Pruning could not infer (see the module docstring); its
    ``get_pruning_group`` runs under the same guard.
    """
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    widest = _widest_layer(model)
    # the library's budget first (most models, and shrink then pays no more per group); a
    # concat that ran out of it gets one retrace with SHAPE_WALK_BUDGET
    budgets = list(dict.fromkeys([default_walk_budget(), max(default_walk_budget(), SHAPE_WALK_BUDGET)]))
    try:
        for p in frozen:  # Torch-Pruning traces the autograd graph: every weight must be in it
            p.requires_grad_(True)
        with _time_limit(timeout_s, "dependency analysis"), torch.enable_grad():
            for budget in budgets:
                opaque: set = set()
                failed_concats: set = set()
                with guarded_index_mapping(opaque, widest, budget, failed_concats):
                    dg = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
                if not failed_concats:
                    break
    except UserError:
        raise
    except MemoryError:
        raise UserError(
            f"dependency analysis of {type(model).__name__} ran out of memory; this model is not supported"
        ) from None
    except Exception as exc:  # Torch-Pruning raises arbitrary errors on graphs it cannot trace
        raise UserError(
            f"dependency analysis failed for {type(model).__name__}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    dg.opaque_reshapes = opaque
    # Torch-Pruning re-runs the index mapping in every get_pruning_group call (shrink uses it
    # too), so the guard must wrap each call, not only the trace.
    unguarded = dg.get_pruning_group

    max_deps = 8 * sum(1 for _ in model.modules()) + 100

    def get_pruning_group(*args, **kwargs):
        with guarded_index_mapping(opaque, widest, budget, max_deps=max_deps):
            return unguarded(*args, **kwargs)

    dg.get_pruning_group = get_pruning_group
    return dg


def _narrowest_producer(dg, group, channels: int) -> tuple[nn.Module, int] | None:
    """A conv/linear in ``group`` that produces fewer channels than the root does, if any: a
    candidate root, kept where ``_feeds_two`` says one of its channels feeds two of the group's.

    Where one layer's channel feeds two channels of the group, the group must be rooted at that
    layer: GhostNet's module concatenates ``x1`` (a 1x1 conv) with ``dw(x1)`` (a depthwise conv
    of it), so channel j of ``x1`` is channels j and C + j of the block's output. Rooted at the
    output's 2C channels, Torch-Pruning maps the concat backwards onto the wrong halves and
    misses that j and C + j go together; rooted at the C channels of ``x1`` it removes both."""
    best = None
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, (ops.TORCH_CONV, ops.TORCH_LINEAR)) or not dg.is_out_channel_pruning_fn(
            item.dep.handler
        ):
            continue
        width = dg.get_pruner_of_module(module).get_out_channels(module)
        if width is not None and width < channels and (best is None or width < best[1]):
            best = (module, width)
    return best


def _feeds_two(group) -> bool:
    """Some layer of ``group`` has two channels behind one root channel (GhostNet's concat): the
    root is then the layer whose channel feeds both, not a split's part (MixNet's halves, where
    each root channel stays one channel everywhere)."""
    for item in group:
        if item.idxs is not None and item.root_idxs is not None and None not in item.root_idxs:
            if len(item.idxs) > len(set(item.root_idxs)):
                return True
    return False


def _all_groups(dg, name_of: dict, timeout_s: float | None) -> tuple[list, list[FrozenGroup]]:
    """Torch-Pruning's ``get_all_groups`` (conv/linear roots, every output channel), root by
    root, so that one root whose group explodes is frozen instead of failing the model."""
    groups, frozen, visited = [], [], set()
    with no_index_remap(), _time_limit(timeout_s, "dependency grouping"):
        for module in list(dg.module2node):
            if not isinstance(module, (ops.TORCH_CONV, ops.TORCH_LINEAR)) or id(module) in visited:
                continue
            pruner = dg.get_pruner_of_module(module)
            channels = pruner.get_out_channels(module) if pruner is not None else None
            if channels is None:
                continue
            root = name_of.get(module, str(module))
            try:
                group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
                narrow = _narrowest_producer(dg, group, channels)
                if narrow is not None:
                    prune_out = dg.get_pruner_of_module(narrow[0]).prune_out_channels
                    regrouped = dg.get_pruning_group(narrow[0], prune_out, list(range(narrow[1])))
                    if _feeds_two(regrouped):
                        (module, channels), group = narrow, regrouped
                        root = name_of.get(module, str(module))
            except IndexExplosion:
                visited.add(id(module))
                frozen.append(FrozenGroup(root, channels, EXPLODING_REASON))
                continue
            except MemoryError:
                raise UserError("dependency grouping ran out of memory; this model is not supported") from None
            except (IndexError, KeyError, ValueError, ZeroDivisionError) as exc:
                # Follows a mapping we left as identity (an opaque reshape) out of range:
                # the channels are coupled in a way we cannot express, so never prune them.
                visited.add(id(module))
                frozen.append(
                    FrozenGroup(root, channels, f"Torch-Pruning cannot follow its channels ({type(exc).__name__})")
                )
                continue
            for item in group:
                if dg.is_out_channel_pruning_fn(item.dep.handler):
                    visited.add(id(item.dep.target.module))
            groups.append(group)
    return groups, frozen


# Modules Torch-Pruning has no pruner for but whose parameters are one value per channel, pruned
# along that axis, and whose channel-mixing statistics shrink.py rescales exactly (see there)
CHANNEL_PARAMETER_MODULES = ("GlobalResponseNorm",)


def channel_parameter_owners(model: nn.Module) -> dict[nn.Parameter, tuple[str, nn.Module]]:
    """Each per-channel parameter of a CHANNEL_PARAMETER_MODULES module: (module name, module)."""
    return {
        p: (name, m)
        for name, m in model.named_modules()
        if type(m).__name__ in CHANNEL_PARAMETER_MODULES
        for p in m.parameters(recurse=False)
        if p.dim() == 1
    }


def _graph_freeze_reason(dg, tp_group, param_names: dict, owners: dict) -> str | None:
    """Reasons visible only in the traced graph: opaque reshapes and loose parameters."""
    for item in tp_group:
        node = item.dep.target
        if node in dg.opaque_reshapes:
            return OPAQUE_RESHAPE_REASON
        if isinstance(node.module, nn.Parameter) and node.module not in owners:
            # e.g. Swin's relative-position tables, MaxViT's: pruned along a guessed axis
            name = param_names.get(node.module, "a parameter")
            return f"includes '{name}', a parameter used outside any layer (pruning axis unknown)"
    return None


STEM_REASON = "holds the output channels of the first conv"  # the start of a policy freeze's reason


def _freeze_reason(
    group_members: list[tuple[nn.Module, Member]], first_conv: str | None, classifier: str | None
) -> str | None:
    for module, member in group_members:
        if member.role == "out" and member.module == first_conv:
            return f"{STEM_REASON} '{first_conv}' (kept by policy; prune.prune_stem: true prunes it)"
        if member.role == "out" and member.module == classifier:
            return f"holds the outputs of the classifier '{classifier}'"
        if isinstance(module, _CHANNEL_MIXING_NORMS) or (isinstance(module, nn.GroupNorm) and module.num_groups == 1):
            return f"passes through {type(module).__name__} '{member.module}', which normalises across channels"
        if isinstance(module, nn.MultiheadAttention):
            return f"passes through attention '{member.module}'"
    return None


def _ties(module: nn.Module, member: Member) -> list[list[int]] | str:
    """Channels of ``member`` (positions in its lists) that can only be removed together.

    GroupNorm normalises each group of C/G channels by that group's statistics: removing a whole
    group leaves the others' statistics as they were (GroupNorm then has G-1 groups), removing part
    of one does not. A grouped conv (G groups, not depthwise) stays one grouped conv only if every
    group loses the same positions, which is also how Torch-Pruning slices it. A string: the member
    holds part of such a set and the rest lies in another group (a concat), so it cannot be pruned."""
    if isinstance(module, nn.GroupNorm):
        span, what = module.num_channels // module.num_groups, f"GroupNorm '{member.module}'"
        key = [i // span for i in member.idxs]
        expected = span
    elif (
        isinstance(module, _CONV)
        and module.groups > 1
        and not (module.groups == module.in_channels == module.out_channels)
    ):
        width = module.in_channels if member.role == "in" else module.out_channels
        span, what = width // module.groups, f"grouped conv '{member.module}' (groups={module.groups})"
        key = [i % span for i in member.idxs]
        expected = module.groups
    else:
        return []
    sets: dict[int, list[int]] = {}
    for position, k in enumerate(key):
        sets.setdefault(k, []).append(position)
    if any(len(v) != expected for v in sets.values()):
        return f"holds part of a channel set of {what} that must be removed whole; the rest comes from another layer"
    return [v for v in sets.values() if len(v) > 1]


def _tie_units(group_members: list[tuple[nn.Module, Member]], size: int) -> tuple[list[list[int]] | None, str | None]:
    """Merge the units that ``_ties`` binds (union-find over root channels), renumbering every
    member's ``root_idxs`` in place. Returns the root channels of each new unit (None when nothing
    was merged), or a reason to freeze the group."""
    parent = list(range(size))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    merged = False
    for module, member in group_members:
        ties = _ties(module, member)
        if isinstance(ties, str):
            return None, ties
        for positions in ties:
            first = find(member.root_idxs[positions[0]])
            for p in positions[1:]:
                other = find(member.root_idxs[p])
                if other != first:
                    parent[other] = first
                    merged = True
    if not merged:
        return None, None
    unit_of: dict[int, int] = {}
    units: list[list[int]] = []
    for r in range(size):
        u = unit_of.setdefault(find(r), len(units))
        if u == len(units):
            units.append([])
        units[u].append(r)
    for _, member in group_members:
        member.root_idxs = [unit_of[find(r)] for r in member.root_idxs]
    return units, None


def channel_width(module: nn.Module, role: str) -> int | None:
    """How many channels ``module`` has on the side a group member touches (None: not a layer)."""
    if isinstance(module, BATCHNORMS):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, _CONV):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    return None


def _mapping_problem(group_members: list[tuple[nn.Module, Member]], size: int) -> str | None:
    """A group whose index lists cannot be right: Torch-Pruning followed the channels through a
    split and a concat of the same tensor (timm's CSP stages, DPN) and produced indices past a
    layer's width, repeated indices, or more root channels than the group has. Masking such a
    group indexes out of range and pruning it removes the wrong channels, so it is never pruned."""
    for module, member in group_members:
        width = channel_width(module, member.role)
        idxs, roots = member.idxs, member.root_idxs
        if (
            len(idxs) != len(roots)
            or len(set(idxs)) != len(idxs)
            or (width is not None and any(not 0 <= i < width for i in idxs))
            or any(not 0 <= r < size for r in roots)
        ):
            return (
                f"Torch-Pruning maps its channels inconsistently at '{member.module}' "
                f"({len(idxs)} indices for a layer of {width} channels): a split and concat it cannot follow"
            )
    return None


def _mask_points(dg, group_members: list[tuple[nn.Module, Member]]) -> list[Member]:
    """Where the mask multiplies a channel: every BatchNorm (and GroupNorm) in the group, plus every
    conv/linear producer whose output does not go only into the group's norms.

    Masking after BN (not after the conv) is what makes masked == shrunk: a filter zeroed
    before BN would still emit BN's bias.
    """
    in_group = {id(m) for m, _ in group_members}
    points: list[Member] = []
    for module, member in group_members:
        if isinstance(module, nn.GroupNorm) or type(module).__name__ in CHANNEL_PARAMETER_MODULES:
            points.append(member)  # channel-wise: its "in" and "out" channels are the same
            continue
        if member.role != "out":
            continue
        if isinstance(module, BATCHNORMS):
            points.append(member)
        elif isinstance(module, (*_CONV, nn.Linear)):
            node = dg.module2node[module]
            # Only a producer whose *every* consumer is one of the group's BatchNorms is covered
            # by their masks: MaxViT's stem conv also feeds the block's shortcut directly.
            only_bn = bool(node.outputs) and all(
                isinstance(o.module, MASKED_NORMS) and id(o.module) in in_group for o in node.outputs
            )
            if not only_bn:
                points.append(member)
    return points


def build_groups(
    model: nn.Module, example_input: torch.Tensor, *, timeout_s: float | None = 300, prune_stem: bool = False
) -> GroupIndex:
    """Analyse ``model`` once; the result is plain data reused by masks, cost model and shrink.
    ``prune_stem``: the first conv's output group is prunable like any other (by default it is
    frozen by policy, as the paper leaves it; ``prune.prune_stem``)."""
    order = _execution_order(model, example_input)
    first_conv = next((n for n in order if isinstance(model.get_submodule(n), _CONV)), None)
    classifier = order[-1] if order else None
    dg = build_dependency_graph(model, example_input, timeout_s=timeout_s)
    name_of = {m: n for n, m in model.named_modules()}

    param_names = {p: n for n, p in model.named_parameters()}
    owners = channel_parameter_owners(model)

    groups: list[ChannelGroup] = []
    all_groups, frozen = _all_groups(dg, name_of, timeout_s)
    for tp_group in all_groups:
        root_module = tp_group[0].dep.target.module
        root = name_of.get(root_module, str(root_module))
        members: list[tuple[nn.Module, Member]] = []
        unmapped = None
        for item in tp_group:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter) and module in owners and item.idxs is not None:
                # ConvNeXt-V2's GRN: a member (and a mask point: it emits its bias) like a norm
                name, module = owners[module]
                if all(m.module != name for _, m in members):
                    members.append(
                        (module, Member(name, "out", list(map(int, item.idxs)), list(map(int, item.root_idxs))))
                    )
                continue
            if not isinstance(module, nn.Module) or module not in name_of:
                continue  # element-wise ops and reshapes carry no weights
            role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if item.idxs is None or item.root_idxs is None or None in item.idxs or None in item.root_idxs:
                unmapped = unmapped or name_of[module]  # e.g. bat_resnext26ts's attention: no index mapping
                continue
            members.append(
                (module, Member(name_of[module], role, list(map(int, item.idxs)), list(map(int, item.root_idxs))))
            )
        size = len(tp_group[0].idxs)
        reason = (
            (f"Torch-Pruning gives no channel mapping for '{unmapped}'" if unmapped else None)
            or _freeze_reason(members, None if prune_stem else first_conv, classifier)
            or _graph_freeze_reason(dg, tp_group, param_names, owners)
            or _mapping_problem(members, size)
        )
        root_units = None
        if reason is None:
            root_units, reason = _tie_units(members, size)
        if reason is not None:
            frozen.append(FrozenGroup(root, size, reason))
            continue
        units = size if root_units is None else len(root_units)
        if units < 2:
            why = "a single channel" if size < 2 else f"its {size} channels form one GroupNorm/grouped-conv unit"
            frozen.append(FrozenGroup(root, size, why))
            continue
        group = ChannelGroup(len(groups), root, units, [m for _, m in members], root_units=root_units)
        group.mask_points = _mask_points(dg, members)
        if not group.mask_points:
            frozen.append(FrozenGroup(root, size, "no BatchNorm, conv or linear output to mask"))
            continue
        groups.append(group)
    return GroupIndex(groups=groups, frozen=frozen, first_conv=first_conv, classifier=classifier)
