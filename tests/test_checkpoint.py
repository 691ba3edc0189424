"""Training checkpoints (cascadec.train.checkpoint) and the resumable sampler
(cascadec.data.sampler): exact round trips, atomic writes that survive SIGKILL, clear
errors for full disks and damaged files, and a data order a checkpoint can point into."""

from __future__ import annotations

import errno
import os
import random
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import kill_writer_midway

from cascadec.data.sampler import EpochBatchSampler, position
from cascadec.errors import UserError
from cascadec.train.checkpoint import NonFiniteState, load_checkpoint, rng_state, save_checkpoint, set_rng_state

REPO_ROOT = Path(__file__).resolve().parents[1]


def _trained_optimizers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    rms = torch.optim.RMSprop(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1 / (1 + step))
    for _ in range(3):
        loss = model(torch.randn(8, 4)).square().mean()
        sgd.zero_grad()
        rms.zero_grad()
        loss.backward()
        sgd.step()
        rms.step()
        sched.step()
    return model, sgd, rms, sched


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # key types (int keys of optimiser state) and order kept
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_optimiser_scheduler_and_model_state_round_trip_exactly(tmp_path) -> None:
    model, sgd, rms, sched = _trained_optimizers()
    state = {
        "model": model.state_dict(),
        "sgd": sgd.state_dict(),
        "rms": rms.state_dict(),
        "sched": sched.state_dict(),
        "epoch": 2,
        "step": 5,
        "history": [{"loss": 0.5, "teacher": None}],
        "scale": 3.25,
        "shape": (1, 2),
    }
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    # and the loaded dicts are accepted by torch as they are
    fresh_model, fresh_sgd, _, fresh_sched = _trained_optimizers()
    fresh_sgd.load_state_dict(loaded["sgd"])
    fresh_sched.load_state_dict(loaded["sched"])
    fresh_model.load_state_dict(loaded["model"])
    assert fresh_sgd.param_groups[0]["lr"] == sgd.param_groups[0]["lr"]


def test_rng_states_restore_the_same_random_numbers(tmp_path) -> None:
    path = tmp_path / "rng.safetensors"
    save_checkpoint(path, {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    set_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_missing_checkpoint_is_none_and_damaged_one_a_user_error(tmp_path) -> None:
    assert load_checkpoint(tmp_path / "none.safetensors") is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(bad)


def test_non_finite_state_never_replaces_the_last_good_checkpoint(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3), "step": 1})
    with pytest.raises(NonFiniteState, match="NaN/inf"):
        save_checkpoint(path, {"w": torch.tensor([1.0, float("nan"), 0.0]), "step": 2})
    assert load_checkpoint(path)["step"] == 1


def test_full_disk_is_a_user_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3), "step": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("cascadec.fileio.os.fsync", no_space)
    with pytest.raises(UserError, match="disk full") as info:
        save_checkpoint(path, {"w": torch.zeros(3), "step": 2})
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # the partial temp file is cleaned up


_WRITER = textwrap.dedent("""
    import sys, torch
    from cascadec.train.checkpoint import save_checkpoint
    path = sys.argv[1]
    i = 0
    while True:
        # 8 MB per write so that a kill often lands in the middle of one
        save_checkpoint(path, {"i": i, "values": torch.full((2_000_000,), float(i))})
        i += 1
""")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_sigkill_during_checkpoint_writes_leaves_a_complete_checkpoint(tmp_path, delay) -> None:
    """A writer saving in a loop is killed -9 at an arbitrary moment: what remains under the
    checkpoint's name is always one whole checkpoint, consistent with itself."""
    path = tmp_path / "c.safetensors"
    assert kill_writer_midway(_WRITER, path, path.exists, delay) == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["values"].shape == (2_000_000,)
    assert bool((state["values"] == float(state["i"])).all())


# ---------------------------------------------------------------- sampler


def _batches(sampler: EpochBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_data_order_is_a_function_of_seed_phase_and_epoch() -> None:
    a, b = EpochBatchSampler(40, 8, seed=3), EpochBatchSampler(40, 8, seed=3)
    a.set_epoch(2, "joint")
    b.set_epoch(2, "joint")
    assert _batches(a) == _batches(b)
    b.set_epoch(3, "joint")
    assert _batches(a) != _batches(b)
    b.set_epoch(2, "student")
    assert _batches(a) != _batches(b)
    assert len(a) == 5 and sorted(i for batch in _batches(a) for i in batch) == list(range(40))


def test_resuming_at_batch_k_yields_exactly_the_remaining_batches() -> None:
    full, resumed = EpochBatchSampler(50, 8, seed=0), EpochBatchSampler(50, 8, seed=0)
    full.set_epoch(1, "student")
    resumed.set_epoch(1, "student", start_batch=4)
    assert _batches(resumed) == _batches(full)[4:]
    assert len(resumed) == len(full) == 6  # drop_last: 50 // 8


def test_ranks_split_every_global_batch() -> None:
    single = EpochBatchSampler(48, 8, seed=1)
    ranks = [EpochBatchSampler(48, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(0, "joint", start_batch=1)
    for whole, half0, half1 in zip(_batches(single), _batches(ranks[0]), _batches(ranks[1])):
        assert len(half0) == len(half1) == 4 and half0 + half1 == whole
    with pytest.raises(UserError, match="divisible"):
        EpochBatchSampler(48, 7, seed=0, world_size=2)


def test_plain_loaders_cannot_resume_mid_epoch() -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    assert position(loader, 0, "joint") == 0
    with pytest.raises(UserError, match="mid-epoch"):
        position(loader, 0, "joint", start_batch=1)
