"""Pruning compensation (Xie et al. 2021; docs/paper.md, Related methods): refit the weights that
read a pruned group so they reproduce, from the channels that stay, what the removed ones gave.

For a consumer layer y = W x + b whose inputs x split into kept dims S and removed dims R, the
least-squares refit on input statistics (mean mu, covariance C = E[x x^T] - mu mu^T) is

    W_S' = W C_{:,S} (C_SS + lambda I)^-1        b' = b + W mu - W_S' mu_S

(docs/paper.md's closed form, with a ridge lambda so a rank-deficient C_SS cannot blow the solve up).
A conv is a linear layer on its unfolded patches (dims = in_channel x kh x kw), so a removed
input channel is a block of kh*kw dims. The same statistics give CaP's criterion: the output
error that remains when a block b is removed *after* compensation is the OBS term
W_b [(C_SS)^-1]_bb^-1 W_b^T (prune/cap.py).

Statistics are gathered in one pass over calibration images, on the unpruned network, with
running sums in float64. Every consumer of a pruned group is compensated: in a residual stage
that is each block's first conv, the downsample conv and the classifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cascadec.progress import log
from cascadec.prune.groups import GroupIndex

# sample this many patch positions per image and batch: the covariance needs many more rows
# than dims, not every position of every image (a 56x56 map gives 3,136 nearly repeated rows)
POSITIONS_PER_IMAGE = 64
# a layer with more input dims is not refitted: its float64 covariance alone would take
# dims^2 x 8 bytes (VGG's first classifier layer reads 25,088 = 5 GB); 8,192 dims = 512 MiB
MAX_DIMS = 8192
_UNFOLD_BYTES = 256 * 2**20  # unfold a batch in chunks of images below this size


@dataclass
class Consumer:
    """A conv/linear layer that reads pruned channels; ``unit_dims[u]`` are the dims of its
    (unfolded) input that unit ``u`` (flat index over all groups) feeds."""

    name: str  # the layer is looked up by name in whichever copy of the network is at hand
    dims: int
    unit_dims: dict[int, list[int]] = field(default_factory=dict)


def _input_dims(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    kh, kw = module.kernel_size
    return module.in_channels * kh * kw


def compensable(module: nn.Module) -> bool:
    """Plain dense convs and linear layers: a grouped or depthwise conv's output channel sees only
    its own group's inputs (nothing to refit from), and subclasses may compute their weight
    (weight standardisation) so the stored one is not the one applied."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def find_consumers(model: nn.Module, index: GroupIndex) -> list[Consumer]:
    """Every compensable layer that reads a prunable group, with the input dims of each unit
    (layers with more than ``MAX_DIMS`` input dims are left as they are, and logged)."""
    consumers: dict[str, Consumer] = {}
    too_wide: set[str] = set()
    for group, offset in zip(index.groups, index.offsets()):
        unit_of_root: dict[int, int] = (
            {r: u for u, roots in enumerate(group.root_units) for r in roots} if group.root_units is not None else {}
        )
        for member in group.members:
            if member.role != "in":
                continue
            module = model.get_submodule(member.module)
            if not compensable(module):
                continue
            if _input_dims(module) > MAX_DIMS:
                too_wide.add(member.module)
                continue
            consumer = consumers.setdefault(member.module, Consumer(member.module, _input_dims(module)))
            span = 1 if isinstance(module, nn.Linear) else module.kernel_size[0] * module.kernel_size[1]
            for idx, root in zip(member.idxs, member.root_idxs):
                unit = offset + unit_of_root.get(root, root)
                consumer.unit_dims.setdefault(unit, []).extend(range(idx * span, (idx + 1) * span))
    for c in consumers.values():
        for u in c.unit_dims:
            c.unit_dims[u] = sorted(set(c.unit_dims[u]))
    if too_wide:
        log(
            f"compensation: {', '.join(sorted(too_wide))} not refitted: more than {MAX_DIMS} input dims "
            "(the covariance would not fit in memory)"
        )
    return list(consumers.values())


