"""One door to every network: ``create_model(name, num_classes=, in_channels=, weights=)``.

As in timm, recipes name a model by string and never import a builder. The registry holds
our CIFAR nets plus every torchvision *classification* builder
(``torchvision.models.list_models(module=torchvision.models)``, which leaves out the
detection, segmentation, video, optical-flow and quantized namespaces: their outputs are
not logits and the pruning/verification stages assume logits).

Torchvision models are always built with ``weights=None`` and loaded afterwards through
:func:`cascadec.models.weights.load_weights`; that is what lets ImageNet weights be
combined with a different ``num_classes``/``in_channels`` (torchvision refuses), and it
means nothing is downloaded unless the user named torchvision weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TypeVar, overload

import torchvision.models as tvm
from torch import nn
from torchvision.models.mnasnet import MNASNet

from cascadec.errors import UserError, first_line
from cascadec.models import cifar, external
from cascadec.models.adapt import adapt_input_channels, adapt_num_classes
from cascadec.models.weights import (
    WeightsReport,
    is_torchvision_weights_name,
    load_weights,
    resolve_torchvision_weights,
)

__all__ = ["ModelEntry", "create_model", "list_models", "model_info", "register_model", "weights_report"]

log = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model name and what it expects by default."""

    name: str
    builder: Builder
    family: str
    input_size: tuple[int, int, int]
    num_classes: int
    source: str  # "cascadec", "torchvision" or the module of a third-party builder


_REGISTRY: dict[str, ModelEntry] = {}

# Longest prefix first, so 'resnext' and 'wide_resnet' are not reported as 'resnet'.
_TV_FAMILIES = (
    "efficientnet_v2",
    "efficientnet",
    "mobilenet_v2",
    "mobilenet_v3",
    "wide_resnet",
    "resnext",
    "resnet",
    "vgg",
    "densenet",
    "regnet",
    "convnext",
    "shufflenet",
    "mnasnet",
    "squeezenet",
    "googlenet",
    "inception",
    "alexnet",
    "vit",
    "swin",
    "maxvit",
)


@overload
def register_model(fn: F, /) -> F: ...
@overload
def register_model(
    *,
    name: str | None = None,
    family: str | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
) -> Callable[[F], F]: ...
def register_model(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    family: str | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    num_classes: int = 1000,
) -> F | Callable[[F], F]:
    """Register a builder ``fn(*, num_classes, in_channels) -> nn.Module`` under its name.

    Usable bare (``@register_model``) like timm, or with metadata
    (``@register_model(input_size=(3, 32, 32), num_classes=10)``) so that ``model_info``
    can tell the data stage what the net expects.
    """

    def decorate(builder: F) -> F:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise UserError(f"model name '{key}' is already registered ({_REGISTRY[key].source})")
        _REGISTRY[key] = ModelEntry(
            name=key,
            builder=builder,
            family=family or _family_of(key),
            input_size=tuple(input_size),  # type: ignore[arg-type]
            num_classes=num_classes,
            source="cascadec" if builder.__module__.startswith("cascadec.") else builder.__module__,
        )
        return builder

    return decorate(fn) if fn is not None else decorate


def list_models() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> dict[str, Any]:
    """What a model is and expects: family, default input (C, H, W), classes, source, weights."""
    entry = _entry(name)
    info: dict[str, Any] = {
        "name": entry.name,
        "family": entry.family,
        "input_size": entry.input_size,
        "num_classes": entry.num_classes,
        "source": entry.source,
        "weights": [],
    }
    if entry.source == "torchvision":
        enum_cls = tvm.get_model_weights(name)
        info["weights"] = [f"{enum_cls.__name__}.{m.name}" for m in enum_cls]
    return info


def model_sources(*, include_timm: bool = False) -> list[tuple[str, str]]:
    """(name, where it comes from) for every registry model, and timm's when asked."""
    rows = [(name, _entry(name).source) for name in list_models()]
    if include_timm:
        timm = external.import_timm()
        rows += [(external.TIMM_PREFIX + name, f"timm {timm.__version__}") for name in timm.list_models()]
    return rows


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Build ``name``, adapt its head/stem, load ``weights``; the model is in train mode.

    ``name`` is a registry name, ``timm/NAME`` or user code ``file.py:builder`` /
    ``package.module:builder`` (:mod:`cascadec.models.external`; ``options`` are the builder's
    keyword arguments). The load report is kept on the model as ``cascadec_weights_report`` (or
    ``None``) and the name as ``cascadec_model_name``, so later stages can report them.
    """
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    with _weights_must_fit(name, num_classes, in_channels):
        return _create(name, num_classes=num_classes, in_channels=in_channels, weights=weights, options=options)


@contextlib.contextmanager
def _weights_must_fit(name: str, num_classes: int | None, in_channels: int | None) -> Iterator[None]:
    """A head or stem too large for memory (``--num-classes 1000000000``: 256 GB of weights) is
    refused with one line, not an internal error from torch's allocator."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        sizes = ", ".join(f"{k}={v}" for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v)
        raise UserError(
            f"{name}{f' ({sizes})' if sizes else ''}: its weights do not fit in memory ({first_line(exc, 120)})"
        ) from None


