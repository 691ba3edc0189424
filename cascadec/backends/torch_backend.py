"""PyTorch runner with the same numpy-in/numpy-out contract as the deployment runners.

PyTorch is the reference every backend is gated against, so it must be called
exactly like the candidates: eval mode, no autograd, float32 numpy at the boundary.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cascadec.backends.runner import BaseRunner
from cascadec.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a device string into a usable device, or a one-line UserError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown torch device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return dev


def first_output(out: object) -> torch.Tensor:
    """The logits of a forward pass: models that return (logits, extras) are read the same way."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model returned {type(out).__name__}; cascadec expects a logits tensor")
    return out


class TorchRunner(BaseRunner):
    """Wraps a model as a reference backend; moves it to ``device`` and puts it in eval mode."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        if not isinstance(model, nn.Module):
            raise UserError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.precision = "fp32"

    def infer(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = first_output(self.model(tensor))
        return out.detach().to("cpu", torch.float32).numpy()
