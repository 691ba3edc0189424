"""A latency model measured on the target backend, so a target can say "2x faster here".

FLOPs answer "how fast" badly (docs/benchmarks.md: half the FLOPs gave 1.2x lower latency on
this CPU): depthwise convs and high-resolution layers cost more time than their FLOPs say, and
runtimes pick kernels by width. HALP (Shen et al., NeurIPS 2022) fixes it with a lookup table
measured on the device (``prune/latency_table.py``); this module turns the table into what the
solver needs for cascadec's channel groups:

* the predicted latency of any unit mask: the layers' table entries at the widths the mask
  keeps, each rounded up to the backend's channel block (a width between two multiples costs
  what the next multiple costs: the kernels pad to it) or, up to half a block, to that half
  (timed on its own: narrower than a block, kernels may take another path), bilinear between grid points, summed
  and scaled so that the full width predicts what
  the whole exported network measured (the rest of the graph, pooling, additions, layout
  reorders, is assumed to shrink with the convs);
* per unit, the milliseconds it costs (a slope over each layer's width range) and, against its
  FLOPs, its milliseconds per FLOP: the solver divides importance by one of them under a latency
  budget (``prune.latency.ranking``), HALP's knapsack solved greedily.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cascadec.errors import UserError
from cascadec.names import DEFAULT_LATENCY_RANKING, LATENCY_RANKINGS
from cascadec.prune.cost import CostModel
from cascadec.prune.latency_table import LATENCY_BACKENDS, LatencyTable, build_table, network_ms, network_pair_ms

# what the solver divides importance by under a latency budget (LatencyModel.unit_weights)
RANKINGS, DEFAULT_RANKING = LATENCY_RANKINGS, DEFAULT_LATENCY_RANKING  # (cascadec/names.py)

# --------------------------------------------------------------------------- the model the solver uses


class LatencyModel:
    """Predicted milliseconds of any unit mask, from the table and the cost model's widths."""

    def __init__(self, table: LatencyTable, cost: CostModel, ranking: str = DEFAULT_RANKING) -> None:
        self.table = table
        self.cost = cost
        self.names = list(cost.layer_names)
        missing = [n for n in self.names if n not in table.layers]
        if missing:
            raise UserError(f"latency table does not cover layer(s) {', '.join(missing[:3])}")
        self._pack()
        full = torch.ones(cost.num_units)
        self.layers_full_ms = self._layers_ms(full)
        # Calibrated on the whole network as measured: the layers timed alone give the proportions,
        # the network its scale. What it spends beyond its convs (additions, pooling, layout
        # reorders) is taken to shrink with them: those ops are per channel too.
        measured = table.network_ms or self.layers_full_ms
        self.scale = measured / self.layers_full_ms if self.layers_full_ms > 0 else 1.0
        self.base_ms = self.layers_full_ms * self.scale
        # the unpruned network in FP32, which a target's speed-up counts from (the base itself
        # unless the table was timed in another precision: prune.latency.precision)
        self.reference_ms = table.reference_ms or self.base_ms
        self._weights: torch.Tensor | None = None
        self.ranking = ranking

    @property
    def ranking(self) -> str:
        """How the solver ranks units under a latency budget (``unit_weights``)."""
        return self._ranking

    @ranking.setter
    def ranking(self, value: str) -> None:
        if value not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, not {value!r}")
        self._ranking = value
        self._weights = None

    def _pack(self) -> None:
        """Every layer's grid and times in padded tensors, so one prediction is a few tensor ops
        (the solver predicts dozens of masks per training step)."""
        tables = [self.table.tables[self.table.layers[n]] for n in self.names]
        width = max(max(len(t.in_grid), len(t.out_grid)) for t in tables) if tables else 1
        count = len(tables)
        self._in_grid = torch.full((count, width), float("inf"), dtype=torch.float64)
        self._out_grid = torch.full((count, width), float("inf"), dtype=torch.float64)
        self._in_len = torch.tensor([len(t.in_grid) for t in tables], dtype=torch.long)
        self._out_len = torch.tensor([len(t.out_grid) for t in tables], dtype=torch.long)
        self._ms = torch.zeros((count, width, width), dtype=torch.float64)
        for i, t in enumerate(tables):
            self._in_grid[i, : len(t.in_grid)] = torch.tensor(t.in_grid, dtype=torch.float64)
            self._out_grid[i, : len(t.out_grid)] = torch.tensor(t.out_grid, dtype=torch.float64)
            self._ms[i, : len(t.in_grid), : len(t.out_grid)] = torch.tensor(t.ms, dtype=torch.float64)
        self._depthwise = torch.tensor([t.config.depthwise for t in tables], dtype=torch.bool)
        self._in_full = torch.tensor([t.in_grid[-1] for t in tables], dtype=torch.float64)
        self._out_full = torch.tensor([t.out_grid[-1] for t in tables], dtype=torch.float64)

    def _padded(self, kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Widths rounded up to the channel block, never past the layer's full width; a width
        up to the table's narrow one (half a block) costs what that one was timed at."""
        block = self.table.channel_block
        if block <= 1:
            return kept
        padded = torch.ceil(kept / block) * block
        narrow = self.table.narrow
        if narrow:
            padded = torch.where(kept <= narrow, torch.full_like(kept, float(narrow)), padded)
        return torch.minimum(padded, full)

    @staticmethod
    def _axis(grid: torch.Tensor, length: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per layer: the grid points around ``x`` and the weight of the upper one (clamped at
        both ends, as ``LayerTable.at``)."""
        last = length - 1
        hi = torch.searchsorted(grid, x[:, None].contiguous()).squeeze(1).clamp(max=last)
        lo = (hi - 1).clamp(min=0)
        g_lo = grid.gather(1, lo[:, None]).squeeze(1)
        g_hi = grid.gather(1, hi[:, None]).squeeze(1)
        span = (g_hi - g_lo).where(g_hi > g_lo, torch.ones_like(g_hi))
        w = ((x - g_lo) / span).clamp(0.0, 1.0).where(g_hi > g_lo, torch.zeros_like(x))
        below = x <= grid[:, 0]
        lo, hi, w = lo.where(~below, torch.zeros_like(lo)), hi.where(~below, torch.zeros_like(hi)), w.where(~below, 0.0)
        return lo, hi, w

    def _layers_ms(self, keep: torch.Tensor) -> float:
        kin, kout = self.cost._kept(keep)
        one_axis = torch.minimum(kin, kout)  # a depthwise layer: the channels
        kin = torch.where(self._depthwise, one_axis, kin)
        kin, kout = self._padded(kin.double(), self._in_full), self._padded(kout.double(), self._out_full)
        i0, i1, a = self._axis(self._in_grid, self._in_len, kin)
        o0, o1, b = self._axis(self._out_grid, self._out_len, kout)
        rows = torch.arange(len(self.names))
        ms = self._ms
        top = ms[rows, i0, o0] * (1 - b) + ms[rows, i0, o1] * b
        bottom = ms[rows, i1, o0] * (1 - b) + ms[rows, i1, o1] * b
        return float((top * (1 - a) + bottom * a).sum())

    def predict(self, keep: torch.Tensor) -> float:
        """Milliseconds of the network this mask leaves, on the table's backend and batch."""
        return self._layers_ms(keep) * self.scale

    def unit_weights(self) -> torch.Tensor:
        """What the solver divides importance by under a latency budget (``ranking``), over its
        mean and floored at a tenth of it (a unit the table sees no time in is not free: the grid
        is coarse); computed once.

        * ``per_ms``: the milliseconds a unit costs (HALP's knapsack ratio);
        * ``per_ms_per_flop``: its milliseconds per FLOP. The FLOPs solver ranks by importance
          alone, which is the knapsack ratio for a value of importance x FLOPs under a FLOPs
          cost; keeping that value and pricing it in milliseconds divides importance by ms per
          FLOP. Where time is proportional to FLOPs this is the FLOPs solver's ranking; where
          it is not, the units whose FLOPs are cheap in time are kept first;
        * ``importance``: nothing (importance alone, only the budget in milliseconds).
        """
        if self._weights is None:
            costs = self.unit_costs().double()
            if self.ranking == "importance":
                weights = torch.ones_like(costs)
            elif self.ranking == "per_ms_per_flop":
                ms_share = costs / costs.mean().clamp_min(1e-12)
                flops = self.cost.unit_macs()
                flops_share = flops / flops.mean().clamp_min(1e-12)
                ratio = ms_share / flops_share.clamp_min(1e-3)  # a unit with no FLOPs: slow per FLOP
                # over the median, not the mean: a few units with almost no FLOPs (ratios up to
                # 1000x) would lift a mean until the floor flattened every ordinary unit
                weights = ratio / ratio.median().clamp_min(1e-12)
            else:
                weights = costs / costs.mean().clamp_min(1e-12)
            self._weights = weights.clamp_min(0.1).float()
        return self._weights

    def unit_costs(self) -> torch.Tensor:
        """Milliseconds one unit saves, averaged over each layer's whole width range (a slope,
        not the step at full width): what ``unit_weights`` prices a unit by."""
        slopes_in, slopes_out, depthwise = [], [], []
        for name in self.names:
            t = self.table.tables[self.table.layers[name]]
            c = t.config
            full_in, full_out = c.in_channels, c.out_channels
            ms = np.asarray(t.ms)
            d_in = (ms[-1, -1] - ms[0, -1]) / max(1, t.in_grid[-1] - t.in_grid[0]) if len(t.in_grid) > 1 else 0.0
            d_out = (ms[-1, -1] - ms[-1, 0]) / max(1, t.out_grid[-1] - t.out_grid[0]) if len(t.out_grid) > 1 else 0.0
            depthwise.append(c.depthwise)
            slopes_in.append(max(0.0, d_in) if full_in else 0.0)
            slopes_out.append(max(0.0, d_out) if full_out else 0.0)
        s_in = torch.tensor(slopes_in, dtype=torch.float64)
        s_out = torch.tensor(slopes_out, dtype=torch.float64)
        dw = torch.tensor(depthwise, dtype=torch.bool)
        # a depthwise layer has one axis (its grid is over input channels): a unit that reaches
        # it as input, output or both removes one channel of it
        a_in = torch.where(dw[:, None], torch.maximum(self.cost.a_in, self.cost.a_out), self.cost.a_in)
        a_out = torch.where(dw[:, None], torch.zeros_like(self.cost.a_out), self.cost.a_out)
        per_unit = a_in.T @ s_in + a_out.T @ s_out
        return per_unit.float() * self.scale


def time_per_flop(latency: LatencyModel) -> list[dict[str, Any]]:
    """Where the unpruned network's time goes against its FLOPs, per layer kind and input size:
    the table's full-width entries and the cost model's MACs, each as a share of the layers'
    total, and their ratio (1 = as fast per FLOP as the network on average). A view of what the
    default ranking acts on, not its weights: those are slopes over each layer's width range, in
    which a layer's fixed cost per call cancels, so a layer that is mostly call cost (a small
    linear head) shows far above 1 here but ranks near 1."""
    cost = latency.cost
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i, name in enumerate(latency.names):
        layer = latency.table.tables[latency.table.layers[name]]
        c, ms = layer.config, layer.ms[-1][-1]
        macs = float(cost.coef[i] * (cost.cout[i] if cost.depthwise[i] else cost.cin[i] * cost.cout[i]))
        kernel = "x".join(str(k) for k in c.kernel)
        kind = "linear" if c.kind == "linear" else f"{'depthwise' if c.depthwise else 'conv'} {kernel}"
        size = "x".join(str(d) for d in c.input_hw) if c.kind != "linear" else "-"
        row = rows.setdefault((kind, size), {"kind": kind, "input": size, "layers": 0, "ms": 0.0, "macs": 0.0})
        row["layers"] += 1
        row["ms"] += ms
        row["macs"] += macs
    total_ms = sum(r["ms"] for r in rows.values()) or 1.0
    total_macs = sum(r["macs"] for r in rows.values()) or 1.0
    out = []
    for r in rows.values():
        ms_share, flops_share = r["ms"] / total_ms, r["macs"] / total_macs
        out.append(
            {
                "kind": r["kind"],
                "input": r["input"],
                "layers": r["layers"],
                "time_share": ms_share,
                "flops_share": flops_share,
                "time_per_flop": ms_share / flops_share if flops_share > 0 else None,
            }
        )
    return sorted(out, key=lambda r: (r["time_per_flop"] is not None, r["time_per_flop"] or 0.0), reverse=True)


def attach_latency_model(
    model: nn.Module,
    example_input: torch.Tensor,
    cost: CostModel,
    *,
    backend: str,
    batch: int,
    grid_points: int,
    threads: int | None,
    multiple: int | None = None,
    ranking: str = DEFAULT_RANKING,
    precision: str = "fp32",
    progress: bool = False,
) -> LatencyModel:
    """Measure (or load) the network's table on ``backend`` and attach it to ``cost``; a backend
    this machine lacks is refused (exit 2) before anything is timed. ``multiple`` None: probe
    the backend's channel block (``latency_table.probe_channel_block``)."""
    from cascadec.backends.registry import get_backend

    backend = get_backend(backend).name  # an unknown name is refused here, an alias resolved
    if backend not in LATENCY_BACKENDS:
        raise UserError(
            f"latency targets are measured on {' or '.join(LATENCY_BACKENDS)}; {backend!r} is not supported "
            "(a TensorRT table would need one engine build per grid point)"
        )
    get_backend(backend).require(timing=True)
    device = get_backend(backend).device

    @functools.cache
    def pair() -> tuple[float, float]:  # INT8 and FP32, interleaved; timed only if the table is not cached
        return network_pair_ms(model, example_input, batch=batch, device=device, threads=threads)

    table = build_table(
        model,
        example_input,
        cost=cost,
        backend=backend,
        batch=batch,
        threads=threads,
        grid_points=grid_points,
        multiple=multiple,
        network_ms=(
            (lambda: pair()[0])
            if precision == "int8"
            else lambda: network_ms(model, example_input, batch=batch, device=device, threads=threads)
        ),
        reference_ms=lambda: pair()[1],
        precision=precision,
        progress=progress,
    )
    cost.latency = LatencyModel(table, cost, ranking)
    return cost.latency


def latency_prediction(latency: LatencyModel, keep: torch.Tensor, budget) -> dict[str, Any]:
    """What the prune stage records for a latency target: the student's predicted latency next to
    the unpruned network's, the target, and how the table was made."""
    predicted = latency.predict(keep)
    base, reference = latency.base_ms, latency.reference_ms
    return {
        "backend": latency.table.backend,
        "batch": latency.table.batch,
        "precision": latency.table.precision,
        "base_ms": base,
        "reference_ms": reference,
        "predicted_ms": predicted,
        # counted from the unpruned FP32 network (the same as ``base_ms`` for an FP32 table)
        "predicted_speedup": reference / predicted if predicted > 0 else None,
        "target_speedup": reference / (budget.keep_fraction * base) if budget.metric == "latency" else None,
        "ranking": latency.ranking,
        "table": latency.table.summary(),
    }
