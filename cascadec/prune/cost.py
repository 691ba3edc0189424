"""Cost model: multiply-accumulates and parameters of a network under a channel mask.

FLOPs are counted as the paper does: multiply-accumulates of conv and linear layers,
no bias, no BatchNorm. The masked cost is computed analytically from the per-layer
channel counts that survive, so solving a target (bisection over hundreds of candidate
masks) costs microseconds per candidate and needs no forward pass. ``count_macs`` on a
real module is the ground truth the analytic model is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from cascadec.prune.groups import GroupIndex

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, torch.Size]:
    return output_shapes(model, example_input, lambda m: isinstance(m, (*_CONV, nn.Linear)))


def output_shapes(
    model: nn.Module, example_input: torch.Tensor, wanted=lambda m: True, *, last: bool = False
) -> dict[str, torch.Size | None]:
    """Output shape of each named module ``wanted`` picks, on one eval pass (a module called
    twice: its first output, or its last with ``last``); None for an output that is no tensor."""
    shapes: dict[str, torch.Size | None] = {}
    hooks = []

    def record(name: str, out: object) -> None:
        shape = out.shape if isinstance(out, torch.Tensor) else None
        if last:
            shapes[name] = shape
        else:
            shapes.setdefault(name, shape)

    for name, module in model.named_modules():
        if name and wanted(module):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(n, o)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _macs_per_channel_pair(module: nn.Module, out_shape: torch.Size) -> float:
    """MACs = coefficient * in_channels * out_channels (depthwise: coefficient * channels)."""
    if isinstance(module, _CONV):
        spatial = 1
        for s in out_shape[2:]:
            spatial *= int(s)
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        # batch of the example input is 1 by construction
        return spatial * kernel / module.groups
    tokens = 1
    for s in out_shape[:-1]:
        tokens *= int(s)
    return float(tokens)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of conv + linear layers for one sample (batch dimension of the input must be 1)."""
    total = 0.0
    shapes = _layer_shapes(model, example_input)
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        cin = module.in_channels if isinstance(module, _CONV) else module.in_features
        cout = module.out_channels if isinstance(module, _CONV) else module.out_features
        total += _macs_per_channel_pair(module, shape) * cin * cout
    return int(round(total))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class CostModel:
    """Analytic cost of any unit mask over a GroupIndex (built once per network)."""

    base_macs: float
    base_params: float
    # per conv/linear layer
    coef: torch.Tensor  # MACs per (in, out) channel pair
    wcoef: torch.Tensor  # weight parameters per (in, out) channel pair
    bias: torch.Tensor  # 1 if the layer has a bias (parameters per out channel)
    cin: torch.Tensor
    cout: torch.Tensor
    depthwise: torch.Tensor  # bool: cost scales with out channels only
    a_in: torch.Tensor  # [layers, units]: how many input channels each unit removes
    a_out: torch.Tensor  # [layers, units]
    # per-channel parameters of other modules (BatchNorm, PReLU...) per unit
    other_params_per_unit: torch.Tensor  # [units]
    num_units: int
    layer_names: list[str] = field(default_factory=list)  # the rows of coef, a_in, a_out
    # milliseconds on a backend (prune.latency.LatencyModel), attached for a latency target
    latency: Any = None

    @classmethod
    def build(cls, model: nn.Module, index: GroupIndex, example_input: torch.Tensor) -> CostModel:
        shapes = _layer_shapes(model, example_input)
        names = list(shapes)
        row = {n: i for i, n in enumerate(names)}
        offsets = index.offsets()
        units = index.num_units
        a_in = torch.zeros(len(names), units)
        a_out = torch.zeros(len(names), units)
        other = torch.zeros(units)
        coef, wcoef, bias, cin, cout, dw = [], [], [], [], [], []
        for n in names:
            m = model.get_submodule(n)
            conv = isinstance(m, _CONV)
            ci = m.in_channels if conv else m.in_features
            co = m.out_channels if conv else m.out_features
            is_dw = conv and m.groups > 1 and m.groups == ci == co
            coef.append(_macs_per_channel_pair(m, shapes[n]) * (m.groups if is_dw else 1))
            kernel = m.weight[0, 0].numel() if conv else 1
            # weight is [out, in/groups, *kernel]: per (in, out) pair kernel/groups; depthwise: kernel per channel
            wcoef.append(float(kernel) if is_dw else kernel / (m.groups if conv else 1))
            bias.append(1.0 if m.bias is not None else 0.0)
            cin.append(ci)
            cout.append(co)
            dw.append(is_dw)
        seen: set[tuple[str, str, int]] = set()
        for gpos, group in enumerate(index.groups):
            base = offsets[gpos]
            for member in group.members:
                m = model.get_submodule(member.module)
                for i, r in zip(member.idxs, member.root_idxs):
                    key = (member.module, member.role, i)
                    if key in seen:
                        continue
                    seen.add(key)
                    if member.module in row:
                        target = a_out if member.role == "out" else a_in
                        target[row[member.module], base + r] += 1
                    elif member.role == "out":
                        per_channel = sum(p.numel() for p in m.parameters(recurse=False))
                        channels = _channels_of(m)
                        if channels:
                            other[base + r] += per_channel / channels
        cost = cls(
            base_macs=0.0,
            base_params=float(count_params(model)),
            coef=torch.tensor(coef, dtype=torch.float64),
            wcoef=torch.tensor(wcoef, dtype=torch.float64),
            bias=torch.tensor(bias, dtype=torch.float64),
            cin=torch.tensor(cin, dtype=torch.float64),
            cout=torch.tensor(cout, dtype=torch.float64),
            depthwise=torch.tensor(dw),
            a_in=a_in.double(),
            a_out=a_out.double(),
            other_params_per_unit=other.double(),
            num_units=units,
            layer_names=names,
        )
        cost.base_macs = cost.macs(torch.ones(units))
        return cost

    def _kept(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        removed = 1.0 - keep.double()
        return self.cin - self.a_in @ removed, self.cout - self.a_out @ removed

    def macs(self, keep: torch.Tensor) -> float:
        kin, kout = self._kept(keep)
        per_layer = torch.where(self.depthwise, self.coef * kout, self.coef * kin * kout)
        return float(per_layer.sum())

    def unit_macs(self) -> torch.Tensor:
        """MACs one unit removes from the unpruned network (a depthwise layer it reaches as input,
        output or both: one channel of it): the FLOPs a latency ranking sets against milliseconds.
        First order: a unit that is both an input and an output channel of one ordinary layer
        is counted cin + cout times, where removing it saves cin + cout - 1."""
        dw = self.depthwise
        per_in = torch.where(dw, self.coef, self.coef * self.cout)
        per_out = torch.where(dw, torch.zeros_like(self.coef), self.coef * self.cin)
        a_in = torch.where(dw[:, None], torch.maximum(self.a_in, self.a_out), self.a_in)
        a_out = torch.where(dw[:, None], torch.zeros_like(self.a_out), self.a_out)
        return a_in.T @ per_in + a_out.T @ per_out

    def params(self, keep: torch.Tensor) -> float:
        kin, kout = self._kept(keep)
        full_w = torch.where(self.depthwise, self.wcoef * self.cout, self.wcoef * self.cin * self.cout).sum()
        kept_w = torch.where(self.depthwise, self.wcoef * kout, self.wcoef * kin * kout).sum()
        removed_bias = (self.bias * (self.cout - kout)).sum()
        removed_other = (self.other_params_per_unit * (1.0 - keep.double())).sum()
        return float(self.base_params - (full_w - kept_w) - removed_bias - removed_other)

    def metric(self, name: str, keep: torch.Tensor) -> float:
        if name == "flops":
            return self.macs(keep)
        if name == "params":
            return self.params(keep)
        if name == "units":
            return float(keep.double().sum())
        if name == "latency":
            return self._latency().predict(keep)
        raise ValueError(name)

    def _latency(self):
        if self.latency is None:
            raise ValueError("no latency model attached (a latency target builds one: prune.latency)")
        return self.latency

    def base(self, name: str) -> float:
        if name == "latency":
            return self._latency().base_ms
        return {"flops": self.base_macs, "params": self.base_params, "units": float(self.num_units)}[name]


def _channels_of(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_parameters", "normalized_shape"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
        if isinstance(value, tuple) and value:
            return int(value[0])
    return None
