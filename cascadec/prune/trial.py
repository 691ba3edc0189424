"""Prove, before any training, that every prunable group shrinks exactly; freeze the ones that do not.

Torch-Pruning follows channels through the ops it can see in the autograd graph. timm and user
code keep channel counts where it cannot: split sizes stored on a module (MixNet's mixed conv,
MobileViTv2's ``[1, d, d]`` query/key/value split), head counts in a ``reshape`` (attention
blocks), a slice that keeps the first C channels of a concat (GhostNet), a norm's fixed ``gain``
shape (NF-Nets' weight standardisation). Pruning such a group either crashes after shrinking or,
worse, yields a network that computes something other than the masked network the cascade
trained. Rather than recognise every such op by name, the analysis removes channels from every
group of a copy of the network and checks that the shrunk copy computes what the masked copy
does (the exactness the whole method rests on: docs/paper.md, "masked == shrunk"). Groups that break
it are found one by one and frozen with the error as the reason, so ``inspect`` names them and
``compress`` never prunes them.

Two trial masks: one channel per group (one per segment of a split group: the solver's floor,
the harshest mask it can produce) and a random half of each group. BatchNorm statistics are randomised on the copy so that a
misplaced channel shows in the outputs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch
import torch.nn as nn

from cascadec.errors import CascadecError, UserError, first_line
from cascadec.prune.groups import CHANNEL_PARAMETER_MODULES, FrozenGroup, GroupIndex, build_dependency_graph
from cascadec.prune.masks import masked
from cascadec.prune.shrink import fold_weight_standardisation, remove_channels
from cascadec.train.bn import BATCHNORMS

TOLERANCE = 1e-4  # relative max |masked - shrunk|; float32 reassociation stays near 1e-6
TRIAL_REASON = "pruning it does not give the masked network"


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics (and GRN parameters), in place: with a fresh model's (mean 0,
    variance 1) a channel mapped to the wrong place can compute the same thing by accident; with
    these it cannot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORMS) and m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            elif type(m).__name__ in CHANNEL_PARAMETER_MODULES:
                # ConvNeXt-V2's GRN starts as the identity (weight = bias = 0): nothing to check
                for p in m.parameters(recurse=False):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def _randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    return randomise_batchnorm(copy.deepcopy(model).eval(), seed)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _Trial:
    """One masked reference network and one copy that is shrunk group by group."""

    def __init__(
        self, model: nn.Module, index: GroupIndex, example_input: torch.Tensor, seed: int, sparse: bool
    ) -> None:
        self.index = index
        self.reference = _randomised_copy(model, seed)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(1, *example_input.shape[1:], generator=gen, dtype=example_input.dtype)
        self.example = example_input[:1]
        # the channels each group keeps: one per segment (the solver's floor) when ``sparse``, else
        # about half of each segment; chosen at random so that no layout (first, last) is favoured
        self.kept_units: list[set[int]] = []
        for g in index.groups:
            members: dict[int, list[int]] = {}
            for unit, segment in enumerate(g.segments()):
                members.setdefault(segment, []).append(unit)
            kept: set[int] = set()
            for units in members.values():
                order = torch.randperm(len(units), generator=gen).tolist()
                count = 1 if sparse else max(1, len(units) // 2)
                kept.update(units[i] for i in order[:count])
            self.kept_units.append(kept)

    def keep_vectors(self, pruned: set[int]) -> list[torch.Tensor]:
        vectors = []
        for gpos, group in enumerate(self.index.groups):
            v = torch.ones(group.size)
            if gpos in pruned:
                v.zero_()
                v[sorted(self.kept_units[gpos])] = 1.0
            vectors.append(v)
        return vectors

    def masked_output(self, pruned: set[int]) -> torch.Tensor:
        with torch.no_grad(), masked(self.reference, self.index, self.keep_vectors(pruned)):
            return self.reference(self.x)

    def removals(self, gpos: int) -> list[int]:
        group = self.index.groups[gpos]
        return group.root_channels(i for i in range(group.size) if i not in self.kept_units[gpos])

    def fresh_copy(self, pruned: list[int]):
        """A copy of the reference with ``pruned`` groups already removed (each proven before)."""
        twin = fold_weight_standardisation(copy.deepcopy(self.reference))
        dg = build_dependency_graph(twin, self.example)
        with torch.no_grad():
            for gpos in pruned:
                self._remove(twin, dg, gpos)
        return twin, dg

    def _remove(self, twin: nn.Module, dg, gpos: int) -> None:
        remove_channels(twin, dg, self.index.groups[gpos].root, self.removals(gpos))

    def attempt(self, twin: nn.Module, dg, gpos: int, pruned: set[int]) -> str | None:
        """Remove group ``gpos`` from ``twin`` (where ``pruned`` are already gone); None if exact."""
        try:
            with torch.no_grad():
                self._remove(twin, dg, gpos)
                shrunk = twin(self.x)
            expected = self.masked_output(pruned | {gpos})
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the shrunk network is this group's refusal
            return f"{type(exc).__name__}: {first_line(exc, 160)}"
        gap = _relative_gap(shrunk, expected)
        if not gap <= TOLERANCE:
            return f"shrunk and masked outputs differ by {gap:.1e} (relative)"
        return None


def prove_groups(
    model: nn.Module, index: GroupIndex, example_input: torch.Tensor, *, seed: int = 0, timeout_s: float = 120
) -> GroupIndex:
    """``index`` without the groups whose pruning is not exact (moved to ``frozen``, with the reason).

    Two masks: one channel per segment (the harshest the solver can produce) and a random half
    of each (a typical one: Torch-Pruning's split mappings can be right at one and wrong at the
    other). For each, every group is removed at once first: on most networks that one shrink
    proves them all and costs about as much as the analysis itself. Only when it fails are groups
    removed one at a time on one copy (a Torch-Pruning graph stays valid across prunes), rolled
    back after each group that breaks it.
    """
    deadline = time.monotonic() + timeout_s
    was_training = model.training
    try:
        for sparse in (True, False):
            if not index.groups:
                break
            trial = _Trial(model, index, example_input, seed, sparse)
            index = freeze(index, _culprits(trial, deadline, timeout_s))
    finally:
        model.train(was_training)
    return index


def _exact_together(trial: _Trial, groups: list[int]) -> bool:
    """Remove ``groups`` from a fresh copy, all of them; True when it computes the masked network."""
    try:
        twin, _ = trial.fresh_copy(groups)
        with torch.no_grad():
            return _relative_gap(twin(trial.x), trial.masked_output(set(groups))) <= TOLERANCE
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 - some group breaks the network
        return False


def _culprits(trial: _Trial, deadline: float, timeout_s: float) -> dict[int, str]:
    everything = list(range(len(trial.index.groups)))
    if _exact_together(trial, everything):
        return {}
    # one group at a time, rolled back after each culprit instead of rebuilt (a rebuild traces the
    # network again: seconds per culprit); one rebuild then proves the rollbacks left nothing behind,
    # and if they did, the slow, sure path rebuilds after every culprit
    proven, culprits = _one_at_a_time(trial, deadline, timeout_s, rollback=True)
    if _exact_together(trial, proven):
        return culprits
    return _one_at_a_time(trial, deadline, timeout_s, rollback=False)[1]


def _one_at_a_time(
    trial: _Trial, deadline: float, timeout_s: float, *, rollback: bool
) -> tuple[list[int], dict[int, str]]:
    proven: list[int] = []
    culprits: dict[int, str] = {}
    total = len(trial.index.groups)
    twin, dg = trial.fresh_copy([])
    for gpos in range(total):
        if time.monotonic() > deadline:
            raise UserError(
                f"checking which channel groups prune exactly took longer than {timeout_s:.0f} s "
                f"({gpos} of {total} groups done); this model is not supported"
            )
        saved = _snapshot(twin, dg) if rollback else None
        problem = trial.attempt(twin, dg, gpos, set(proven))
        if problem is None:
            proven.append(gpos)
            continue
        culprits[gpos] = problem
        if saved is not None:
            _restore(saved)
        else:
            twin, dg = trial.fresh_copy(proven)
    return proven, culprits


def _snapshot(twin: nn.Module, dg) -> list[tuple[nn.Module, dict, dict, dict]]:
    """What a prune changes: Torch-Pruning replaces parameters and buffers and rewrites channel
    attributes (never mutates a tensor in place), on the network's modules and on its own op
    nodes (split offsets). Shallow copies of their dictionaries are enough to roll a prune back."""
    modules = list(twin.modules()) + [n.module for n in dg.module2node.values() if isinstance(n.module, nn.Module)]
    seen: set[int] = set()
    saved = []
    for m in modules:
        if id(m) in seen:
            continue
        seen.add(id(m))
        saved.append((m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)))
    return saved


def _restore(saved: list[tuple[nn.Module, dict, dict, dict]]) -> None:
    for m, attrs, params, buffers in saved:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        m._parameters = dict(params)
        m._buffers = dict(buffers)


def freeze(index: GroupIndex, culprits: dict[int, str]) -> GroupIndex:
    """A new index with the groups at positions ``culprits`` frozen, the others renumbered."""
    groups, frozen = [], list(index.frozen)
    for gpos, group in enumerate(index.groups):
        if gpos in culprits:
            frozen.append(FrozenGroup(group.root, group.size, f"{TRIAL_REASON} ({culprits[gpos]})"))
        else:
            groups.append(replace(group, index=len(groups)))
    return GroupIndex(groups=groups, frozen=frozen, first_conv=index.first_conv, classifier=index.classifier)


def check_shrunk(
    masked_model: nn.Module, index: GroupIndex, keep: torch.Tensor, student: nn.Module, example_input: torch.Tensor
) -> float:
    """The last guard: the trained, masked network and its shrunk copy must agree before the
    student is saved. The trial proved every group on random weights; this checks the real
    weights and mask, so no silently different student ever ships."""
    x = torch.randn(2, *example_input.shape[1:], generator=torch.Generator().manual_seed(0))
    was_training = masked_model.training
    masked_model.eval()
    student.eval()
    try:
        with torch.no_grad(), masked(masked_model, index, keep):
            expected = masked_model(x)
        with torch.no_grad():
            got = student(x)
    finally:
        masked_model.train(was_training)
    gap = _relative_gap(got, expected)
    if not gap <= TOLERANCE:
        raise CascadecError(
            f"the shrunk student does not compute what the masked network computes (relative max|diff| {gap:.1e}); "
            "it was not saved. This is a cascadec defect: please report it with the output of `cascadec inspect MODEL`"
        )
    return gap
