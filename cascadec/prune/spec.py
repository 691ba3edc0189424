"""Pickle-free student artifacts: a width spec (JSON) plus safetensors weights.

Loading never unpickles: the architecture is rebuilt from the registry by name, the same
channel removals are replayed, then the safetensors weights are loaded strictly. A user
can therefore load a student from an untrusted source without running its code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cascadec.errors import UserError, first_line
from cascadec.fileio import replacing, write_json_atomic
from cascadec.models import create_model
from cascadec.prune.shrink import apply_removals

SPEC_FORMAT = "cascadec-widths/1"


def state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; students never share weights once extracted
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_student(
    model: nn.Module,
    directory: Path,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    input_shape: list[int],
    removals: dict[str, list[int]],
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": SPEC_FORMAT,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "input_shape": list(input_shape),
        "removed_channels": removals,
        **(extra or {}),
    }
    spec_path = directory / "student.widths.json"
    weights_path = directory / "student.safetensors"
    write_json_atomic(spec_path, spec, indent=1)
    with replacing(weights_path) as tmp:
        save_file(state_dict_for_safetensors(model), str(tmp), metadata={"format": SPEC_FORMAT})
    return spec_path, weights_path


def read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: width spec not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid width spec ({exc.__class__.__name__}: {first_line(exc)})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise UserError(f"{path}: not a cascadec width spec (expected format {SPEC_FORMAT!r})")
    for key, kind in (("model", str), ("model_kwargs", dict), ("input_shape", list), ("removed_channels", dict)):
        if not isinstance(spec.get(key), kind):
            raise UserError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    kwargs = spec["model_kwargs"]
    counts = {k: v for k, v in kwargs.items() if k != "options"}
    unknown = set(counts) - {"num_classes", "in_channels"}
    if unknown or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in counts.values()):
        raise UserError(f"{path}: model_kwargs must hold positive integers num_classes / in_channels")
    if not isinstance(kwargs.get("options", {}), dict):
        raise UserError(f"{path}: model_kwargs.options must be a mapping (the builder's keyword arguments)")
    shape = spec["input_shape"]
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 100_000 for v in shape):
        raise UserError(f"{path}: input_shape must be three positive integers [C, H, W]")
    return spec


def load_student(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student from ``student.widths.json`` + ``student.safetensors`` in ``directory``."""
    directory = Path(directory)
    spec = read_spec(directory / "student.widths.json")
    model = create_model(spec["model"], **spec["model_kwargs"]).eval()
    example = torch.zeros(1, *spec["input_shape"])
    try:
        removals = {str(k): [int(i) for i in v] for k, v in spec["removed_channels"].items()}
        with torch.no_grad():
            apply_removals(model, removals, example)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise UserError(
            f"{directory / 'student.widths.json'}: removals do not fit model {spec['model']!r} ({first_line(exc)})"
        ) from None
    # what the method added to the architecture (FBS: its gates), by the spec's method, or by the
    # key a method saves its structure under (a spec written without "method"); a method this
    # process has not registered added nothing it knows how to rebuild (the weights then say so)
    from cascadec.prune.method import get_method, is_registered, method_names

    method = spec.get("method") or next((m for m in method_names() if m in spec), None)
    if method is not None and is_registered(str(method)):
        get_method(str(method)).restore_student(model, spec, directory / "student.widths.json")
    weights = directory / "student.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise UserError(f"{weights}: weights not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: corrupted safetensors file ({first_line(exc)})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights}: weights do not match the width spec ({first_line(exc)})") from None
    return model.eval(), spec
