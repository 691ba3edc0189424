"""Load weights into a built model from a torchvision weights name, a .pt/.pth or a .safetensors.

Safety: ``.pt``/``.pth`` files are read only with ``torch.load(..., weights_only=True)``, so a
checkpoint can never run code; a file that needs full unpickling (``torch.save(model)``) is
refused with a message saying how to re-save it.

Fitting: the state dict is matched key by key against the model *before* anything is
copied, so a wrong file fails with one line naming the first few bad keys instead of a
half-loaded model. Two mismatches are expected and repaired rather than refused:

* the classifier (and GoogLeNet/Inception aux heads) differ only in the number of
  classes -> those tensors are skipped and the head keeps its fresh init
  ("head re-initialised"), which is the whole point of fine-tuning from ImageNet;
* the stem conv differs only in its input channels -> the filters are mapped with
  :func:`cascadec.models.adapt.transfer_input_weight` (RGB summed to grey).

Torchvision weights are read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``)
and downloaded only when missing; ``CASCADEC_OFFLINE=1`` forbids the download, so air-gapped
machines and tests get the "file X is missing" message immediately instead of a timeout.
"""

from __future__ import annotations

import os
import pickletools
import re
import urllib.parse
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from safetensors.torch import load_file
from torch import Tensor, nn

from cascadec.errors import UserError, first_line
from cascadec.models.adapt import find_classifier, find_first_conv, transfer_input_weight

__all__ = [
    "WeightsReport",
    "apply_state_dict",
    "fetch_torchvision_state_dict",
    "is_torchvision_weights_name",
    "load_weights",
    "read_state_dict",
    "resolve_torchvision_weights",
    "torchvision_checkpoint_path",
]

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_TV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
# Old torchvision DenseNet checkpoints use 'norm.1'-style keys (see torchvision densenet.py).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_SHOW = 3


