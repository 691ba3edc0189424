"""The teacher: the pretrained network the recipe names, or one cascadec trains and caches.

Recipes whose model has no pretrained weights (the offline demo) get a teacher trained by
plain supervised learning; it is cached under ``$CASCADEC_CACHE/teachers`` (default
``~/.cache/cascadec``), keyed by everything that decides its weights, so a second run of the
same recipe starts from the same teacher in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from cascadec import locks
from cascadec.data.bundle import DataBundle
from cascadec.data.loaders import Loaders, model_kwargs
from cascadec.distill.losses import DistillLoss
from cascadec.errors import first_line
from cascadec.fileio import replacing
from cascadec.models import create_model
from cascadec.progress import log
from cascadec.prune.spec import state_dict_for_safetensors
from cascadec.recipe import Recipe
from cascadec.train.loop import cosine_schedule, make_optimizer, steps_in, train_epoch
from cascadec.train.runtime import Runtime


def cache_root() -> Path:
    return Path(os.environ.get("CASCADEC_CACHE", Path.home() / ".cache" / "cascadec"))


def cache_key(recipe: Recipe, kwargs: dict) -> str:
    """Everything that decides a trained teacher's weights; not the worker count or downloads."""
    payload = json.dumps(
        {
            "model": recipe.model.name,
            "kwargs": kwargs,
            "data": recipe.data.model_dump(exclude={"workers", "download"}),
            "teacher": recipe.teacher.model_dump(exclude={"cache"}),
            "seed": recipe.train.seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_path(recipe: Recipe, kwargs: dict) -> Path:
    return cache_root() / "teachers" / f"{recipe.model.name}-{recipe.data.name}-{cache_key(recipe, kwargs)}.safetensors"


def train_teacher(
    model: nn.Module, recipe: Recipe, train: DataLoader, device: torch.device, runtime: Runtime | None = None
) -> None:
    """Plain supervised training, for recipes whose model has no pretrained weights. It is
    short and cached, so it is not checkpointed: an interrupted teacher stage starts over."""
    t = recipe.teacher
    opt = make_optimizer(
        model.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=recipe.train.weight_decay
    )
    steps = steps_in(train, recipe.train.max_steps_per_epoch)
    sched = cosine_schedule(opt, t.train_epochs * steps)
    ce = DistillLoss(ce_weight=1.0, kd_weight=0.0)
    for epoch in range(t.train_epochs):
        stats = train_epoch(
            model,
            train,
            opt,
            sched,
            lambda lg, y, _t: ce(lg, y),
            device=device,
            description=f"teacher epoch {epoch}",
            max_steps=recipe.train.max_steps_per_epoch,
            epoch=epoch,
            runtime=runtime,
        )
        log(f"teacher epoch {epoch}: loss {stats['loss']:.4f}, {stats['images_per_s']:.0f} images/s")


def obtain_teacher(
    recipe: Recipe,
    bundle: DataBundle,
    loaders: Loaders,
    device: torch.device,
    *,
    runtime: Runtime | None = None,
    write_cache: bool = True,
) -> tuple[nn.Module, str]:
    """The teacher in eval mode on ``device`` and where it came from (weights, cache, training).

    A cache entry has one writer at a time: a second process that needs the same teacher waits
    for the first and loads what it wrote instead of training it again. A damaged entry (a
    crash of an older version, a full disk) is named, retrained and replaced. Ranks of a
    distributed run train together, so only a single process takes the cache lock."""
    kwargs = model_kwargs(recipe, bundle)
    model = create_model(recipe.model.name, weights=recipe.model.weights, **kwargs).to(device)
    if recipe.model.weights:
        return model.eval(), recipe.model.weights
    if recipe.teacher.train_epochs <= 0:
        log(
            "[yellow]teacher has random weights (no model.weights, teacher.train_epochs 0): "
            "accuracy numbers will be meaningless[/]"
        )
        return model.eval(), "random init"
    if not recipe.teacher.cache:
        return _train(model, recipe, bundle, loaders, device, runtime), _trained(recipe)
    cached = cache_path(recipe, kwargs)
    single = runtime is None or not runtime.dist.active
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        single = write_cache = False  # an unwritable cache is used read-only, never locked
    guard = (
        locks.waiting(cached.with_name(cached.name + ".lock"), what=f"teacher cache {cached}")
        if single
        else contextlib.nullcontext()
    )
    with guard:
        locks.hold_point("teacher-cache")
        if cached.is_file() and _load_cached(model, cached):
            return model.eval(), f"cache {cached}"
        _train(model, recipe, bundle, loaders, device, runtime)
        if write_cache:
            try:
                with replacing(cached) as tmp:  # a crash never leaves a half-written entry behind
                    save_file(state_dict_for_safetensors(model), str(tmp))
            except OSError:
                log(f"teacher: could not write cache {cached}; continuing")
    return model.eval(), _trained(recipe)


def _trained(recipe: Recipe) -> str:
    return f"trained by cascadec ({recipe.teacher.train_epochs} epochs)"


def _train(
    model: nn.Module,
    recipe: Recipe,
    bundle: DataBundle,
    loaders: Loaders,
    device: torch.device,
    runtime: Runtime | None,
) -> nn.Module:
    log(f"teacher: no weights given; training {recipe.teacher.train_epochs} epoch(s) on {bundle.name}")
    train_teacher(model, recipe, loaders.train, device, runtime=runtime)
    return model


def _load_cached(model: nn.Module, cached: Path) -> bool:
    """Load a cache entry into ``model``; False (and a line saying why) when it is damaged."""
    try:
        model.load_state_dict(load_file(str(cached)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        log(f"teacher: cache {cached} is damaged ({first_line(exc)}); training the teacher again")
        return False
    log(f"teacher: loaded from cache {cached}")
    return True
