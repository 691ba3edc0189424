"""Quantization-aware fine-tuning with KD, for students PTQ and the sensitivity pass leave short.

The student's BatchNorms are folded into their convolutions first (what ``quant_pre_process``
does to the graph PTQ quantizes), then every Conv/Linear that the INT8 graph quantizes gets
fake quantization at the same points: per-channel symmetric int8 weights (recomputed from the
weights each step) and a per-tensor activation range on its input, calibrated once on training
images as PTQ's ``max`` calibration does (unsigned asymmetric for the ONNX Runtime flavour,
signed symmetric for TensorRT's). ``torch.fake_quantize_per_*_affine`` are core ops with
straight-through gradients. The student then fine-tunes with KD from the teacher in the one
training loop (``train.loop.train_epoch``); the fake quantizers are removed and the fine-tuned
float weights go through the same PTQ export as before, so QAT and PTQ ship the same kinds of
file. Residual adds (quantized in the ONNX Runtime graph) are not modelled here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils.data import DataLoader

from cascadec.backends.onnx_export import export_onnx
from cascadec.data.bundle import DataBundle
from cascadec.distill.losses import DistillLoss
from cascadec.progress import log
from cascadec.quantize.flavours import Flavour
from cascadec.quantize.ptq import compute_nodes, prepare, quantize_int8
from cascadec.quantize.sensitivity import onnx_accuracy
from cascadec.recipe import QuantizeSection, Recipe
from cascadec.run import RunDir
from cascadec.train.loop import cosine_schedule, make_optimizer, train_epoch
from cascadec.train.runtime import Runtime

COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm that reads a Conv/Linear's output directly into that layer (in place;
    the BatchNorm becomes Identity), as ``quant_pre_process`` folds them in the graph PTQ
    quantizes. Pairs are found by running ``example`` once: a BatchNorm is folded only when its
    input is the very tensor a compute layer returned and no other BatchNorm reads that tensor.
    (A layer whose output also feeds something else would be changed for that reader too; the
    channel-pruned CNNs cascadec builds have none.) Returns how many were folded."""
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    feeds: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name, m in modules.items():
        if isinstance(m, COMPUTE):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: produced.__setitem__(id(o), name)))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):

            def pre(mod, inputs, name=name):
                src = produced.get(id(inputs[0]))
                if src is not None:
                    pairs[name] = src
                    feeds[src] = feeds.get(src, 0) + 1

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    folded = 0
    for bn_name, src in pairs.items():
        if feeds[src] != 1:
            continue
        layer, bn = modules[src], modules[bn_name]
        fused = fuse_linear_bn_eval(layer, bn) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, bn)
        fused.bias.requires_grad_(True)  # BatchNorm's shift lives here now: it trains (torch freezes a new bias)
        _set(model, src, fused)
        _set(model, bn_name, nn.Identity())
        folded += 1
    return folded


def _set(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class ActivationRange:
    low: float
    high: float

    def qparams(self, signed: bool) -> tuple[float, int, int, int]:
        """(scale, zero point, qmin, qmax) as ONNX Runtime's quantizer derives them."""
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        if signed:
            bound = max(abs(low), abs(high)) or 1e-8
            return bound / 127.0, 0, -128, 127
        scale = (high - low) / 255.0 or 1e-8
        return scale, int(round(-low / scale)), 0, 255


class FakeQuant:
    """Fake quantization hooks on a model's compute layers; ``remove()`` restores the float model."""

    def __init__(
        self, model: nn.Module, ranges: dict[str, ActivationRange], signed: bool, weight_levels: int = 127
    ) -> None:
        self.handles = []
        for name, m in model.named_modules():
            if name not in ranges:
                continue
            scale, zero, qmin, qmax = ranges[name].qparams(signed)
            self.handles.append(m.register_forward_pre_hook(_activation_hook(scale, zero, qmin, qmax)))
            self.handles.append(_WeightHandle(m, weight_levels))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _activation_hook(scale: float, zero: int, qmin: int, qmax: int):
    def hook(module, inputs):
        return (torch.fake_quantize_per_tensor_affine(inputs[0], scale, zero, qmin, qmax), *inputs[1:])

    return hook


class _WeightHandle:
    """Swaps the layer's weight for its per-channel int8 fake-quantized value around each forward:
    symmetric in [-levels, levels], 127 as ORT quantizes, 64 with its ``reduce_range`` (7-bit).
    The handle keeps the Parameter; the module's attribute is the fake-quantized tensor while its
    forward runs and the Parameter again after it (so optimisers and state_dict see it)."""

    def __init__(self, module: nn.Module, levels: int = 127) -> None:
        self.module = module
        self.levels = int(levels)
        self.pre = module.register_forward_pre_hook(self._before)
        self.post = module.register_forward_hook(self._after)
        self.weight = module.weight

    def _before(self, module, inputs):
        w = self.weight
        bound = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8)
        scale = (bound / self.levels).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        del module.weight
        module.weight = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.levels, self.levels)

    def _after(self, module, inputs, output):
        del module.weight
        module.weight = self.weight
        return output

    def remove(self) -> None:
        self.pre.remove()
        self.post.remove()


