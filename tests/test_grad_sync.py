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
