"""Feature hints: intermediate supervision beside the output KD.

Two kinds, one mechanism (``distill.hints``):

* ``stages`` - stage-wise supervision (Zhang & Ou 2020, docs/paper.md "Related methods"): the
  network is cut where its spatial resolution changes; the output of every stage of a pruned
  model is pulled towards the same stage of the *unpruned* pretrained network (in-place
  distillation), through a 1x1 adapter per stage initialised to the identity (the pruned
  model's zeroed channels cannot reproduce the full network's, a mix of its kept ones can).
  The loss per stage is normalised by the teacher feature's energy so stages compare.
* ``paper`` - the paper's own L2 hints (docs/paper.md "Losses": last 3 residual blocks, lambda_H
  0.001): each model's block outputs against those of the model it distils from, no adapter.
  The thesis ablation found them harmful; they are here so that claim can be measured.

Adapters live beside the network, never in it: they are trained with the student and dropped
at export (the exported graph and the parity gate see the plain network).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cascadec.errors import UserError
from cascadec.prune.cost import output_shapes

PAPER_BLOCKS = 3
DEFAULT_WEIGHTS = {"stages": 1.0, "paper": 0.001}  # paper: lambda_H (docs/paper.md, Losses)


@dataclass
class HintSpec:
    """What ``distill.hints`` resolves to for one network: the kind, the tapped modules, the
    weight, and an input to size the adapters with."""

    kind: str
    points: list[str]
    weight: float
    example: torch.Tensor


def hint_spec(kind: str, weight: float | None, model: nn.Module, example_input: torch.Tensor) -> HintSpec | None:
    if kind == "none":
        return None
    points = stage_points(model, example_input) if kind == "stages" else block_points(model, example_input)
    if not points:
        raise UserError(f"distill.hints: {kind}: found no stage in {type(model).__name__} (no 4-D feature maps)")
    return HintSpec(kind, points, DEFAULT_WEIGHTS[kind] if weight is None else weight, example_input)


def _resolutions(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int] | None]:
    """Spatial size of every module's (last) 4-D output on ``example_input``; None: not 4-D."""
    shapes = output_shapes(model, example_input, last=True)
    return {n: tuple(s[-2:]) if s is not None and len(s) == 4 else None for n, s in shapes.items()}


def _stage_children(model: nn.Module, prefix: str, sizes: dict) -> list[tuple[str, tuple[int, int]]]:
    """Children in call order with their output size, a child whose inside spans several
    resolutions (MobileNet's ``features``) replaced by its own children."""
    out = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if full not in sizes:
            continue
        # only the children's outputs count: a downsampling block changes resolution inside itself
        inner = {sizes.get(f"{full}.{n}") for n, _ in child.named_children()} - {None}
        if len(inner) > 1:
            out += _stage_children(child, f"{full}.", sizes)
        elif sizes[full] is not None:
            out.append((full, sizes[full]))
    return out


def stage_points(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Modules whose output ends a stage: the last one at each spatial resolution (1x1 maps,
    i.e. pooled features, excluded)."""
    sizes = _resolutions(model, example_input)
    children = [(n, s) for n, s in _stage_children(model, "", sizes) if s[0] * s[1] > 1]
    points = []
    for i, (name, size) in enumerate(children):
        if i + 1 == len(children) or children[i + 1][1] != size:
            points.append(name)
    return points


def block_points(model: nn.Module, example_input: torch.Tensor, count: int = PAPER_BLOCKS) -> list[str]:
    """The last ``count`` blocks: children of the stage containers (ResNet's ``layer4.0..2``),
    the stages themselves where they have none."""
    blocks = []
    for point in stage_points(model, example_input):
        module = model.get_submodule(point)
        kids = [f"{point}.{n}" for n, _ in module.named_children()]
        blocks += kids if isinstance(module, nn.Sequential) and kids else [point]
    return blocks[-count:]


class FeatureTap:
    """Keeps the outputs of ``points`` of one network from its latest forward pass."""

    def __init__(self, model: nn.Module, points: list[str]) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.inputs: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._input)]
        for p in points:
            self._handles.append(model.get_submodule(p).register_forward_hook(self._keep(p)))

    def _input(self, _m, inputs) -> None:
        self.features = {}
        self.inputs = inputs[0]

    def _keep(self, point: str):
        def hook(_m, _i, out) -> None:
            self.features[point] = out

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def feature_shapes(model: nn.Module, points: list[str], example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """(channels, height, width) of each point's output on ``example_input`` (eval mode)."""
    tap = FeatureTap(model, points)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
        return {p: tuple(tap.features[p].shape[1:]) for p in points}
    finally:
        model.train(was_training)
        tap.remove()


def identity_adapters(model: nn.Module, points: list[str], example_input: torch.Tensor) -> nn.ModuleDict:
    """A 1x1 conv per stage, channels -> channels, starting as the identity."""
    widths = {p: shape[0] for p, shape in feature_shapes(model, points, example_input).items()}
    adapters = nn.ModuleDict()
    for i, p in enumerate(points):
        conv = nn.Conv2d(widths[p], widths[p], 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(widths[p]).view(widths[p], widths[p], 1, 1))
        adapters[str(i)] = conv
    return adapters.to(example_input.device)


def hint_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    points: list[str],
    adapters: nn.ModuleDict | None,
) -> torch.Tensor:
    """Sum over points of the (adapted) student feature's squared error to the teacher's; with
    adapters (stage hints) each term is divided by the teacher feature's mean square."""
    total = torch.zeros((), device=next(iter(student.values())).device)
    for i, p in enumerate(points):
        s, t = student[p].float(), teacher[p].detach().float()
        if adapters is not None:
            s = adapters[str(i)](s)
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
        else:
            total = total + F.mse_loss(s, t)
    return total


class HintedLoss:
    """A student-phase loss with hints: ``base(logits, labels, teacher_logits)`` plus ``weight`` x
    the hint loss between the student's tapped features and ``hint_teacher``'s on the same images
    (run here, under no_grad, unless its tap already saw this batch)."""

    def __init__(
        self,
        base: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        student: nn.Module,
        hint_teacher: nn.Module,
        points: list[str],
        adapters: nn.ModuleDict | None,
        weight: float,
    ) -> None:
        self.base, self.points, self.adapters, self.weight = base, points, adapters, weight
        self.hint_teacher = hint_teacher
        self.student_tap = FeatureTap(student, points)
        self.teacher_tap = FeatureTap(hint_teacher, points)

    def __call__(self, logits, labels, teacher_logits=None) -> torch.Tensor:
        loss = self.base(logits, labels, teacher_logits)
        images = self.student_tap.inputs
        if self.teacher_tap.inputs is not images:  # the KD teacher is another model: run this one
            with torch.no_grad():
                self.hint_teacher(images)
        total = loss + self.weight * hint_loss(
            self.student_tap.features, self.teacher_tap.features, self.points, self.adapters
        )
        self.teacher_tap.inputs = None  # consumed: the next batch needs the teacher's pass again
        return total

    def remove(self) -> None:
        self.student_tap.remove()
        self.teacher_tap.remove()