def calibrate_ranges(
    model: nn.Module, images: np.ndarray, names: Iterable[str], batch: int = 64
) -> dict[str, ActivationRange]:
    """Min/max of each named layer's input over ``images`` (PTQ's ``max`` calibration)."""
    wanted = set(names)
    ranges: dict[str, ActivationRange] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in wanted:

            def pre(mod, inputs, name=name):
                x = inputs[0].detach()
                r = ranges.setdefault(name, ActivationRange(float("inf"), float("-inf")))
                r.low, r.high = min(r.low, float(x.min())), max(r.high, float(x.max()))

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model.eval()
            for start in range(0, len(images), batch):
                model(torch.from_numpy(images[start : start + batch]))
    finally:
        for h in hooks:
            h.remove()
    return ranges


def qat_finetune(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    images: np.ndarray,
    *,
    signed: bool,
    float_layers: Sequence[str] = (),
    epochs: int = 1,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss: DistillLoss | None = None,
    runtime: Runtime | None = None,
    max_steps: int | None = None,
    weight_levels: int = 127,
) -> tuple[nn.Module, dict]:
    """A BN-folded copy of ``student`` fine-tuned under fake quantization with KD from
    ``teacher``; returns it (fake quantizers removed, float weights) and the epochs' records.
    ``weight_levels``: 127 for 8-bit weights, 64 where the export takes ``reduce_range``."""
    import copy

    device = runtime.device if runtime is not None else torch.device("cpu")
    model = copy.deepcopy(student).cpu().eval()
    example = torch.from_numpy(images[:2])
    folded = fold_batchnorm(model, example)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPUTE) and n not in set(float_layers)]
    ranges = calibrate_ranges(model, images, names)
    quant = FakeQuant(model, ranges, signed, weight_levels)
    model.to(device)
    teacher = teacher.to(device).eval()
    optimizer = make_optimizer(
        model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    steps = min(len(loader), max_steps) if max_steps else len(loader)
    scheduler = cosine_schedule(optimizer, steps * epochs)
    records = []
    try:
        for epoch in range(epochs):
            records.append(
                train_epoch(
                    model,
                    loader,
                    optimizer,
                    scheduler,
                    loss or DistillLoss(),
                    device=device,
                    teacher=teacher,
                    description=f"QAT + KD epoch {epoch}",
                    max_steps=max_steps,
                    epoch=epoch,
                    runtime=runtime,
                    phase="student",
                )
            )
    finally:
        quant.remove()
    return model.cpu().eval(), {"folded_batchnorms": folded, "fake_quantized_layers": len(names), "epochs": records}


def torch_layers(model: nn.Module, shape: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The model's Conv/Linear modules in the order one forward pass runs them, with their weight
    shapes: how ONNX nodes get their PyTorch names back (:func:`~cascadec.quantize.ptq.compute_nodes`)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(m.weight.shape))))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear))
    ]
    try:
        with torch.inference_mode():
            model.cpu().eval()(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


@dataclass
class QatInputs:
    """What quantization-aware fine-tuning needs beyond the PTQ inputs."""

    recipe: Recipe
    teacher: nn.Module
    student: nn.Module
    bundle: DataBundle


def qat_flavour(
    run: RunDir,
    q: QuantizeSection,
    flavour: Flavour,
    qat: QatInputs,
    images: np.ndarray,
    float_nodes: list[str],
    nodes: list[dict[str, str]],
    sel_x: np.ndarray,
    sel_y: np.ndarray,
    ptq_graph: dict[str, Any],
    ptq_accuracy: float,
    method: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """QAT + KD for one flavour (cascadec.quantize.qat), then the same PTQ export of the fine-tuned
    weights; the file that scores best on the selection split is the one left in place."""
    recipe, work = qat.recipe, run.file("quantize")
    float_modules = [n["module"] for n in nodes if n["node"] in set(float_nodes)]
    loader = DataLoader(
        qat.bundle.train,
        batch_size=recipe.data.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )
    log(f"INT8 ({flavour.name}): quantization-aware fine-tuning with KD, {q.qat_epochs} epoch(s)")
    tuned, record = qat_finetune(
        qat.student,
        qat.teacher,
        loader,
        images,
        signed=flavour.symmetric_activations,
        float_layers=float_modules,
        epochs=q.qat_epochs,
        lr=q.qat_lr,
        momentum=recipe.train.momentum,
        loss=DistillLoss(
            recipe.distill.ce_weight, recipe.distill.kd_weight if recipe.distill.kd else 0.0, recipe.distill.temperature
        ),
        max_steps=recipe.train.max_steps_per_epoch,
        weight_levels=64 if flavour.quantize_kwargs(method["reduce_range"])["reduce_range"] else 127,
    )
    tuned_fp32 = work / f"qat.{flavour.name}.onnx"
    export_onnx(tuned, torch.from_numpy(images[:1]), tuned_fp32, opset=recipe.export.opset, slim=recipe.export.slim)
    tuned_prepared = work / f"qat.{flavour.name}.prepared.onnx"
    prepare(tuned_fp32, tuned_prepared)
    tuned_nodes = compute_nodes(tuned_prepared, torch_layers(tuned, qat.bundle.input_shape))
    keep = [n["node"] for n in tuned_nodes if n["module"] in set(float_modules)]
    candidate = work / f"qat.{flavour.name}.int8.onnx"
    tuned_cache = work / f"calibration.qat.{flavour.name}.json"
    tuned_cache.unlink(missing_ok=True)
    tuned_method = {**method, "cache": tuned_cache, "names": {n["node"]: n["module"] for n in tuned_nodes}}
    graph = quantize_int8(tuned_prepared, candidate, flavour, images, exclude_nodes=keep, **tuned_method)
    accuracy = onnx_accuracy(candidate, sel_x, sel_y, fused=flavour.judge_fused)
    shipped = "qat" if accuracy > ptq_accuracy else "ptq"
    log(
        f"INT8 ({flavour.name}): QAT + KD {accuracy:.4f} on the selection split against PTQ {ptq_accuracy:.4f}: "
        f"{'shipping QAT' if shipped == 'qat' else 'keeping PTQ'}"
    )
    if shipped == "qat":
        os.replace(candidate, run.file(flavour.file))
    candidate.unlink(missing_ok=True)
    out = {
        "ptq_selection_accuracy": ptq_accuracy,
        "qat_selection_accuracy": accuracy,
        "shipped": shipped,
        "epochs": q.qat_epochs,
        "lr": q.qat_lr,
        "folded_batchnorms": record["folded_batchnorms"],
        "fake_quantized_layers": record["fake_quantized_layers"],
        "train": [{k: e.get(k) for k in ("loss", "seconds", "images_per_s")} for e in record["epochs"]],
    }
    return out, (graph if shipped == "qat" else ptq_graph), max(accuracy, ptq_accuracy)
