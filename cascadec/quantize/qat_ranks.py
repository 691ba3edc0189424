"""QAT on every rank of a torchrun job: rank 0 decides, every rank trains.

After the prune stage, rank 0 alone exports, verifies, profiles and runs the quantize stage's
PTQ and sensitivity pass, which on ImageNet can take longer than the job's collectives wait
(30 minutes). The other ranks wait for it on a gloo group of their own whose timeout is
``WAIT_TIMEOUT``. When a flavour needs QAT, rank 0 sends them the job
(:class:`~cascadec.quantize.qat.QatJob`); every rank trains it in data parallel through the one
training loop (sharded batches, averaged gradients, rank 0 writing the checkpoints); then rank 0
goes on alone with the export and the others wait for the next job, or for the word that there
is none. Under torchrun a rank that dies takes the others down with it, so the long wait cannot
outlive rank 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from cascadec.errors import UserError
from cascadec.quantize.calibration import sample_images
from cascadec.quantize.qat import QatInputs, QatJob, images_digest, train_job
from cascadec.run import RunDir
from cascadec.train.distributed import Dist

WAIT_TIMEOUT = timedelta(hours=24)  # how long the other ranks wait for rank 0's solo stages


@dataclass
class QatRanks:
    """A torchrun job's channel for QAT jobs: rank 0 sends (:meth:`sending`, :meth:`close`), the
    others :meth:`receive` (through :func:`follow`)."""

    dist: Dist
    device: torch.device
    group: Any = field(repr=False)
    training: bool = False  # rank 0 is inside a job: the others are training, not waiting
    closed: bool = False

    @classmethod
    def open(cls, dist: Dist, device: torch.device, wants_qat: bool) -> QatRanks | None:
        """Every rank calls this at the same point (creating a group is collective); None where
        there is one process or the recipe never fine-tunes under quantization."""
        if not dist.active or not wants_qat:
            return None
        return cls(dist, device, torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT))

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def _broadcast(self, job: QatJob | None) -> QatJob | None:
        holder: list[QatJob | None] = [job]
        torch.distributed.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    @contextmanager
    def sending(self, job: QatJob) -> Iterator[None]:
        """Rank 0: the others start ``job`` as this block starts; the block trains rank 0's share."""
        self._broadcast(job)
        self.training = True
        yield
        self.training = False

    def close(self) -> None:
        """Rank 0: no more jobs. Not sent while a job is in flight (the others are then in the
        job's collectives and fail with it)."""
        if not self.closed and not self.training:
            self._broadcast(None)
        self.closed = True

    def receive(self) -> QatJob | None:
        return self._broadcast(None)


def follow(ranks: QatRanks, qat: QatInputs, run: RunDir) -> int:
    """Ranks other than 0: train every job rank 0 sends, until it says there are no more;
    returns how many jobs ran."""
    done = 0
    while (job := ranks.receive()) is not None:
        images = sample_images(qat.bundle.train, job.images, seed=job.seed)
        if images_digest(images) != job.images_digest:
            raise UserError(
                f"rank {ranks.dist.rank}: the calibration images differ from rank 0's; every rank must read "
                "the same training split"
            )
        train_job(job, qat, images, run)
        done += 1
    return done