class InputStatistics:
    """Running float64 sums of a consumer's input rows: enough for mean and covariance."""

    def __init__(self, dims: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dims, dtype=torch.float64)
        self.outer = torch.zeros(dims, dims, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        # one batch's products in float32 (a few thousand rows), the running sums in float64
        rows = rows.detach().float()
        self.n += rows.shape[0]
        self.sum += rows.sum(0, dtype=torch.float64).cpu()
        self.outer += (rows.T @ rows).cpu().double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def covariance(self) -> torch.Tensor:
        mu = self.mean
        cov = self.outer / max(self.n, 1) - torch.outer(mu, mu)
        return (cov + cov.T) / 2


def _rows(module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """The rows (one per output position) a layer multiplies by its weight matrix."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1])
        return
    n, dims = x.shape[0], _input_dims(module)
    h, w = x.shape[-2:]
    chunk = max(1, _UNFOLD_BYTES // max(1, dims * h * w * x.element_size()))
    for start in range(0, n, chunk):
        patches = F.unfold(
            x[start : start + chunk],
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # [images, dims, positions]
        positions = patches.shape[-1]
        if positions > POSITIONS_PER_IMAGE:
            pick = torch.randperm(positions, generator=generator)[:POSITIONS_PER_IMAGE].to(patches.device)
            patches = patches[..., pick]
        yield patches.transpose(1, 2).reshape(-1, dims)


@torch.no_grad()
def gather_statistics(
    model: nn.Module, consumers: list[Consumer], batches: Iterable, device: torch.device, *, seed: int = 0
) -> dict[str, InputStatistics]:
    """One pass of ``model`` (eval mode, no masks) over ``batches``, summing each consumer's inputs."""
    stats = {c.name: InputStatistics(c.dims) for c in consumers}
    generator = torch.Generator().manual_seed(seed)
    handles = []
    for c in consumers:

        def hook(module, inputs, name=c.name):
            for rows in _rows(module, inputs[0], generator):
                stats[name].add(rows)

        handles.append(model.get_submodule(c.name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for images, _ in batches:
            model(images.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def removed_dims(consumer: Consumer, keep: torch.Tensor) -> list[int]:
    """Input dims of ``consumer`` that the flat unit mask ``keep`` removes."""
    flat = keep.detach().cpu()
    return sorted({d for u, dims in consumer.unit_dims.items() if flat[u] < 0.5 for d in dims})


def _regularised(cov_ss: torch.Tensor, ridge: float) -> torch.Tensor:
    """C_SS + lambda I with lambda = ridge x mean variance (never zero)."""
    scale = float(torch.diagonal(cov_ss).mean().clamp_min(1e-12))
    return cov_ss + (ridge * scale + 1e-12) * torch.eye(cov_ss.shape[0], dtype=cov_ss.dtype)


def ridge_solve(cov_ss: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C_SS + lambda I)^-1 rhs, in float64."""
    return torch.linalg.solve(_regularised(cov_ss, ridge), rhs)


def ridge_inverse(cov_ss: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C_SS + lambda I)^-1 by one Cholesky factorisation (it is symmetric positive definite;
    a general solve where rounding says otherwise)."""
    a = _regularised(cov_ss, ridge)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    return torch.linalg.solve(a, torch.eye(a.shape[0], dtype=a.dtype))


def refit(
    weight: torch.Tensor, stats: InputStatistics, removed: list[int], ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated weight matrix (removed columns zero) and the bias shift, for W [out, dims]."""
    w = weight.detach().to("cpu", torch.float64)
    dims = w.shape[1]
    gone = torch.zeros(dims, dtype=torch.bool)
    gone[removed] = True
    kept = torch.nonzero(~gone).flatten()
    cov, mu = stats.covariance, stats.mean
    new = torch.zeros_like(w)
    if len(kept):
        # W_S'^T = (C_SS + lambda I)^-1 C_{S,:} W^T
        new[:, kept] = ridge_solve(cov[kept][:, kept], cov[kept] @ w.T, ridge).T
    shift = w @ mu - new @ mu
    return new, shift


def _bias_target(layer: nn.Module, name: str, following: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    if layer.bias is not None:
        return "bias", layer
    bn = following.get(name)
    if bn is not None and bn.track_running_stats and bn.running_mean is not None:
        return "running_mean", bn
    return None


@torch.no_grad()
def batchnorm_after(model: nn.Module, consumers: list[Consumer], example_input: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm that reads each consumer's output directly (where a bias-free conv's mean
    shift goes: BN(y + d) with running mean m equals BN(y) with running mean m - d in eval)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so its id is not reused
    found: dict[str, nn.Module] = {}
    handles = []
    for c in consumers:
        handles.append(
            model.get_submodule(c.name).register_forward_hook(
                lambda m, i, out, name=c.name: produced.__setitem__(id(out), (name, out))
            )
        )
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def pre(m, inputs):
                hit = produced.get(id(inputs[0]))
                if hit is not None and hit[1] is inputs[0]:
                    found.setdefault(hit[0], m)

            handles.append(module.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


@torch.no_grad()
def compensate(
    model: nn.Module,
    consumers: list[Consumer],
    stats: dict[str, InputStatistics],
    keep: torch.Tensor,
    example_input: torch.Tensor,
    *,
    ridge: float,
) -> dict:
    """Refit every consumer of a removed unit in place (kept columns and the mean shift; removed
    columns are left as they were: the mask zeroes their inputs and shrink drops them)."""
    following = batchnorm_after(model, consumers, example_input)
    done, no_bias = [], []
    for c in consumers:
        removed = removed_dims(c, keep)
        if not removed:
            continue
        layer = model.get_submodule(c.name)
        weight = layer.weight
        matrix = weight.reshape(weight.shape[0], -1)
        new, shift = refit(matrix, stats[c.name], removed, ridge)
        kept = torch.ones(matrix.shape[1], dtype=torch.bool)
        kept[removed] = False
        updated = matrix.detach().to("cpu", torch.float64).clone()
        updated[:, kept] = new[:, kept]
        weight.copy_(updated.reshape(weight.shape).to(weight.dtype))
        target = _bias_target(layer, c.name, following)
        if target is None:
            no_bias.append(c.name)
        elif target[0] == "bias":
            target[1].bias.add_(shift.to(target[1].bias))
        else:
            target[1].running_mean.sub_(shift.to(target[1].running_mean))
        done.append(c.name)
    if no_bias:
        log(f"compensation: no bias or BatchNorm after {', '.join(no_bias)}: their mean shift is not corrected")
    return {"layers": done, "mean_not_corrected": no_bias, "ridge": ridge}
