"""Data-parallel training over torch.distributed, as a handful of explicit collectives.

The cascade's models share one set of conv weights and carry mask hooks, which torch's
DistributedDataParallel wrapper does not model well (one parameter reached through several
modules, gradients that flow into scores outside any module). Averaging the gradients of
the unique parameters and scores is the same update DDP would make, and keeps the training
loop readable:

* every rank starts from the same seed and weights, and sees its own slice of each global
  batch (cascadec.data.sampler);
* gradients averaged, so every rank takes the same step, the scores stay equal and so do the
  masks solved from them: in buckets while ``backward`` runs (cascadec.train.grad_sync, the
  default ``train.grad_sync: overlap``), or in one piece after it (``sync_grads``);
* per step, the loss and a stop flag are agreed on (``agree``) so a NaN on one rank, or a
  Ctrl-C seen by one rank first, stops all of them at the same step;
* at epoch end: BatchNorm running statistics averaged, parameters broadcast from rank 0
  (``sync_state``), so any drift in reduction order cannot accumulate;
* only rank 0 writes the run directory.

Launch: ``torchrun --nproc-per-node N -m cascadec compress ...`` (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or ``cascadec compress --nproc N ...``,
which re-executes itself through torch.distributed.run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.nn as nn

from cascadec import progress
from cascadec.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is a single-process run (every call a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sync_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average gradients across ranks: the update DistributedDataParallel would make."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]  # which are None is structural: same on every rank
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """The loss summed over ranks (non-finite on all if on any) and whether any rank must stop."""
        if not self.active:
            return loss, stop
        packed = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)])
        torch.distributed.all_reduce(packed)
        return packed[0], bool(packed[1] > 0)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        out = tensor.detach().clone().float()
        torch.distributed.all_reduce(out)
        return (out / self.world_size).to(tensor.dtype)

    def sync_state(self, models: Sequence[nn.Module], extra: Sequence[torch.Tensor] = ()) -> None:
        """Average float buffers (BatchNorm running stats), then broadcast parameters and ``extra``
        from rank 0 so every rank holds bit-identical state at epoch end."""
        if not self.active:
            return
        seen: set[int] = set()
        with torch.no_grad():
            for model in models:
                for buf in model.buffers():
                    if id(buf) in seen:
                        continue
                    seen.add(id(buf))
                    if buf.is_floating_point():
                        torch.distributed.all_reduce(buf)
                        buf /= self.world_size
                    torch.distributed.broadcast(buf, src=0)
                for p in model.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        torch.distributed.broadcast(p.data, src=0)
            for t in extra:
                torch.distributed.broadcast(t.data, src=0)

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def elastic_restart() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``): above 0,
    a worker died and the group was started again, and the run continues from its directory."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def init_from_env(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun described in the environment; single process otherwise.
    Returns the Dist and the device this rank trains on (cuda:LOCAL_RANK on GPUs)."""
    if not launched_by_torchrun():
        return SINGLE, device
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are missing: launch with torchrun or --nproc") from None
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        timeout = timedelta(minutes=30)
        # the store torchrun describes (env://), under a prefix of its own per restart: the keys the
        # group's ranks publish their addresses under would otherwise still hold the dead attempt's,
        # and the restarted ranks would dial those (gloo: "connectFullMesh failed ... refused")
        store, _, _ = next(torch.distributed.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        store = torch.distributed.PrefixStore(f"cascadec/attempt_{elastic_restart()}/", store)
        torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if rank != 0:
        progress.console.quiet = True  # one log, rank 0's: every rank computes the same numbers
        progress.set_enabled(False)
    return Dist(rank, world, local), device


def shutdown(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def relaunch_with_torchrun(nproc: int, args: list[str]) -> int:
    """``cascadec compress --nproc N ...``: run ``cascadec ARGS`` under torch.distributed.run
    with N local processes; returns torchrun's exit code (130 on Ctrl-C)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cascadec",
        *args,
    ]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def relaunch_compress(
    nproc: int,
    model: str,
    recipe: str,
    *,
    device: str,
    data: str | None = None,
    weights: str | None = None,
    out: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
) -> int:
    """``cascadec compress --nproc N``: the same compress on N local ranks, less ``--nproc``."""
    args = ["compress", model, "--recipe", recipe, "--device", device]
    for flag, value in (("--data", data), ("--weights", weights), ("--out", out)):
        if value is not None:
            args += [flag, str(value)]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args.append("--resume")
    return relaunch_with_torchrun(nproc, args)
