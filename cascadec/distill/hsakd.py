"""HSAKD: hierarchical self-supervised augmented distillation (Yang et al., IJCAI 2021).

docs/paper.md, "Related methods". Every batch is shown in its four rotations (0, 90, 180, 270
degrees). An auxiliary classifier after every stage (``hints.stage_points``) predicts the
joint label (class x rotation, 4K outputs). The distilling model matches

* the final outputs of its teacher on all four rotations (tau^2 KL, averaged over the 4B
  images: "KL on final outputs averaged over rotations"), and
* the teacher's auxiliary distributions at every stage (tau^2 KL),

and the cross-entropy on the class label is taken on the upright images only.

What is ours, and why:

* The pretrained teacher's heads are trained once on its frozen features (joint-label
  cross-entropy) and cached beside the teacher (``$CASCADEC_CACHE/hsakd``), keyed by the
  teacher's weights: the teacher itself is never changed. A pruned model's heads start as
  copies of the heads of the model it distils from and are trained with it.
* Heads normalise with GroupNorm, not BatchNorm: a TA's heads teach in eval mode and a
  checkpoint need only carry their parameters.
* Heads live beside the network, never in it (``AuxNetwork`` wraps it for training): the
  exported graph and the parity gate see the plain network.
* BatchNorm statistics are estimated on rotated batches too (``Rotated``): the network was
  trained on that mixture, so its running statistics should describe the same mixture.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from cascadec.data.sampler import position
from cascadec.distill.hints import FeatureTap, feature_shapes, stage_points
from cascadec.distill.losses import kd_kl
from cascadec.errors import UserError, first_line
from cascadec.fileio import replacing
from cascadec.progress import Status, log

ROTATIONS = 4


def rotate_batch(images: torch.Tensor) -> torch.Tensor:
    """[x, rot90(x), rot180(x), rot270(x)] stacked along the batch (rotation-major)."""
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])


def joint_labels(labels: torch.Tensor) -> torch.Tensor:
    """The (class, rotation) label of every image of ``rotate_batch``: rotation k of class y is
    y * 4 + k."""
    return torch.cat([labels * ROTATIONS + k for k in range(ROTATIONS)])


class Rotated(nn.Module):
    """``network`` run on the four rotations of its input (for BatchNorm recalibration)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.train(network.training)  # callers restore the wrapper's mode: it must be the network's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(rotate_batch(images))


def aux_head(channels: int, spatial: tuple[int, int], classes: int) -> nn.Sequential:
    """A small copy of what follows the stage, as HSAKD's heads are: 3x3 convs that halve the
    map and double the width while it is 8x8 or more, one more 3x3 conv at the final size, each
    with GroupNorm (no running statistics: the same in train and eval mode) and ReLU; then a
    global pool and a linear layer to the 4K joint classes."""
    layers: list[nn.Module] = []
    width, size = channels, min(spatial)
    while True:
        stride = 2 if size >= 8 else 1
        out = 2 * width if stride == 2 else width
        layers += [
            nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(math.gcd(8, out), out),
            nn.ReLU(inplace=True),
        ]
        width = out
        if stride == 1:
            break
        size = (size + 1) // 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes * ROTATIONS))


def make_heads(model: nn.Module, points: list[str], example: torch.Tensor, classes: int) -> nn.ModuleList:
    shapes = feature_shapes(model, points, example)
    heads = nn.ModuleList(aux_head(shapes[p][0], shapes[p][1:], classes) for p in points)
    return heads.to(example.device)


def aux_logits(heads: nn.ModuleList, features: dict[str, torch.Tensor], points: list[str]) -> list[torch.Tensor]:
    return [head(features[p].float()) for head, p in zip(heads, points)]


