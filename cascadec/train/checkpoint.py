"""Training checkpoints: one pickle-free file, written atomically, loadable after any crash.

A checkpoint is a nested structure of dicts, lists, scalars and tensors (model weights,
optimiser and scheduler state, scores, RNG states, the data position, history). It is
stored as ONE ``.safetensors`` file: the tensors as safetensors entries and everything
else as JSON in the safetensors header metadata. One file means one ``rename`` publishes
tensors and bookkeeping together, so they can never disagree.

Written through ``fileio.write_bytes_atomic`` (a unique temp file beside ``NAME``, ``fsync``,
``os.replace`` over ``NAME``, ``fsync`` of the directory): a process killed at any moment
leaves either the previous complete file or the new complete file under ``NAME``. Nothing
here unpickles, so loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from cascadec.errors import UserError, first_line
from cascadec.fileio import write_bytes_atomic

FORMAT = "cascadec-checkpoint/1"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class NonFiniteState(UserError):
    """Weights or optimiser state became NaN/inf: the state must not replace a good checkpoint."""


# ---------------------------------------------------------------- (un)flattening


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; each tensor is moved to ``tensors`` and replaced by its key."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS} & set(obj)):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        # optimiser state is keyed by int: keep key types exactly
        return {_ITEMS: [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, np.ndarray):
        return _flatten(torch.from_numpy(obj.copy()), tensors) | {"numpy": True}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__}")


def _unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            tensor = tensors[skeleton[_TENSOR]]
            return tensor.numpy() if skeleton.get("numpy") else tensor
        if _TUPLE in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton[_TUPLE])
        if _ITEMS in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton[_ITEMS]}
        return {k: _unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    return skeleton


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator training may draw from, so a resumed run draws the same numbers."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load


def save_checkpoint(path: Path, state: dict[str, Any], *, require_finite: bool = True) -> None:
    """Store ``state`` at ``path`` atomically. With ``require_finite`` a state holding NaN/inf
    is refused (NonFiniteState) so it never replaces the last good checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    if require_finite:
        for tensor in tensors.values():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteState(f"training state became NaN/inf; kept the last good checkpoint {path}")
    payload = save(tensors, metadata={"format": FORMAT, "state": json.dumps(skeleton)})
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, payload, durable=True)
    except OSError as exc:
        hint = " (disk full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}{hint}") from None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is none. A damaged file (which the
    write protocol never produces, but a disk can) is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError("not a cascadec checkpoint")
        return _unflatten(json.loads(metadata["state"]), tensors)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        message = first_line(exc)
        raise UserError(f"checkpoint {path} is unreadable ({message}); delete it to restart that phase") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed headers
        if type(exc).__name__ == "SafetensorError":
            raise UserError(f"checkpoint {path} is unreadable ({exc}); delete it to restart that phase") from None
        raise