def _create(
    name: str,
    *,
    num_classes: int | None,
    in_channels: int | None,
    weights: str | Path | None,
    options: dict[str, Any] | None,
) -> nn.Module:
    if external.is_external(name):
        pretrained = str(weights or "").strip() == external.TIMM_PRETRAINED and name.startswith(external.TIMM_PREFIX)
        if name.startswith(external.TIMM_PREFIX):
            model = external.build_timm(name, num_classes, in_channels, options or {}, pretrained)
        else:
            model = external.build_from_code(name, num_classes, in_channels, options or {})
        if in_channels is not None:
            adapt_input_channels(model, in_channels)
        if num_classes is not None:
            adapt_num_classes(model, num_classes)
        return _finish(model, name, None if pretrained else weights)
    if options:
        raise UserError(f"model.options apply to timm/ and file.py:builder models, not {name!r}")
    entry = _entry(name)
    classes = num_classes if num_classes is not None else entry.num_classes
    channels = in_channels if in_channels is not None else entry.input_size[0]
    if entry.source == "torchvision":
        model = _build_torchvision(entry, classes, weights)
        adapt_input_channels(model, channels)
    else:
        model = entry.builder(num_classes=classes, in_channels=channels)
        # Third-party builders may ignore the kwargs; make sure the contract still holds.
        adapt_input_channels(model, channels)
        adapt_num_classes(model, classes)
    return _finish(model, name, weights)


def _finish(model: nn.Module, name: str, weights: str | Path | None) -> nn.Module:
    # Plain attributes (not buffers): they ride along with deepcopy and never reach ONNX.
    setattr(model, "cascadec_model_name", name)  # noqa: B010
    setattr(model, "cascadec_weights_report", None)  # noqa: B010
    if weights is not None and str(weights).strip():
        report = load_weights(model, weights, model_name=name)
        setattr(model, "cascadec_weights_report", report)  # noqa: B010
        (log.warning if report.head_reinitialised else log.info)("%s: %s", name, report.summary())
    return model


def weights_report(model: nn.Module) -> WeightsReport | None:
    """The load report ``create_model`` kept on ``model`` (``None``: no weights were loaded)."""
    report = model.__dict__.get("cascadec_weights_report")
    return report if isinstance(report, WeightsReport) else None


def _build_torchvision(entry: ModelEntry, num_classes: int, weights: str | Path | None) -> nn.Module:
    """``builder(weights=None, ...)`` with the constructor arguments those weights need."""
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    enum = None
    if isinstance(weights, str) and is_torchvision_weights_name(weights):
        enum = resolve_torchvision_weights(weights.strip(), entry.name)
    if entry.family in ("googlenet", "inception"):
        # Aux heads return a tuple in train mode, which no training loop or tracer here
        # expects; torchvision drops them after loading too. transform_input is what
        # torchvision enables for its own weights (they were trained with that input).
        kwargs.update(aux_logits=False, init_weights=enum is None, transform_input=enum is not None)
    elif entry.family == "vit" and enum is not None:
        kwargs["image_size"] = enum.meta["min_size"][0]  # SWAG weights are 384/518 px
    elif entry.family == "maxvit" and enum is not None:
        kwargs["input_size"] = enum.meta["min_size"]
    model = entry.builder(**kwargs)
    if entry.family == "mnasnet":
        model.__class__ = _versioned_mnasnet()  # same module, same weights: only loading differs
    return model


@functools.cache
def _versioned_mnasnet() -> type:
    class VersionedMNASNet(MNASNet):
        """torchvision's MNASNet refuses any state dict without its ``_metadata`` version
        (ValueError "version should be set to 1 or 2"); safetensors files and plain dicts
        carry none, so the student and teacher files of a run could not be reloaded. The
        builders always build the current layout, so a missing version means this one."""

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # type: ignore[override]
            local_metadata = {"version": self._version, **local_metadata}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    return VersionedMNASNet


def _entry(name: str) -> ModelEntry:
    if not isinstance(name, str) or name not in _REGISTRY:
        close = get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `cascadec models`"
        raise UserError(f"unknown model '{name}'{hint}")
    return _REGISTRY[name]


def _family_of(name: str) -> str:
    for family in _TV_FAMILIES:
        if name.startswith(family):
            return family
    return re.sub(r"[\d_]+$", "", name.split("_", 1)[0]) or name


def _register_torchvision() -> None:
    for tv_name in tvm.list_models(module=tvm):
        if tv_name in _REGISTRY:
            continue
        size = 299 if tv_name == "inception_v3" else 224
        _REGISTRY[tv_name] = ModelEntry(
            name=tv_name,
            builder=tvm.get_model_builder(tv_name),
            family=_family_of(tv_name),
            input_size=(3, size, size),
            num_classes=1000,
            source="torchvision",
        )


def _register_cascadec() -> None:
    nets: dict[str, tuple[Builder, str, tuple[int, int, int]]] = {
        "cifar_resnet8": (cifar.cifar_resnet8, "cifar_resnet", (3, 32, 32)),
        "cifar_resnet20": (cifar.cifar_resnet20, "cifar_resnet", (3, 32, 32)),
        "cifar_resnet56": (cifar.cifar_resnet56, "cifar_resnet", (3, 32, 32)),
        "cifar_vgg16_bn": (cifar.cifar_vgg16_bn, "cifar_vgg", (3, 32, 32)),
    }
    for key, (builder, family, size) in nets.items():
        register_model(name=key, family=family, input_size=size, num_classes=10)(builder)
    # The Fashion-MNIST demo net: ResNet-8 whose defaults are 1x28x28 and 10 classes.
    register_model(name="fmnist_resnet8", family="cifar_resnet", input_size=(1, 28, 28), num_classes=10)(
        cifar.cifar_resnet8
    )


_register_cascadec()
_register_torchvision()