class AuxNetwork(nn.Module):
    """A network and its auxiliary heads, run on the four rotations of each batch: returns the
    network's 4B logits and keeps the heads' outputs in ``aux``. The network is the caller's
    module (its hooks, masks and parameters are the ones trained); ``remove`` drops the tap."""

    def __init__(self, network: nn.Module, heads: nn.ModuleList, points: list[str]) -> None:
        super().__init__()
        self.network, self.heads, self.points = network, heads, points
        self.aux: list[torch.Tensor] = []
        self._tap = FeatureTap(network, points)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network(rotate_batch(images))
        self.aux = aux_logits(self.heads, self._tap.features, self.points)
        return logits

    def remove(self) -> None:
        self._tap.remove()


@dataclass
class HsakdWeights:
    """CE on upright images x ce, final-output KL on all rotations x kd, stage KL x aux."""

    ce: float = 1.0
    kd: float = 0.4
    aux: float = 1.0
    temperature: float = 15.0


def hsakd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    aux: list[torch.Tensor],
    teacher_aux: list[torch.Tensor],
    weights: HsakdWeights,
) -> torch.Tensor:
    """HSAKD's student loss on a ``rotate_batch`` of ``labels.size(0)`` upright images."""
    upright = labels.size(0)
    loss = weights.ce * F.cross_entropy(logits[:upright], labels)
    loss = loss + weights.kd * kd_kl(logits, teacher_logits, weights.temperature)
    for s, t in zip(aux, teacher_aux):
        loss = loss + weights.aux * kd_kl(s, t, weights.temperature)
    return loss


class HsakdLoss:
    """The student phase's loss: ``train_epoch`` runs ``student`` and ``teacher`` (both
    ``AuxNetwork``) and hands over their logits; the auxiliary outputs are read from them."""

    def __init__(self, student: AuxNetwork, teacher: AuxNetwork, weights: HsakdWeights) -> None:
        self.student, self.teacher, self.weights = student, teacher, weights

    def __call__(self, logits, labels, teacher_logits=None) -> torch.Tensor:
        if teacher_logits is None:
            raise UserError("distill.method: hsakd distils from a teacher; it needs distill.kd: true")
        return hsakd_loss(logits, labels, teacher_logits, self.student.aux, self.teacher.aux, self.weights)


@dataclass
class HsakdSpec:
    """What ``distill.method: hsakd`` resolves to for one network: its stage points, the
    pretrained teacher's trained heads, the loss weights and the class count."""

    points: list[str]
    teacher_heads: nn.ModuleList
    weights: HsakdWeights
    classes: int
    report: dict


def check_square(example: torch.Tensor) -> None:
    if example.dim() != 4 or example.shape[-1] != example.shape[-2]:
        raise UserError(
            f"distill.method: hsakd rotates images by 90 degrees and needs square inputs; got shape "
            f"{tuple(example.shape)}"
        )


