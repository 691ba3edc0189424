"""Overlapped gradient sync (cascadec.train.grad_sync) against today's after-backward average,
on two real gloo processes: the same gradients bit for bit, buckets launched while the
backward pass still runs, and a tensor that leaves the step (frozen scores) left alone."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import grad_sync_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_sync")
    mp.spawn(grad_sync_worker.run, args=(2, str(out), _free_port()), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_overlapped_buckets_give_the_after_backward_gradients_bit_for_bit(ranks) -> None:
    for rank in ranks:
        assert len(rank["after"]) == len(rank["overlap"]) == 4
        for after, overlap in [*zip(rank["after"], rank["overlap"]), *zip(rank["after"], rank["one-bucket"])]:
            assert after.keys() == overlap.keys()
            for name in after:
                if after[name] is None:
                    assert overlap[name] is None, name
                else:
                    assert torch.equal(after[name], overlap[name]), name
    for name, grad in ranks[0]["overlap"][-1].items():  # and both ranks hold the same average
        other = ranks[1]["overlap"][-1][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name


def test_buckets_launch_during_backward_after_the_first_step(ranks) -> None:
    for rank in ranks:
        assert rank["overlap-buckets"] >= 3 and rank["overlap-hooks"] == 7  # one per tensor, kept
        assert rank["early"][0] == 0  # the first step learns the order, averaging after backward
        assert all(n >= 1 for n in rank["early"][1:]), rank["early"]


def test_a_tensor_left_out_of_the_step_keeps_its_own_gradient(ranks) -> None:
    """Step 2 uses the score but leaves it out of the average: each rank keeps its own
    gradient, as after-backward averaging leaves it. Step 3 does not use it (frozen masks), and
    the unused branch never gets a gradient: neither blocks the buckets."""
    own = [rank["overlap"][2]["score"] for rank in ranks]
    assert not torch.equal(own[0], own[1])
    assert torch.equal(ranks[0]["overlap"][1]["score"], ranks[1]["overlap"][1]["score"])  # averaged
    for rank in ranks:
        assert rank["overlap"][3]["score"] is None
        assert all(step["unused.weight"] is None for step in rank["overlap"])


def test_gradients_that_fit_one_bucket_are_averaged_after_backward_without_hooks(ranks) -> None:
    """Nothing could overlap: the hooks come off after the first step (same gradients, above)."""
    for rank in ranks:
        assert rank["one-bucket-buckets"] == 1 and rank["one-bucket-hooks"] == 0


# ------------------------------------------------------------------ one process, collectives recorded


class _Done:
    def wait(self) -> None:
        pass


@pytest.fixture
def recorded(monkeypatch):
    """torch.distributed's all-reduce and object broadcast replaced by recorders (identities)."""
    launched: list[int] = []

    def all_reduce(tensor, async_op=False):
        launched.append(tensor.numel())
        return _Done() if async_op else None

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src=0: None)
    return launched


def _tensors(*sizes: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(n)) for n in sizes]


def _arrive(sync, params, order) -> None:
    for i in order:  # what autograd's hooks do, in the order given
        params[i].grad = torch.ones_like(params[i])
        sync._ready(params[i])


def test_buckets_are_sent_in_index_order_whatever_order_the_gradients_arrive_in(recorded) -> None:
    """Every rank must issue the same collectives in the same order; a rank whose gradients
    arrive in another order (another thread timing, another device) still sends bucket 0 first."""
    from cascadec.train.distributed import Dist
    from cascadec.train.grad_sync import OverlappedGradSync

    params = _tensors(10, 20, 30, 40)
    sync = OverlappedGradSync(params, Dist(0, 2, 0), bucket_mb=1e-6, first_bucket_mb=1e-6)  # one tensor each
    sync.begin(params)
    _arrive(sync, params, [0, 1, 2, 3])  # the first step learns this order
    sync.finish()
    assert [b.members for b in sync.buckets] == [[0], [1], [2], [3]]
    recorded.clear()
    sync.begin(params)
    _arrive(sync, params, [3, 1])
    assert recorded == []  # bucket 0 is not ready: nothing may leave before it
    _arrive(sync, params, [0])
    assert recorded == [10, 20]
    _arrive(sync, params, [2])
    assert recorded == [10, 20, 30, 40]
    sync.finish()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)  # the sum over 1 "rank" / 2


def test_a_gradient_accumulated_again_after_its_bucket_left_is_refused(recorded) -> None:
    from cascadec.train.distributed import Dist
    from cascadec.train.grad_sync import OverlappedGradSync

    params = _tensors(10, 20)
    sync = OverlappedGradSync(params, Dist(0, 2, 0), bucket_mb=1e-6, first_bucket_mb=1e-6)
    sync.begin(params)
    _arrive(sync, params, [0, 0, 1])  # a repeat while learning the order is harmless
    sync.finish()
    sync.begin(params)
    _arrive(sync, params, [0])
    with pytest.raises(RuntimeError, match="after-backward"):
        _arrive(sync, params, [0])


def test_frozen_tensors_are_left_out_and_foreign_ones_fall_back_to_after_backward(recorded) -> None:
    from cascadec.train.distributed import Dist
    from cascadec.train.runtime import Runtime

    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    weight, other = _tensors(4, 5)
    runtime = Runtime(device=torch.device("cpu"), dist=Dist(0, 2, 0))
    with runtime.overlapped_sync([frozen, weight]):  # registering a frozen tensor raised before
        sync = runtime._sync
        assert sync is not None and sync.params == [weight] and sync.covers([frozen, weight])
        assert not sync.covers([other])
        (other * 2).sum().backward()
        recorded.clear()
        runtime.backward_step((other * 3).sum(), [], [other])  # not this epoch's tensors: one piece, after
        assert recorded == [5] and sync._expected == set()
