"""Change a network's input channels or number of classes without rebuilding it.

torchvision has no ``in_channels`` argument at all, and its ``num_classes`` argument cannot
be combined with ImageNet weights, so both are done here by surgery on the built model.
The layers are found by walking the modules in registration order, which for every
torchvision classification family puts the stem conv first and the classifier last; this
keeps the code family-agnostic instead of a table of attribute paths per architecture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascadec.errors import UserError

__all__ = ["adapt_input_channels", "adapt_num_classes", "find_classifier", "find_first_conv", "transfer_input_weight"]

_AUX_MARKERS = ("aux",)


def find_first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The stem convolution: the first ``nn.Conv2d`` registered in the model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise UserError(f"cannot adapt input channels of {type(model).__name__}: it has no Conv2d")


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d]:
    """The output layer: the last ``nn.Linear`` outside aux heads, else the last ``nn.Conv2d``.

    The conv fallback is SqueezeNet, whose classifier is a 1x1 conv followed by pooling.
    """
    last_linear: tuple[str, nn.Linear] | None = None
    last_conv: tuple[str, nn.Conv2d] | None = None
    for name, module in model.named_modules():
        if _is_aux(name):
            continue
        if isinstance(module, nn.Linear):
            last_linear = (name, module)
        elif isinstance(module, nn.Conv2d):
            last_conv = (name, module)
    if last_linear is not None:
        return last_linear
    if last_conv is not None:
        return last_conv
    raise UserError(f"cannot adapt the classifier of {type(model).__name__}: it has no Linear or Conv2d")


def transfer_input_weight(weight: Tensor, in_channels: int) -> Tensor:
    """Map a stem conv weight ``(O, C_old, kh, kw)`` to ``(O, in_channels, kh, kw)``.

    For one channel the RGB filters are *summed*, not averaged: a grey image is what an RGB
    net sees when R=G=B, and then ``sum_c W_c * x == (sum_c W_c) * x``, so pretrained
    activations (and the BatchNorm running statistics after them) are preserved exactly;
    averaging would shrink them 3x. Other counts repeat the filters cyclically and rescale
    by ``C_old / in_channels`` so the activation scale stays the same (as timm does).
    """
    old_in = weight.shape[1]
    if in_channels == old_in:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // old_in)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (old_in / in_channels)


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the stem conv so the model takes ``in_channels`` inputs; returns ``model``.

    The existing filters (pretrained or freshly initialised) are carried over through
    :func:`transfer_input_weight`; for a random init the sum of 3 i.i.d. filters has
    exactly the std Kaiming init gives a 1-input conv, so nothing needs re-initialising.
    """
    _check_positive("in_channels", in_channels)
    name, conv = find_first_conv(model)
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise UserError(
            f"cannot adapt input channels: first conv '{name}' of {type(model).__name__} "
            f"is grouped (groups={conv.groups})"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(transfer_input_weight(conv.weight, in_channels))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)
    # GoogLeNet / Inception-v3 re-normalise R, G and B separately in forward(); with any
    # other channel count that indexing fails, so the trick is switched off.
    if getattr(model, "transform_input", False):
        setattr(model, "transform_input", False)  # noqa: B010 - not a declared attribute
    return model


def adapt_num_classes(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier (and any aux heads) with fresh ones of ``num_classes`` outputs."""
    _check_positive("num_classes", num_classes)
    name, head = find_classifier(model)
    old = _out_features(head)
    if old == num_classes:
        return model
    _set_submodule(model, name, _new_head(head, num_classes))
    for aux_name, module in list(model.named_modules()):
        if _is_aux(aux_name) and isinstance(module, nn.Linear) and module.out_features == old:
            _set_submodule(model, aux_name, _new_head(module, num_classes))
    if isinstance(getattr(model, "num_classes", None), int):
        setattr(model, "num_classes", num_classes)  # noqa: B010
    return model


def _new_head(head: nn.Linear | nn.Conv2d, num_classes: int) -> nn.Module:
    device, dtype = head.weight.device, head.weight.dtype
    if isinstance(head, nn.Linear):
        return nn.Linear(head.in_features, num_classes, bias=head.bias is not None, device=device, dtype=dtype)
    conv = nn.Conv2d(
        head.in_channels,
        num_classes,
        head.kernel_size,  # type: ignore[arg-type]
        stride=head.stride,  # type: ignore[arg-type]
        padding=head.padding,  # type: ignore[arg-type]
        bias=head.bias is not None,
        device=device,
        dtype=dtype,
    )
    # torchvision's SqueezeNet init for its final conv; the default would saturate the ReLU.
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _out_features(head: nn.Linear | nn.Conv2d) -> int:
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def _is_aux(name: str) -> bool:
    return any(marker in part.lower() for part in name.split(".") for marker in _AUX_MARKERS)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_positive(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")
