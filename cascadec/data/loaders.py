"""From a recipe's ``data`` section to the three loaders every stage trains and decides on.

``train`` to learn from, ``selection`` (held-out training images) for every decision, ``val``
(the test split) for the reported accuracy only; see :func:`cascadec.data.registry.build_data`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from cascadec.data.bundle import DataBundle
from cascadec.data.registry import build_data
from cascadec.data.sampler import EpochBatchSampler
from cascadec.recipe import Recipe
from cascadec.train.distributed import SINGLE, Dist


def load_data(recipe: Recipe) -> DataBundle:
    """The recipe's data set, with its selection split held out."""
    d = recipe.data
    return build_data(
        d.name,
        d.root,
        image_size=d.image_size,
        train_limit=d.train_limit,
        val_limit=d.val_limit,
        selection_size=d.selection_size,
        seed=recipe.train.seed,
        download=d.download,
        **d.options,
    )


def loader_workers(setting: int | str, processes_per_node: int = 1) -> int:
    """``data.workers``; "auto" gives each training process an equal share of this machine's
    CPUs, less one for the process itself, at most 8 (more rarely helps decoding-bound loaders)."""
    if setting != "auto":
        return int(setting)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, processes_per_node) - 1))


class Loaders(NamedTuple):
    """``train`` to learn from, ``selection`` (held-out training images) for every decision,
    ``val`` (the test split) for the reported accuracy only."""

    train: DataLoader
    val: DataLoader
    selection: DataLoader


def make_loaders(bundle: DataBundle, recipe: Recipe, device: torch.device, dist: Dist | None = None) -> Loaders:
    """Training batches come from an EpochBatchSampler: their order is a function of (seed,
    phase, epoch), so checkpoints can record the position and resume without replaying data,
    and in a distributed run each rank takes its slice of every global batch. Every rank
    evaluates the whole validation set (identical models give identical accuracies, so
    decisions such as teacher promotion agree without communication)."""
    dist = dist or SINGLE
    workers = loader_workers(recipe.data.workers, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        common["persistent_workers"] = True
    batch = recipe.data.batch_size
    sampler = EpochBatchSampler(
        len(bundle.train),
        batch,
        seed=recipe.train.seed,
        shuffle=True,
        drop_last=len(bundle.train) > batch,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    train = DataLoader(bundle.train, batch_sampler=sampler, **common)
    val = DataLoader(bundle.val, batch_size=batch, shuffle=False, **common)
    selection = DataLoader(
        bundle.selection if bundle.selection is not None else bundle.val, batch_size=batch, shuffle=False, **common
    )
    return Loaders(train, val, selection)


def model_kwargs(recipe: Recipe, bundle_or_shape: Any) -> dict[str, Any]:
    """The constructor arguments the data decides (classes, input channels), unless the recipe fixes them."""
    num_classes = recipe.model.num_classes or bundle_or_shape.num_classes
    in_channels = recipe.model.in_channels or bundle_or_shape.in_channels
    kwargs: dict[str, Any] = {"num_classes": int(num_classes), "in_channels": int(in_channels)}
    if recipe.model.options:  # stored with the student, so a fresh process builds the same network
        kwargs["options"] = dict(recipe.model.options)
    return kwargs
