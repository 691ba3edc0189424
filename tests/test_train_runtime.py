"""The training runtime's recipe keys and machine-dependent choices: checkpoint interval,
mixed precision, memory format, DataLoader sizing, and what happens to them on a CPU."""

from __future__ import annotations

import pytest
import torch

from cascadec.data.loaders import loader_workers, make_loaders
from cascadec.data.sampler import EpochBatchSampler
from cascadec.errors import UserError
from cascadec.recipe import load_recipe
from cascadec.train.runtime import Runtime


def _user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_new_train_keys_default_to_the_old_behaviour() -> None:
    t = load_recipe("fmnist_quick").train
    assert (t.checkpoint_every_steps, t.amp, t.channels_last) == (None, "none", False)
    assert (t.grad_sync, t.grad_bucket_mb) == ("overlap", 25.0)  # DDP's way and bucket size
    assert load_recipe("fmnist_quick").data.workers == 0


@pytest.mark.parametrize(
    "override, attr, value",
    [
        ("train.checkpoint_every_steps=50", "checkpoint_every_steps", 50),
        ("train.amp=bf16", "amp", "bf16"),
        ("train.amp=fp16", "amp", "fp16"),
        ("train.channels_last=true", "channels_last", True),
        ("train.grad_sync=after-backward", "grad_sync", "after-backward"),
        ("train.grad_bucket_mb=4", "grad_bucket_mb", 4.0),
    ],
)
def test_train_keys_are_accepted(override, attr, value) -> None:
    assert getattr(load_recipe("fmnist_quick", [override]).train, attr) == value


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps"),
        ("train.amp=fp8", "train.amp"),
        ("train.channels_last=maybe", "train.channels_last"),
        ("train.grad_sync=ddp", "train.grad_sync"),
        ("train.grad_bucket_mb=0", "train.grad_bucket_mb"),
        ("data.workers=many", "data.workers"),
        ("data.workers=-1", "data.workers"),
    ],
)
def test_bad_values_name_the_key(override, key) -> None:
    assert f": {key}" in _user_error(load_recipe, "fmnist_quick", [override])


def test_workers_auto_is_sized_from_the_cpus(monkeypatch) -> None:
    assert load_recipe("fmnist_quick", ["data.workers=auto"]).data.workers == "auto"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers("auto") == 8  # capped
    assert loader_workers("auto", processes_per_node=4) == 3  # a share of the CPUs, one kept for the process
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_workers("auto") == 0  # one CPU: load in the main process
    assert loader_workers(5) == 5


def test_loaders_use_the_resumable_sampler_and_workers(monkeypatch) -> None:
    from cascadec.data.synthetic import build

    bundle = build(None, image_size=8, download=False, seed=0, train_size=40, val_size=8)
    recipe = load_recipe("fmnist_quick", ["data.batch_size=8", "data.workers=1"])
    train, val, _ = make_loaders(bundle, recipe, torch.device("cpu"))
    assert isinstance(train.batch_sampler, EpochBatchSampler) and len(train) == 5
    assert train.num_workers == 1 and train.persistent_workers and not train.pin_memory
    images, labels = next(iter(train))
    assert images.shape == (8, bundle.in_channels, 8, 8) and labels.shape == (8,)


def test_amp_and_channels_last_fall_back_to_float32_on_cpu(capsys) -> None:
    runtime = Runtime(device=torch.device("cpu"), amp="fp16", channels_last=True)
    assert (runtime.amp, runtime.channels_last, runtime.scaler) == ("none", False, None)
    assert "needs CUDA" in capsys.readouterr().err
    with pytest.raises(UserError, match="train.amp"):
        Runtime(device=torch.device("cpu"), amp="int4")


def test_the_recipe_reaches_the_runtime_and_one_process_never_overlaps() -> None:
    """``Runtime.for_recipe`` carries the gradient-sync keys; with one rank there is nothing to
    average, so no hooks are installed."""
    train = load_recipe("fmnist_quick", ["train.grad_sync=after-backward", "train.grad_bucket_mb=2"]).train
    runtime = Runtime.for_recipe(train, torch.device("cpu"))
    assert (runtime.grad_sync, runtime.grad_bucket_mb) == ("after-backward", 2.0)
    one = Runtime(device=torch.device("cpu"))
    weight = torch.nn.Parameter(torch.ones(2))
    with one.overlapped_sync([weight]):
        assert one._sync is None
    with pytest.raises(UserError, match="train.grad_sync"):
        Runtime(device=torch.device("cpu"), grad_sync="ddp")
