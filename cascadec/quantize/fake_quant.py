"""Fake quantization in PyTorch at the points the INT8 graph quantizes (what QAT trains under).

BatchNorms are folded into their convolutions first (what ``quant_pre_process`` does to the graph
PTQ quantizes); every Conv/Linear the INT8 graph quantizes then gets per-channel symmetric int8
weights (recomputed from the weights each step) and a per-tensor activation range on its input,
calibrated once on training images as PTQ's ``max`` calibration does (unsigned asymmetric for the
ONNX Runtime flavour, signed symmetric for TensorRT's). ``torch.fake_quantize_per_*_affine`` are
core ops with straight-through gradients. Kept apart from ``qat.py`` (the training and export)
because it is the numeric part the tests pin against the export's grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

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