def fingerprint(model: nn.Module) -> str:
    """A hash of the teacher's weights and buffers: heads trained on other weights never load."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train_heads(
    teacher: nn.Module,
    heads: nn.ModuleList,
    points: list[str],
    loader: DataLoader,
    *,
    classes: int,
    epochs: int,
    lr: float,
    device: torch.device,
    max_steps: int | None = None,
) -> dict:
    """Joint-label cross-entropy of ``heads`` on the frozen teacher's stage features; returns
    each head's joint accuracy over the last epoch and the seconds spent. The global random
    state is left as it was: a run must not depend on whether the heads came from the cache."""
    del classes  # the joint labels need only the rotation count
    tap = FeatureTap(teacher, points)
    teacher.eval()
    opt = torch.optim.SGD(list(heads.parameters()), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = min(len(loader), max_steps) if max_steps else len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps))
    start = time.perf_counter()
    heads.train()
    correct, seen = [0] * len(points), 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for epoch in range(epochs):
                position(loader, epoch, "heads")
                correct, seen = [0] * len(points), 0
                with Status(f"HSAKD teacher heads, epoch {epoch}", steps) as status:
                    for step, (images, labels) in enumerate(loader):
                        if step >= steps:
                            break
                        images, labels = images.to(device), labels.to(device)
                        with torch.no_grad():
                            teacher(rotate_batch(images))
                        target = joint_labels(labels)
                        outs = aux_logits(heads, tap.features, points)
                        loss = sum(F.cross_entropy(o, target) for o in outs)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        for i, o in enumerate(outs):
                            correct[i] += int((o.argmax(1) == target).sum())
                        seen += target.numel()
                        status.advance(f"loss {loss.item():.3f}")
    finally:
        tap.remove()
    heads.eval()
    return {"joint_accuracy": [c / max(seen, 1) for c in correct], "seconds": time.perf_counter() - start}


def _cache_file(cache: Path, teacher: nn.Module, points: list[str], classes: int, settings: dict) -> Path:
    key = json.dumps(
        {"teacher": fingerprint(teacher), "points": points, "classes": classes, "head": "follow-gn-v1", **settings},
        sort_keys=True,
    )
    return cache / f"heads-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def teacher_heads(
    teacher: nn.Module,
    example: torch.Tensor,
    loader: DataLoader,
    *,
    weights: HsakdWeights,
    epochs: int,
    lr: float,
    data: dict,
    device: torch.device,
    cache: Path | None,
    max_steps: int | None = None,
    write_cache: bool = True,
) -> HsakdSpec:
    """The teacher's stage points and trained heads, from the cache when it holds heads trained
    on these very teacher weights and data settings, else trained here (and cached, unless
    ``write_cache`` is off: a distributed run stores rank 0's heads once they are shared)."""
    check_square(example)
    points = stage_points(teacher, example)
    if not points:
        raise UserError(f"distill.method: hsakd: found no stage in {type(teacher).__name__} (no 4-D feature maps)")
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        classes = int(teacher(example.to(device)).shape[1])
    teacher.train(was_training)
    heads = make_heads(teacher, points, example.to(device), classes)
    settings = {"epochs": epochs, "lr": lr, "data": data, "max_steps": max_steps}
    path = _cache_file(cache, teacher, points, classes, settings) if cache is not None else None
    report: dict = {"points": points, "classes": classes, "cache_path": str(path) if path is not None else None}
    if path is not None and path.is_file():
        try:
            heads.load_state_dict(load_file(str(path), device=str(device)))
            log(f"HSAKD: teacher heads loaded from cache {path}")
            return HsakdSpec(points, heads.eval(), weights, classes, {**report, "source": f"cache {path}"})
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            log(f"HSAKD: cache {path} is damaged ({first_line(exc)}); training the heads again")
    log(f"HSAKD: training auxiliary heads on the teacher's {len(points)} stages ({', '.join(points)})")
    trained = train_heads(
        teacher, heads, points, loader, classes=classes, epochs=epochs, lr=lr, device=device, max_steps=max_steps
    )
    shown = ", ".join(f"{a:.3f}" for a in trained["joint_accuracy"])
    log(f"HSAKD: teacher heads trained in {trained['seconds']:.1f} s; joint (class x rotation) accuracy {shown}")
    report.update(trained, source="trained")
    spec = HsakdSpec(points, heads.eval(), weights, classes, report)
    if write_cache:
        store_heads(spec)
    return spec


def store_heads(spec: HsakdSpec) -> None:
    """Write freshly trained teacher heads to their cache entry (atomically); a cache that
    cannot be written is skipped with a line saying so."""
    path = spec.report.get("cache_path")
    if path is None or spec.report.get("source") != "trained":
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in spec.teacher_heads.state_dict().items()}, str(tmp))
    except OSError:
        log(f"HSAKD: could not write cache {path}; continuing")


def student_heads(heads: nn.ModuleList) -> nn.ModuleList:
    """A trainable copy of a teacher's heads: where a pruned model's heads start."""
    clone = copy.deepcopy(heads).train()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def frozen_heads(heads: nn.ModuleList) -> nn.ModuleList:
    clone = copy.deepcopy(heads).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone
