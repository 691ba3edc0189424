"""FBS: feature boosting and suppression, dynamic channel gating (Gao et al., ICLR 2019).

docs/paper.md, "Related methods". Every gated convolution gets a saliency predictor,
s = ReLU(W . GAP(x) + b) on the convolution's *input* x, and keeps the top k = ceil(d * C)
output channels per image, each scaled by its saliency (winner-take-all): the output is
BN(conv(x)) * wta_k(s). Nothing is removed: the network keeps every parameter, and the
arithmetic saved (the suppressed output channels, and the zero input channels they leave to
the next convolution) is saved only where a runtime skips channels per image. ONNX Runtime
and TensorRT compute dense convolutions: there the gated network is *slower* than the
teacher (the gates cost a little). ``effective_macs`` measures what a channel-skipping
runtime would compute, image by image; the profile stage measures what the backends do.

What is ours, and why:

* Gates sit on convolutions followed by a BatchNorm (found by tracing the network with
  torch.fx), except those reading the network's input (FBS keeps the first layer dense) and
  grouped/depthwise ones (their channels are tied to their input's).
* Gates start as a static choice close to the identity: W = 0 and b = 1 + a small term
  ranking the channels by |gamma| of their BatchNorm (distinct for every channel), so at step
  0 every image keeps the same channels at scale ~1 and the saliency learns to depend on the
  image from there.
* A discrete choice is discontinuous: two saliencies within rounding error of each other at
  the k-th place can be ordered differently by two backends, and that image's output then
  differs by a whole channel. The parity gate reports it as it would any other mismatch.
* The winner-take-all is TopK + ScatterElements: exactly k channels are selected per image
  (ties broken by the sort), in ONNX as in PyTorch; a selected channel whose saliency is 0
  is selected but computes nothing, which ``effective_macs`` counts as skipped.
* No lasso term on the saliencies (FBS adds one to sparsify further); the keep ratio alone
  sets the budget.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cascadec.errors import UserError, first_line
from cascadec.progress import Status, log
from cascadec.prune.cost import CostModel, count_macs
from cascadec.prune.groups import build_groups
from cascadec.prune.importance import l1_importance
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.prune.trial import prove_groups
from cascadec.train.bn import BATCHNORMS


class SaliencyGate(nn.Module):
    """g(x) = wta_k(ReLU(W . GAP(x) + b)): per image, the top k saliencies, the rest 0."""

    def __init__(self, in_channels: int, out_channels: int, keep: float) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        self.k = kept_channels(out_channels, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saliency = F.relu(self.fc(x.mean(dim=(2, 3))))
        top = torch.topk(saliency, self.k, dim=1)
        return torch.zeros_like(saliency).scatter(1, top.indices, top.values)


def kept_channels(channels: int, keep: float) -> int:
    return max(1, min(channels, math.ceil(keep * channels - 1e-9)))


class GatedConv(nn.Module):
    """conv -> BN -> x gate(input): the BatchNorm moves in here (its old place becomes an
    Identity) so that the gate scales the normalised output, as FBS does."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, keep: float) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm
        self.gate = SaliencyGate(conv.in_channels, conv.out_channels, keep)
        self.last_gate: torch.Tensor | None = None  # kept for effective_macs when recording
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        if self.recording:
            self.last_gate = g.detach()
        return self.norm(self.conv(x)) * g[:, :, None, None]