@dataclass
class WeightsReport:
    """What a load did, for the run report: which keys came from the file and which did not."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    head_reinitialised: bool = False

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.adapted:
            parts.append(f"adapted input channels of {', '.join(self.adapted)}")
        if self.head_reinitialised:
            parts.append("classifier head re-initialised (num_classes differs)")
        if self.skipped:
            parts.append(_sample(f"skipped {len(self.skipped)} tensors", self.skipped))
        return "; ".join(parts)


def load_weights(model: nn.Module, spec: str | Path, *, model_name: str | None = None) -> WeightsReport:
    """Load ``spec`` into ``model`` in place and report what was loaded.

    ``model_name`` (the registry name) is needed only to resolve a bare torchvision member
    such as ``IMAGENET1K_V2``/``DEFAULT``; models from ``create_model`` carry it already.
    """
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        path = builtin_weights_path(spec)
        return apply_state_dict(model, read_state_dict(path), spec)
    if isinstance(spec, str) and is_torchvision_weights_name(spec):
        name = model_name or getattr(model, "cascadec_model_name", None)
        weights = resolve_torchvision_weights(spec, name)
        return apply_state_dict(model, fetch_torchvision_state_dict(weights), str(weights))
    path = Path(spec).expanduser()
    return apply_state_dict(model, read_state_dict(path), str(path))


BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "pretrained"


def builtin_weights_path(spec: str) -> Path:
    """``builtin:NAME`` -> the safetensors file cascadec ships (trained by scripts/ in this repo)."""
    name = spec[len(BUILTIN_PREFIX) :]
    path = BUILTIN_DIR / f"{name}.safetensors"
    if not path.is_file():
        available = sorted(p.stem for p in BUILTIN_DIR.glob("*.safetensors")) or ["none"]
        raise UserError(f"unknown builtin weights {spec!r}; available: {', '.join(available)}")
    return path


def is_torchvision_weights_name(spec: str) -> bool:
    """``ResNet50_Weights.IMAGENET1K_V2`` or ``DEFAULT`` rather than a path to a file."""
    text = spec.strip()
    if not text or "/" in text or os.sep in text:
        return False
    suffix = Path(text).suffix.lower()
    if suffix in {".pt", ".pth", ".bin", ".ckpt", ".safetensors"} or Path(text).exists():
        return False
    return _TV_NAME.fullmatch(text) is not None


def resolve_torchvision_weights(spec: str, model_name: str | None) -> Any:
    """The ``WeightsEnum`` member named by ``spec``, checked to belong to ``model_name``."""
    enum_cls = None
    if model_name is not None:
        if model_name not in tvm.list_models(module=tvm):
            raise UserError(
                f"model '{model_name}' has no torchvision weights ('{spec}'); "
                "pass a local .pt/.pth/.safetensors file instead"
            )
        enum_cls = tvm.get_model_weights(model_name)
    choices = [f"{enum_cls.__name__}.{m.name}" for m in enum_cls] if enum_cls else []
    hint = f" (model '{model_name}' takes: {', '.join([*choices, 'DEFAULT'])})" if choices else ""
    if "." in spec:
        try:
            weights = tvm.get_weight(spec)
        except Exception:
            raise UserError(f"unknown torchvision weights '{spec}'{hint}") from None
        if enum_cls is not None and type(weights) is not enum_cls:
            raise UserError(f"weights '{spec}' are not for model '{model_name}'{hint}")
        return weights
    if enum_cls is None:
        raise UserError(
            f"weights name '{spec}' needs the model it belongs to; write it in full, e.g. ResNet50_Weights.{spec}"
        )
    try:
        return enum_cls[spec]
    except KeyError:
        close = get_close_matches(spec, [m.name for m in enum_cls] + ["DEFAULT"], n=3)
        did = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"weights '{spec}' is neither a file nor a torchvision weights name{hint}{did}") from None


def torchvision_checkpoint_path(weights: Any) -> Path:
    """Where torch hub keeps (or would keep) the file of a torchvision weights member."""
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def fetch_torchvision_state_dict(weights: Any) -> dict[str, Tensor]:
    """Read the cached checkpoint, downloading it first unless ``CASCADEC_OFFLINE`` is set."""
    path = torchvision_checkpoint_path(weights)
    if path.is_file():
        return read_state_dict(path)
    missing = f"torchvision weights {weights} are not in the torch hub cache ({path} is missing)"
    fix = "copy that file there or pass a local .pt/.pth/.safetensors file as weights"
    if os.environ.get("CASCADEC_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise UserError(f"{missing} and CASCADEC_OFFLINE is set; {fix}")
    try:
        state = torch.hub.load_state_dict_from_url(
            weights.url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as exc:
        raise UserError(f"{missing} and the download failed ({first_line(exc)}); {fix}") from None
    return _extract_state_dict(state, path)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or (weights-only) ``.pt``/``.pth`` file, nothing else."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise UserError(
                f"weights file {path} is not a readable safetensors file (truncated or corrupt: {first_line(exc)})"
            ) from None
    try:
        with warnings.catch_warnings():  # torch's advice to retry with weights_only=False is not ours to give
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        foreign = _pickled_globals(path)
        if foreign:
            raise UserError(
                f"weights file {path} asks to run code when loaded ({', '.join(foreign[:3])}); it was not loaded. "
                "Re-save weights you trust with torch.save(model.state_dict(), ...) or as .safetensors"
            ) from None
        raise UserError(f"weights file {path} cannot be read (truncated or corrupt: {first_line(exc)})") from None
    return _extract_state_dict(obj, path)


# what a plain torch.save(state_dict) pickle references; anything else is code the file wants run
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray._reconstruct")


def _pickled_globals(path: Path) -> list[str]:
    """The callables a pickle (plain, or inside torch.save's zip) names beyond tensor rebuilding,
    read with pickletools, which only parses: nothing in the file is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
        names, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a file too damaged to parse is reported as damaged by the caller
        return []
    return [n for n in dict.fromkeys(names) if not n.startswith(_TENSOR_GLOBALS)]


def apply_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> WeightsReport:
    """Check ``state`` against ``model`` completely, then copy it in (or raise, copying nothing)."""
    target = model.state_dict()
    state = _normalise_keys(state, target)
    report = WeightsReport(source=source)
    head_name, _ = find_classifier(model)
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    try:
        stem_key: str | None = f"{find_first_conv(model)[0]}.weight"
    except UserError:
        stem_key = None
    top_level = {key.split(".", 1)[0] for key in target}
    to_load: OrderedDict[str, Tensor] = OrderedDict()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in target:
            if key.split(".", 1)[0] not in top_level and _is_aux(key):
                report.skipped.append(key)  # aux heads the model was built without
            elif not key.endswith("num_batches_tracked"):
                unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape == want:
            to_load[key] = value
            report.loaded.append(key)
        elif key == stem_key and value.ndim == 4 and _same_but(value.shape, want, dim=1):
            to_load[key] = transfer_input_weight(value, want[1])
            report.adapted.append(key)
        elif (key in head_keys or _is_aux(key)) and _same_but(value.shape, want, dim=0):
            report.skipped.append(key)
            report.head_reinitialised = True
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    problems = [
        _sample(f"{len(missing)} missing keys", missing),
        _sample(f"{len(unexpected)} unexpected keys", unexpected),
        _sample(f"{len(mismatched)} shape mismatches (file vs model)", mismatched),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise UserError(f"weights {source} do not fit {type(model).__name__}: {'; '.join(problems)}")
    to_load._metadata = _metadata_for(state, target)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(to_load, strict=False)
    except Exception as exc:
        raise UserError(f"weights {source} cannot be loaded: {first_line(exc)}") from None
    return report


def _extract_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """Accept a bare state dict or a training checkpoint holding one under a usual key."""
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise UserError(
                f"weights file {path}: key {key!r} holds a {type(value).__name__}, not a tensor; "
                f"expected a state dict (or a checkpoint with one of {', '.join(_NESTED_KEYS)})"
            )
    if not obj:
        raise UserError(f"weights file {path} holds an empty state dict")
    return obj


def _normalise_keys(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo DataParallel/``torch.compile``/wrapper prefixes and old DenseNet key names."""
    metadata = getattr(state, "_metadata", None)
    changed = True
    while changed and not any(k in target for k in state):
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
                if metadata is not None:
                    metadata = OrderedDict(
                        (k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in metadata.items()
                    )
                changed = True
                break
    renamed: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        if match and key not in target and match.group(1) + match.group(2) in target:
            key = match.group(1) + match.group(2)
        renamed[key] = value
    if metadata is not None:
        renamed._metadata = metadata  # type: ignore[attr-defined]
    return renamed


def _metadata_for(state: dict[str, Tensor], target: dict[str, Tensor]) -> OrderedDict:
    """Module versions for ``load_state_dict``: the file's where it has them, else today's.

    safetensors (and re-packed dicts) carry no versions; MNASNet refuses to load without
    one, and "written by the current code" is the only sensible assumption there.
    """
    merged: OrderedDict = OrderedDict(getattr(target, "_metadata", {}) or {})
    merged.update(getattr(state, "_metadata", {}) or {})
    return merged


def _same_but(a: torch.Size, b: torch.Size, *, dim: int) -> bool:
    return len(a) == len(b) and all(x == y for i, (x, y) in enumerate(zip(a, b, strict=True)) if i != dim)


def _is_aux(key: str) -> bool:
    return any("aux" in part.lower() for part in key.split("."))


def _sample(label: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = ", ..." if len(keys) > _SHOW else ""
    return f"{label} ({', '.join(keys[:_SHOW])}{more})"
