"""Turn a user's target (FLOPs, params or keep ratio) into a mask by one global threshold.

Units (group channels) are ranked by score across the whole network; we search the
number K of globally top-ranked units such that the mask's cost meets the budget, with
at least ``min_channels`` kept per group and optional rounding of each group's width to
a multiple of ``round_to`` (Tensor Cores and vector units like widths of 8/16/32).
Rounding is applied inside the search, so the reported cost is the cost of what ships.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascadec.errors import UserError
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import GroupIndex
from cascadec.recipe import TargetSection, target_budget

METRICS = ("flops", "params", "units", "latency")
# global: one threshold over all units (the paper); uniform: every group keeps the same fraction of
# its channels, ranked within the group (Torch-Pruning's default local pruning), the fraction found
# by bisection so the cost meets the budget, then widened channel by channel up to the budget
ALLOCATIONS = ("global", "uniform")


@dataclass
class Budget:
    """A resolved target: the metric and the largest value the pruned network may cost."""

    metric: str
    value: float
    keep_fraction: float  # of the metric's unpruned value

    @classmethod
    def from_target(
        cls,
        cost: CostModel,
        *,
        flops_reduction=None,
        params_reduction=None,
        keep_ratio=None,
        latency_reduction=None,
        latency_ms=None,
    ) -> Budget:
        try:
            base_ms = cost.latency.base_ms if latency_ms is not None and cost.latency is not None else None
            if (latency_ms is not None or latency_reduction is not None) and cost.latency is None:
                raise ValueError("a latency target needs a latency table (prune.latency; analysis builds it)")
            metric, fraction = target_budget(
                flops_reduction, params_reduction, keep_ratio, latency_reduction, latency_ms, base_ms
            )
            if latency_reduction is not None:
                fraction = _reduction_in_table_precision(cost.latency, fraction)
        except ValueError as exc:
            raise UserError(f"target: {exc}") from None
        return cls(metric, fraction * cost.base(metric), fraction)

    @classmethod
    def from_section(cls, cost: CostModel, target: TargetSection) -> Budget:
        """The budget a recipe's ``prune.target`` (already validated by the schema) asks for."""
        return cls.from_target(
            cost,
            flops_reduction=target.flops_reduction,
            params_reduction=target.params_reduction,
            keep_ratio=target.keep_ratio,
            latency_reduction=target.latency_reduction,
            latency_ms=target.latency_ms,
        )

    def scaled(self, fraction: float, cost: CostModel) -> Budget:
        return Budget(self.metric, fraction * cost.base(self.metric), fraction)


def _reduction_in_table_precision(latency, fraction: float) -> float:
    """A ``latency_reduction`` counts from the unpruned FP32 network; a table timed in INT8
    (``prune.latency.precision``) budgets against the unpruned INT8 one, which quantization alone
    has already made faster: the pruning left to do is the rest. ValueError when INT8 alone
    meets the target (nothing to prune)."""
    if latency.reference_ms == latency.base_ms:
        return fraction
    scaled = fraction * latency.reference_ms / latency.base_ms
    if scaled >= 1.0:
        raise ValueError(
            f"latency_reduction {1 - fraction:g} ({1 / fraction:.2f}x): {latency.table.precision.upper()} alone "
            f"already gives {latency.reference_ms / latency.base_ms:.2f}x on {latency.table.backend} "
            "(no channel needs to go): ask for more, or quantize the teacher without pruning"
        )
    return scaled


