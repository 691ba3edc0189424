"""Gradient averaging that overlaps the backward pass: DistributedDataParallel's bucketed
all-reduce (Li et al., "PyTorch Distributed", VLDB 2020), for parameters DDP cannot wrap.

The cascade trains several models that share conv weights and learns mask scores outside any
module, so it cannot hand its models to ``DistributedDataParallel``. ``Dist.sync_grads``
averages every gradient in one all-reduce after ``backward``: correct, but the network waits
for the whole backward pass before any byte moves. ``OverlappedGradSync`` does what DDP's
reducer does instead, for any set of leaf tensors:

* a post-accumulate-grad hook on each tensor marks its gradient ready (autograd fires it once
  per ``backward``, after the contributions of every use of a shared weight are summed);
* the tensors are packed into buckets (the first ``first_bucket_mb``, then ``bucket_mb`` each,
  DDP's 1 MB and 25 MB by default), in the order their gradients became ready on the first
  step (rank 0's order, broadcast, so every rank packs alike: DDP's bucket rebuild);
* as soon as a bucket's gradients are all ready it is flattened and all-reduced asynchronously,
  while autograd computes the rest; buckets are launched strictly in index order, so every
  rank issues the same collectives in the same order whatever its thread timing;
* ``finish`` launches what is left (a bucket some of whose tensors got no gradient this step:
  which ones is structural, the same on every rank), waits, and writes the averages back.

The first step of each ``OverlappedGradSync`` averages in one piece after ``backward`` (as
``sync_grads``) while it learns the order; so does every step when all gradients fit one
bucket (a small network: nothing could overlap, and the hooks are removed). The sum of two ranks' float gradients does not
depend on how they are packed, so the updates equal ``sync_grads``' bit for bit on two ranks
(tests/test_grad_sync.py); with more ranks the reduction order inside the collective may differ
in the last bit, as DDP's does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cascadec.train.distributed import Dist

MB = 1 << 20


@dataclass
class _Bucket:
    members: list[int]  # indices into OverlappedGradSync.params
    expected: list[int] = field(default_factory=list)  # members that take part in this step
    ready: int = 0


@dataclass
class _InFlight:
    work: object | None
    flat: torch.Tensor
    grads: list[torch.Tensor]


class OverlappedGradSync:
    """Bucketed asynchronous gradient averaging for ``params`` across ``dist``'s ranks.

    Use: ``begin(step_params)`` before ``backward`` (the subset that steps this time: the
    cascade's scores stop stepping once the masks freeze), ``finish()`` after it, ``close()``
    at the end (removes the hooks; also a context manager)."""

    def __init__(
        self, params: Sequence[torch.Tensor], dist: Dist, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0
    ) -> None:
        unique: dict[int, torch.Tensor] = {}
        for p in params:
            if p.requires_grad and p.is_leaf:  # a frozen tensor never gets a gradient to average
                unique.setdefault(id(p), p)
        self.params = list(unique.values())
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.dist = dist
        self.bucket_bytes = max(int(bucket_mb * MB), 1)
        self.first_bucket_bytes = max(int(first_bucket_mb * MB), 1)
        self.buckets: list[_Bucket] | None = None  # built after the first step
        self.bucket_of: dict[int, int] = {}
        self._order: list[int] = []  # the first step's ready order
        self._armed = False
        self._expected: set[int] = set()
        self._arrived: set[int] = set()
        self._lock = threading.Lock()  # hooks may fire on several autograd threads (several devices)
        self._next = 0
        self._flights: list[_InFlight] = []
        self.early_launches = 0  # buckets launched while backward still ran (observability, tests)
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    # ------------------------------------------------------------ one step
    def covers(self, step_params: Sequence[torch.Tensor]) -> bool:
        """Whether every tensor of ``step_params`` that can have a gradient was registered here."""
        return all(id(p) in self.index for p in step_params if p.requires_grad and p.is_leaf)

    def begin(self, step_params: Sequence[torch.Tensor]) -> None:
        """Arm the hooks for one ``backward``; ``step_params`` are the tensors to average (a subset
        of those registered: the caller checks ``covers``; frozen ones are ignored)."""
        self._expected = {self.index[id(p)] for p in step_params if id(p) in self.index}
        self._arrived = set()
        self._next, self._flights, self._armed = 0, [], not self.single_bucket
        if self.buckets is not None:
            for bucket in self.buckets:
                bucket.expected = [i for i in bucket.members if i in self._expected]
                bucket.ready = 0

    def _ready(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        i = self.index[id(param)]
        if i not in self._expected:
            return
        with self._lock:
            if i in self._arrived:  # a second accumulation in one backward (reentrant checkpointing)
                if self.buckets is not None and self.bucket_of[i] < self._next:
                    raise RuntimeError(
                        "train.grad_sync overlap: a gradient was accumulated again after its bucket was "
                        "sent (a second backward through the same weights in one step); use "
                        "train.grad_sync: after-backward"
                    )
                return
            self._arrived.add(i)
            if self.buckets is None:
                self._order.append(i)
                return
            self.buckets[self.bucket_of[i]].ready += 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch, in index order, every bucket whose expected gradients have all arrived."""
        assert self.buckets is not None
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.ready < len(bucket.expected):
                return
            self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [g for g in (self.params[i].grad for i in bucket.expected) if g is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        work = torch.distributed.all_reduce(flat, async_op=True)
        self.early_launches += self._armed
        self._flights.append(_InFlight(work, flat, grads))

    def finish(self) -> None:
        """After ``backward``: launch the rest, wait, write the averages into ``.grad``."""
        self._armed = False
        if self.buckets is None or self.single_bucket:  # first step (learning the order), or one bucket
            self.dist.sync_grads([self.params[i] for i in sorted(self._expected)])
            if self.buckets is None:
                self._build_buckets()
            return
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for flight in self._flights:
            if flight.work is not None:
                flight.work.wait()
            flight.flat /= self.dist.world_size
            offset = 0
            for g in flight.grads:
                g.copy_(flight.flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self._flights = []

    # ------------------------------------------------------------ buckets
    def _build_buckets(self) -> None:
        seen = set(self._order)
        order = self._order + [i for i in reversed(range(len(self.params))) if i not in seen]
        order = self.dist.broadcast_object(order)  # rank 0's: every rank must pack alike
        buckets: list[_Bucket] = []
        current: list[int] = []
        size, cap = 0, self.first_bucket_bytes
        for i in order:
            current.append(i)
            size += self.params[i].numel() * 4  # flattened as float32
            if size >= cap:
                buckets.append(_Bucket(current))
                current, size, cap = [], 0, self.bucket_bytes
        if current:
            buckets.append(_Bucket(current))
        self.buckets = buckets
        self.bucket_of = {i: b for b, bucket in enumerate(buckets) for i in bucket.members}
        if len(buckets) == 1:  # nothing to overlap: average after backward, as sync_grads, without hooks
            self._remove_hooks()

    # ------------------------------------------------------------ lifetime
    @property
    def single_bucket(self) -> bool:
        """All gradients fit one bucket (a small network): averaged after backward, no hooks."""
        return self.buckets is not None and len(self.buckets) == 1

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Remove the hooks (a gradient still in flight after an error is dropped)."""
        self._remove_hooks()
        self._flights, self._armed = [], False

    def __enter__(self) -> OverlappedGradSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
