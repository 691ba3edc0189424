"""Models from outside the registry, by name: ``timm/NAME`` and user code ``file.py:builder`` or
``package.module:builder``.

Most people who compress a network did not train a torchvision model: they have a timm backbone
or their own ``nn.Module``. Both are reachable from the CLI and recipes by a string, as timm's
``create_model`` does for its own zoo, without registering anything first:

* ``timm/resnet50d`` builds ``timm.create_model("resnet50d", num_classes=..., in_chans=...)``
  (timm is an optional extra: ``pip install 'cascadec[timm]'``); ``--weights pretrained``
  downloads timm's pretrained weights where the machine is online.
* ``nets.py:build`` imports ``nets.py`` (a path, relative to where the command runs) and calls
  ``build(num_classes=..., in_channels=..., **model.options)``, passing ``num_classes`` when the
  builder names it or takes ``**kwargs`` and ``in_channels`` only when it names it; ``mypkg.nets:build`` imports an installed module.
  Naming a file runs its code, as ``python nets.py`` would: point only at code you trust.

Either way the model is adapted to the data's classes and channels afterwards (like every
third-party builder), and the name is stored in the student's width spec so that a fresh process
rebuilds the same architecture.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from torch import nn

from cascadec.errors import UserError, first_line

TIMM_PREFIX = "timm/"
TIMM_PRETRAINED = "pretrained"  # --weights value that asks timm for its own pretrained weights


def is_external(name: str) -> bool:
    return str(name).startswith(TIMM_PREFIX) or ":" in str(name)


def canonical_name(name: str) -> str:
    """``nets.py:build`` with its file made absolute, so a run reloads it from any directory."""
    if str(name).startswith(TIMM_PREFIX) or ":" not in str(name):
        return name
    source, _, builder = str(name).rpartition(":")
    if source.endswith(".py") and Path(source).is_file():
        return f"{Path(source).resolve()}:{builder}"
    return name


def import_timm():
    try:
        import timm  # optional extra: only timm/ names need it
    except ImportError:
        raise UserError("timm is not installed: pip install 'cascadec[timm]' (or pip install timm)") from None
    return timm


def build_timm(
    name: str, num_classes: int | None, in_channels: int | None, options: dict[str, Any], pretrained: bool
) -> nn.Module:
    timm = import_timm()
    arch = name[len(TIMM_PREFIX) :]
    if arch not in timm.list_models():
        close = get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UserError(f"unknown timm model {arch!r} (timm {timm.__version__}){hint}")
    kwargs = dict(options)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a download or a bad option: the user's to fix
        what = "download its pretrained weights" if pretrained else "build it"
        raise UserError(f"timm model {arch}: cannot {what} ({type(exc).__name__}: {first_line(exc)})") from None


def _import_builder(name: str):
    source, _, attr = str(name).rpartition(":")
    if not source or not attr:
        raise UserError(f"model {name!r}: expected file.py:builder or package.module:builder")
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise UserError(f"model {name!r}: {path} not found")
            module_name = f"cascadec_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed to import: say where and why, in one line
        raise UserError(
            f"model {name!r}: importing {source} failed ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserError(f"model {name!r}: {source} has no callable {attr!r}")
    return builder


def build_from_code(name: str, num_classes: int | None, in_channels: int | None, options: dict[str, Any]) -> nn.Module:
    builder = _import_builder(name)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(options)
    # num_classes is the common convention (torchvision and timm builders take it through **kwargs);
    # in_channels is not (torchvision says in_chans nowhere), so it goes only to builders that name it
    if num_classes is not None and ("num_classes" in params or takes_any):
        kwargs["num_classes"] = num_classes
    if in_channels is not None and "in_channels" in params:
        kwargs["in_channels"] = in_channels
    try:
        model = builder(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's builder failed: one line naming it
        raise UserError(f"model {name!r}: the builder failed ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r}: the builder returned a {type(model).__name__}, not a torch.nn.Module")
    return model
