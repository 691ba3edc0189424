"""Everything about *how* training runs, apart from *what* it trains: device, processes,
precision, memory format, checkpoints and Ctrl-C. The training loops take one ``Runtime``
so the method code (cascade.py, methods.py) stays free of these concerns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cascadec import locks
from cascadec.errors import UserError
from cascadec.progress import log
from cascadec.train.checkpoint import load_checkpoint, save_checkpoint
from cascadec.train.distributed import SINGLE, Dist
from cascadec.train.grad_sync import OverlappedGradSync

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_SYNCS = ("overlap", "after-backward")


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: training cannot go on, but the last checkpoint is still good."""


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(
            f"{where}: loss became {loss.item()} (NaN/inf); lower the learning rate (train.lr) and retry"
        )


class StopRequest:
    """First Ctrl-C: finish the current step, write a checkpoint, then stop (exit 130).
    A second Ctrl-C stops at once. Only installable from the main thread (signal rules)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: Dist = SINGLE
    amp: str = "none"
    channels_last: bool = False
    checkpoint_dir: Path | None = None  # None: no checkpoints (library use, tests of the method)
    checkpoint_every_steps: int | None = None
    grad_sync: str = "overlap"  # GRAD_SYNCS: how ranks average gradients (cascadec.train.grad_sync)
    grad_bucket_mb: float = 25.0
    stop: StopRequest = field(default_factory=StopRequest)

    def __post_init__(self) -> None:
        if self.amp not in ("none", *AMP_DTYPES):
            raise UserError(f"train.amp {self.amp!r}: expected none, bf16 or fp16")
        if self.grad_sync not in GRAD_SYNCS:
            raise UserError(f"train.grad_sync {self.grad_sync!r}: expected one of {', '.join(GRAD_SYNCS)}")
        self._sync: OverlappedGradSync | None = None
        if self.device.type != "cuda":
            if self.amp != "none":
                log(f"train.amp {self.amp} needs CUDA; training in float32 on {self.device.type}")
                self.amp = "none"
            self.channels_last = False  # a CUDA (cuDNN) layout win; on CPU it only adds copies
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None

    @classmethod
    def for_recipe(
        cls, train: Any, device: torch.device, dist: Dist | None = None, *, checkpoint_dir: Path | None = None
    ) -> Runtime:
        """The runtime a recipe's ``train`` section asks for (cascadec.recipe.TrainSection)."""
        return cls(
            device=device,
            dist=dist or SINGLE,
            amp=train.amp,
            channels_last=train.channels_last,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every_steps=train.checkpoint_every_steps,
            grad_sync=train.grad_sync,
            grad_bucket_mb=train.grad_bucket_mb,
        )

    # ------------------------------------------------------------ precision / layout
    def autocast(self):
        if self.amp == "none":
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[self.amp])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    @contextmanager
    def overlapped_sync(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside: ``backward_step`` averages the gradients of (a subset of) ``params`` in
        buckets while the backward pass runs (``grad_sync: overlap`` on several ranks);
        otherwise, and outside, in one piece after it. A training loop wraps its epoch in it."""
        if not self.dist.active or self.grad_sync != "overlap" or self._sync is not None:
            yield
            return
        self._sync = OverlappedGradSync(params, self.dist, bucket_mb=self.grad_bucket_mb)
        try:
            yield
        finally:
            self._sync.close()
            self._sync = None

    def backward_step(
        self, loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer | None], params: Sequence[torch.Tensor]
    ) -> None:
        """backward, gradient averaging across ranks, optimiser steps (through the fp16 scaler)."""
        sync = self._sync
        if sync is not None and not sync.covers(params):
            sync = None  # a backward_step over other tensors than the epoch's: after backward, as before
        if sync is not None:
            sync.begin(params)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if sync is not None:
            sync.finish()
        else:
            self.dist.sync_grads(params)
        for opt in optimizers:
            if opt is None:
                continue
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, phase: str) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{phase}.safetensors"

    def load(self, phase: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(phase)
        return None if path is None else load_checkpoint(path)

    def save(self, phase: str, state: dict[str, Any]) -> None:
        """Rank 0 writes; the others wait, so no rank runs ahead of a checkpoint it may resume from."""
        path = self.checkpoint_path(phase)
        if path is None:
            return
        if self.scaler is not None:
            state = {**state, "grad_scaler": self.scaler.state_dict()}
        if not self.dist.active:
            save_checkpoint(path, state)
            return
        error = None
        if self.dist.is_main:
            try:
                save_checkpoint(path, state)
            except UserError as exc:  # full disk, NaN state: every rank must stop, not wait for rank 0
                error = str(exc)
            locks.hold_point("checkpoint-saved")  # the elastic-restart test stops rank 0 here
        error = self.dist.broadcast_object(error)  # doubles as the barrier
        if error:
            raise UserError(error)

    def restore_scaler(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def due(self, steps_done_in_epoch: int, epoch_steps: int) -> bool:
        """A mid-epoch checkpoint is due (the epoch-end one is written by the caller)."""
        every = self.checkpoint_every_steps
        return bool(every) and steps_done_in_epoch % every == 0 and steps_done_in_epoch < epoch_steps


def check_step(runtime: Runtime, loss: torch.Tensor, where: str) -> bool:
    """The per-step agreement: raises on a NaN/inf loss (on any rank), returns whether a stop
    (Ctrl-C on any rank) was requested."""
    total, stop = runtime.dist.agree(loss, runtime.stop.requested)
    check_finite(total, where)
    return stop