def gate_points(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names of every convolution FBS gates (see the module doc)."""
    try:
        graph = fx.symbolic_trace(copy.deepcopy(model).cpu()).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not supported"
        raise UserError(
            f"prune.method: fbs needs a network torch.fx can trace ({type(model).__name__}: {first_line(exc)})"
        ) from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        conv = modules[node.target]
        if conv.groups != 1 or any(a.op == "placeholder" for a in node.args if isinstance(a, fx.Node)):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), BATCHNORMS):
            pairs.append((str(node.target), str(users[0].target)))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _gamma_rank(norm: nn.Module, channels: int) -> torch.Tensor:
    """Each channel's place in the |gamma| order, in [0, 1), all distinct: equal saliencies
    would leave the choice to each runtime's TopK tie-breaking, and PyTorch and ONNX Runtime
    break ties differently (the parity gate caught it)."""
    gamma = norm.weight.detach().abs().cpu() if getattr(norm, "weight", None) is not None else torch.zeros(channels)
    order = torch.argsort(gamma, stable=True)
    rank = torch.empty(channels)
    rank[order] = torch.arange(channels, dtype=torch.float32) / channels
    return rank


def install_gates(model: nn.Module, pairs: list[tuple[str, str]], keep: float, *, initialise: bool = True) -> None:
    """Replace each (conv, bn) pair by a GatedConv in place; ``initialise`` sets the gates to
    the near-identity start (off when weights are loaded afterwards)."""
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        gated = GatedConv(conv, norm, keep).to(conv.weight.device)
        if initialise:
            with torch.no_grad():
                gated.gate.fc.weight.zero_()
                gated.gate.fc.bias.copy_(1.0 + 0.01 * _gamma_rank(norm, conv.out_channels).to(gated.gate.fc.bias))
        _set(model, norm_name, nn.Identity())
        _set(model, conv_name, gated)


def gated_layers(model: nn.Module) -> list[GatedConv]:
    return [m for m in model.modules() if isinstance(m, GatedConv)]


@dataclass
class EffectiveMacs:
    """What a runtime that skips channels per image would compute, averaged over images."""

    images: int = 0
    dense: float = 0.0  # MACs of the same network with every channel computed (gates included)
    effective_sum: float = 0.0
    per_layer: dict = field(default_factory=dict)

    @property
    def effective(self) -> float:
        return self.effective_sum / max(self.images, 1)

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "dense_macs": self.dense,
            "effective_macs": self.effective,
            "effective_fraction": self.effective / self.dense if self.dense else None,
        }


@torch.no_grad()
def effective_macs(model: nn.Module, loader: DataLoader, *, device: torch.device, limit: int | None = None) -> dict:
    """Per image: a convolution computes its selected output channels (all of them when it has
    no gate; a selected channel with saliency 0 is skipped too) from its input channels that
    are not all zero; linear layers and the gates' own layers are counted dense."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    gates = {id(g.conv): g for g in gated_layers(model)}
    seen: dict[str, torch.Tensor] = {}
    dense: dict[str, float] = {}

    def hook(name: str, module: nn.Module):
        def run(_m, inputs, output) -> None:
            x = inputs[0]
            if isinstance(module, nn.Linear):
                per_image = float(module.in_features * module.out_features)
                seen[name] = torch.full((x.shape[0],), per_image, device=x.device)
                dense[name] = per_image
                return
            spatial = output.shape[2] * output.shape[3] * module.kernel_size[0] * module.kernel_size[1]
            live_in = (x.flatten(2).abs().amax(2) > 0).sum(1).float()  # input channels not all zero
            gate = gates.get(id(module))
            live_out = (
                (gate.last_gate > 0).sum(1).float()
                if gate is not None
                else torch.full_like(live_in, float(module.out_channels))
            )
            seen[name] = live_in * live_out * spatial / module.groups
            dense[name] = float(module.in_channels * module.out_channels * spatial / module.groups)

        return run

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers]
    for g in gates.values():
        g.recording = True
    was_training = model.training
    model.eval()
    result = EffectiveMacs()
    try:
        with Status("FBS effective MACs", len(loader) if limit is None else min(limit, len(loader))) as status:
            for step, (images, _) in enumerate(loader):
                if limit is not None and step >= limit:
                    break
                seen.clear()
                model(images.to(device))
                result.effective_sum += float(sum(v.sum() for v in seen.values()))
                result.images += images.shape[0]
                status.advance()
    finally:
        for h in handles:
            h.remove()
        for g in gates.values():
            g.recording, g.last_gate = False, None
        model.train(was_training)
    result.dense = float(sum(dense.values()))
    return result.as_dict()


def gated_student(teacher: nn.Module, keep: float) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of the teacher with FBS gates at its gate points."""
    pairs = gate_points(teacher)
    if not pairs:
        raise UserError(f"prune.method: fbs found no convolution followed by a BatchNorm in {type(teacher).__name__}")
    student = copy.deepcopy(teacher)
    install_gates(student, pairs, keep)
    return student, pairs


def static_equivalent(teacher: nn.Module, example: torch.Tensor, macs: float) -> nn.Module:
    """A statically pruned copy of the teacher (global L1 widths) with ``macs`` MACs per image:
    what the FBS network is compared with on dense runtimes. Untrained: for latency only."""
    model = copy.deepcopy(teacher).cpu().eval()
    example = example.cpu()
    index = prove_groups(model, build_groups(model, example), example)  # only groups whose pruning is exact
    cost = CostModel.build(model, index, example)
    reduction = min(max(1.0 - macs / count_macs(model, example), 0.0), 0.99)
    budget = Budget.from_target(cost, flops_reduction=reduction)
    return shrink(model, index, MaskSolver(index, cost).solve(l1_importance(model, index), budget), example)


def describe(pairs: list[tuple[str, str]], keep: float, seconds: float) -> dict:
    return {"keep": keep, "gated": [list(p) for p in pairs], "seconds": seconds}


def build_started(teacher: nn.Module, keep: float) -> tuple[nn.Module, dict]:
    start = time.perf_counter()
    student, pairs = gated_student(teacher, keep)
    log(f"FBS: {len(pairs)} convolutions gated, keeping ceil({keep:g} x C) output channels per image")
    return student, describe(pairs, keep, time.perf_counter() - start)
