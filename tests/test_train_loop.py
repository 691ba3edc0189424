"""The one training loop (cascadec.train.loop.train_epoch): an epoch stopped mid-way and resumed
from its checkpoint ends where the uninterrupted epoch ends, and the two loss averages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from cascadec.data.sampler import EpochBatchSampler
from cascadec.train.loop import cosine_schedule, make_optimizer, train_epoch
from cascadec.train.runtime import Runtime

CPU = torch.device("cpu")


def _data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _setup(steps_total: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = make_optimizer(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return model, opt, cosine_schedule(opt, steps_total)


def _ce(logits, labels, _teacher):
    return nn.functional.cross_entropy(logits, labels)


def test_an_epoch_stopped_mid_way_resumes_to_the_same_end() -> None:
    data = _data()
    loader = DataLoader(data, batch_sampler=EpochBatchSampler(len(data), 8, seed=3))  # 5 steps
    teacher = nn.Linear(6, 3).eval()
    kwargs = dict(device=CPU, teacher=teacher, epoch=1, phase="student", loss_per="step", where="student phase")

    model, opt, sched = _setup(5)
    reference = train_epoch(model, loader, opt, sched, _ce, runtime=Runtime(CPU), **kwargs)
    assert reference["steps"] == 5 and reference["images"] == 40

    # stop (as Ctrl-C does) after the third step: the callback saves, then the epoch raises
    model_b, opt_b, sched_b = _setup(5)
    runtime = Runtime(CPU)
    calls = {"n": 0}

    def stopping_loss(logits, labels, teacher_logits):
        calls["n"] += 1
        runtime.stop.requested = calls["n"] == 3
        return _ce(logits, labels, teacher_logits)

    saved = []

    def save(epoch, step, partial):
        saved.append(
            (
                epoch,
                step,
                partial,
                copy.deepcopy(model_b.state_dict()),
                copy.deepcopy(opt_b.state_dict()),
                sched_b.state_dict(),
            )
        )

    with pytest.raises(KeyboardInterrupt):
        train_epoch(model_b, loader, opt_b, sched_b, stopping_loss, runtime=runtime, save=save, **kwargs)
    assert [(e, s) for e, s, *_ in saved] == [(1, 3)]
    _, step, partial, state, opt_state, sched_state = saved[0]
    assert set(partial) == {"loss_sum", "steps", "images", "seconds"}
    assert (partial["steps"], partial["images"]) == (3, 24)

    # resume in fresh objects from what was saved
    model_c, opt_c, sched_c = _setup(5)
    model_c.load_state_dict(state)
    opt_c.load_state_dict(opt_state)
    sched_c.load_state_dict(sched_state)
    resumed = train_epoch(
        model_c, loader, opt_c, sched_c, _ce, runtime=Runtime(CPU), start_step=step, partial=partial, **kwargs
    )
    for (name, a), b in zip(model.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed["loss"] == reference["loss"]
    assert (resumed["steps"], resumed["images"]) == (5, 40)
    assert resumed["seconds"] >= partial["seconds"]


def test_mid_epoch_checkpoints_follow_the_runtime_interval() -> None:
    data = _data()
    loader = DataLoader(data, batch_sampler=EpochBatchSampler(len(data), 8, seed=3))  # 5 steps
    model, opt, sched = _setup(5)
    steps = []
    train_epoch(
        model,
        loader,
        opt,
        sched,
        _ce,
        device=CPU,
        runtime=Runtime(CPU, checkpoint_every_steps=2),
        save=lambda epoch, step, partial: steps.append(step),
    )
    assert steps == [2, 4]  # the epoch-end checkpoint is the caller's


def test_loss_per_image_and_per_step() -> None:
    data = _data(20)
    loader = DataLoader(data, batch_size=8)  # batches of 8, 8, 4
    results = {}
    for per in ("image", "step"):
        model, opt, sched = _setup(3)
        losses = []

        def recording(logits, labels, teacher_logits):
            value = _ce(logits, labels, teacher_logits)
            losses.append((value.item(), labels.numel()))  # noqa: B023 - called within this iteration
            return value

        results[per] = train_epoch(model, loader, opt, sched, recording, device=CPU, loss_per=per)["loss"], losses
    (by_image, losses), (by_step, same) = results["image"], results["step"]
    assert losses == same  # the same training either way; only the average differs
    assert by_image == pytest.approx(sum(v * n for v, n in losses) / 20)
    assert by_step == pytest.approx(sum(v for v, _ in losses) / 3)
    assert by_image != pytest.approx(by_step)