class MaskSolver:
    """Precomputes group membership of units so each candidate mask is a few tensor ops."""

    def __init__(
        self,
        index: GroupIndex,
        cost: CostModel,
        *,
        min_channels: int = 1,
        round_to: int | None = None,
        narrow: int = 0,
        allocation: str = "global",
    ) -> None:
        if allocation not in ALLOCATIONS:
            raise UserError(f"prune.allocation {allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
        self.index = index
        self.cost = cost
        self.allocation = allocation
        self.min_channels = min_channels
        self.round_to = round_to if round_to and round_to > 1 else None
        sizes = torch.tensor([g.size for g in index.groups])
        self.sizes = sizes
        self.group_of_unit = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        self.offsets = torch.cumsum(sizes, 0) - sizes
        # split groups: one segment per part, each keeps its best unit (see ChannelGroup.segments)
        segment, counts, first = [], [], 0
        for g in index.groups:
            ids = g.segments()
            segment += [first + i for i in ids]
            counts.append(max(ids) + 1 if ids else 1)
            first += counts[-1]
        self.segment_of_unit = torch.tensor(segment, dtype=torch.long)
        self.num_segments = first
        self.floor = torch.minimum(sizes, torch.maximum(torch.tensor(counts), torch.tensor(min_channels)))
        # round_to counts channels; a tied unit (a GroupNorm group, one position of every group of a
        # grouped conv) is several, so its group rounds in fewer units
        per_unit = torch.tensor([g.unit_channels for g in index.groups], dtype=torch.long)
        self.step = (
            torch.clamp((self.round_to + per_unit - 1) // per_unit, min=1) if self.round_to else torch.ones_like(sizes)
        )
        # the one width allowed below round_to (a latency table's half block, LatencyTable.narrow),
        # in units; 0 where there is none or it is no narrower than a step
        narrow_units = torch.clamp((narrow + per_unit - 1) // per_unit, min=1)
        self.narrow = torch.where(
            (narrow > 0) & (narrow_units < self.step) & bool(self.round_to), narrow_units, torch.zeros_like(sizes)
        )
        # the channels each group keeps at the least (floors, rounding and the narrow width
        # applied): what an infeasible target is refused with
        self.narrowest_channels = (self.widths(torch.zeros_like(sizes)) * per_unit).tolist()
        self.narrowest = max(self.narrowest_channels, default=1)

    def _leaders(self, scores: torch.Tensor) -> torch.Tensor:
        """True for the best unit of each segment (the first one on ties)."""
        best = torch.full((self.num_segments,), -torch.inf).scatter_reduce(
            0, self.segment_of_unit, scores, "amax", include_self=True
        )
        position = torch.arange(len(scores))
        candidate = torch.where(scores >= best[self.segment_of_unit], position, len(scores))
        first = torch.full((self.num_segments,), len(scores)).scatter_reduce(
            0, self.segment_of_unit, candidate, "amin", include_self=True
        )
        return first[self.segment_of_unit] == position

    def _ranks_within_group(self, scores: torch.Tensor) -> torch.Tensor:
        """Rank 0 = best unit of its group (ties broken by position, deterministic). In a split
        group the best unit of every segment ranks first, so the group's floor keeps them all."""
        by_score = torch.argsort(scores, descending=True, stable=True)
        if self.num_segments > len(self.sizes):
            leaders = self._leaders(scores)
            by_score = by_score[torch.argsort((~leaders[by_score]).long(), stable=True)]
        order = by_score[torch.argsort(self.group_of_unit[by_score], stable=True)]
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(len(order))
        return ranks - self.offsets[self.group_of_unit]

    def widths(self, per_group_kept: torch.Tensor) -> torch.Tensor:
        """Per group, the allowed width at or above what it would keep: its floor, then a
        multiple of round_to (or the narrow width below it), never past the group's size."""
        kept = torch.maximum(per_group_kept, self.floor)
        if self.round_to:
            rounded = ((kept + self.step - 1) // self.step) * self.step
            rounded = torch.where((self.narrow > 0) & (kept <= self.narrow), self.narrow, rounded)
            kept = torch.minimum(self.sizes, rounded)
        return kept

    def mask_for_count(
        self, scores: torch.Tensor, top_k: int, ranks: torch.Tensor | None = None, order=None
    ) -> torch.Tensor:
        """Keep the ``top_k`` best units network-wide, then apply per-group floors and rounding."""
        if order is None:
            order = torch.argsort(scores, descending=True, stable=True)
        if ranks is None:
            ranks = self._ranks_within_group(scores)
        per_group = torch.bincount(self.group_of_unit[order[:top_k]], minlength=len(self.sizes))
        kept = self.widths(per_group)
        return (ranks < kept[self.group_of_unit]).float()

    def check_feasible(self, budget: Budget) -> None:
        """Refuse a target that even the narrowest allowed network cannot meet."""
        smallest = self.mask_for_count(torch.zeros(len(self.group_of_unit)), 0)
        floor_cost = self.cost.metric(budget.metric, smallest)
        if floor_cost > budget.value * (1 + 1e-9):
            base = self.cost.base(budget.metric)
            raise UserError(
                f"target infeasible: keeping {self._narrowest_words()} channel(s) per prunable group already costs "
                f"{floor_cost / base:.1%} of the unpruned {budget.metric}, above the target {budget.keep_fraction:.1%}"
                + (
                    f"; {len(self.index.frozen)} channel groups are frozen (`cascadec inspect` lists them and why)"
                    if self.index.frozen
                    else ""
                )
            )

    def _narrowest_words(self) -> str:
        low, high = min(self.narrowest_channels, default=1), self.narrowest
        return str(high) if low == high else f"{low}-{high}"

    def mask_for_fraction(self, ranks: torch.Tensor, fraction: float) -> torch.Tensor:
        """Every group keeps ``fraction`` of its channels (its best-ranked ones), before floors and rounding."""
        kept = self.widths(torch.round(self.sizes.float() * fraction).long())
        return (ranks < kept[self.group_of_unit]).float()

    def _solve_uniform(self, scores: torch.Tensor, ranks: torch.Tensor, budget: Budget) -> torch.Tensor:
        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the shared fraction; 40 halvings is below any channel step
            mid = (lo + hi) / 2
            if self.cost.metric(budget.metric, self.mask_for_fraction(ranks, mid)) <= budget.value:
                lo = mid
            else:
                hi = mid
        return self.mask_for_fraction(ranks, lo)

    def solve(self, scores: torch.Tensor, budget: Budget) -> torch.Tensor:
        """The largest mask whose cost is within the budget: global top-k, or one fraction per group."""
        scores = scores.detach().float().cpu()
        if budget.metric == "latency" and self.cost.latency is not None:
            # HALP's knapsack, greedily: importance over a unit's latency weight (prune.latency.ranking)
            scores = scores / self.cost.latency.unit_weights()
        order = torch.argsort(scores, descending=True, stable=True)
        ranks = self._ranks_within_group(scores)
        self.check_feasible(budget)
        if self.allocation == "uniform":
            # the shared fraction moves in whole channels of the smallest group: spend what it
            # left of the budget as the global mask does, so both meet the same target
            return self._fill(scores, self._solve_uniform(scores, ranks, budget), ranks, budget)
        lo, hi = 0, len(scores)
        while lo < hi:  # largest k with cost(k) <= budget
            mid = (lo + hi + 1) // 2
            if self.cost.metric(budget.metric, self.mask_for_count(scores, mid, ranks, order)) <= budget.value:
                lo = mid
            else:
                hi = mid - 1
        return self._fill(scores, self.mask_for_count(scores, lo, ranks, order), ranks, budget)

    def _fill(self, scores: torch.Tensor, keep: torch.Tensor, ranks: torch.Tensor, budget: Budget) -> torch.Tensor:
        """Spend what rounding left of the budget: widen groups one step at a time, best next
        unit first, while the cost stays within budget (keeps coarse round_to near the target)."""
        kept = torch.bincount(self.group_of_unit, weights=keep, minlength=len(self.sizes)).long()
        while True:
            wider = self.widths(kept + 1)  # each group's next allowed width
            candidates = []
            for g in torch.nonzero(kept < self.sizes).flatten().tolist():
                nxt = (ranks == kept[g]) & (self.group_of_unit == g)
                candidates.append((float(scores[nxt].max()), g))
            grown = False
            for _, g in sorted(candidates, reverse=True):
                trial_kept = kept.clone()
                trial_kept[g] = int(wider[g])
                trial = (ranks < trial_kept[self.group_of_unit]).float()
                if self.cost.metric(budget.metric, trial) <= budget.value:
                    kept, keep, grown = trial_kept, trial, True
                    break
            if not grown:
                return keep
