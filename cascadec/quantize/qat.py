"""Quantization-aware fine-tuning with KD, for students PTQ and the sensitivity pass leave short.

The student, BatchNorms folded, trains under fake quantization at the INT8 graph's points
(``quantize/fake_quant.py``) with KD from the teacher in the one training loop
(``train.loop.train_epoch``): checkpoints at epoch ends, every ``train.checkpoint_every_steps``
and on Ctrl-C (``RUN/checkpoints/qat.<flavour>.safetensors``, resumed when the stage runs again
on the same inputs), and the teacher's logits computed once where the images are not augmented.
The fake quantizers are then removed and the fine-tuned float weights go through the same PTQ
export as before, so QAT and PTQ ship the same kinds of file. Residual adds (quantized in the
ONNX Runtime graph) are not modelled here. Under torchrun every rank trains it in data parallel
(``quantize/qat_ranks.py`` carries the job from rank 0 to the others); one process trains it on
the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cascadec.backends.onnx_export import export_onnx
from cascadec.data.bundle import DataBundle
from cascadec.data.sampler import EpochBatchSampler
from cascadec.distill.logit_cache import LogitCache
from cascadec.distill.losses import DistillLoss
from cascadec.progress import log
from cascadec.quantize.fake_quant import COMPUTE, FakeQuant, calibrate_ranges, fold_batchnorm
from cascadec.quantize.flavours import Flavour
from cascadec.quantize.ptq import compute_nodes, prepare, quantize_int8
from cascadec.quantize.sensitivity import onnx_accuracy
from cascadec.recipe import QuantizeSection, Recipe
from cascadec.run import CHECKPOINTS, RunDir
from cascadec.train.checkpoint import rng_state, set_rng_state
from cascadec.train.distributed import SINGLE, Dist
from cascadec.train.loop import cosine_schedule, make_optimizer, train_epoch
from cascadec.train.runtime import Runtime

if TYPE_CHECKING:
    from cascadec.quantize.qat_ranks import QatRanks


def qat_finetune(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    images: np.ndarray,
    *,
    signed: bool,
    float_layers: Sequence[str] = (),
    epochs: int = 1,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss: DistillLoss | None = None,
    runtime: Runtime | None = None,
    max_steps: int | None = None,
    weight_levels: int = 127,
    checkpoint: str | None = None,
    key: str = "",
    cache_logits: bool = True,
) -> tuple[nn.Module, dict]:
    """A BN-folded copy of ``student`` fine-tuned under fake quantization with KD from
    ``teacher``; returns it (fake quantizers removed, float weights) and the epochs' records.
    ``weight_levels``: 127 for 8-bit weights, 64 where the export takes ``reduce_range``.

    With a checkpointing ``runtime`` and a ``checkpoint`` name, the state is saved at every epoch
    end, every ``train.checkpoint_every_steps`` steps and on Ctrl-C (then KeyboardInterrupt), and a
    saved state whose ``key`` (what it was trained from) matches is resumed, mid-epoch included;
    one with another key is ignored. Resuming mid-epoch needs ``loader`` from an
    ``EpochBatchSampler`` (:func:`qat_loader`). ``cache_logits``: the teacher's logits computed
    once where the images are not augmented (cascadec.distill.logit_cache)."""
    import copy

    runtime = runtime or Runtime(torch.device("cpu"))
    device = runtime.device
    model = copy.deepcopy(student).cpu().eval()
    example = torch.from_numpy(images[:2])
    folded = fold_batchnorm(model, example)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPUTE) and n not in set(float_layers)]
    ranges = calibrate_ranges(model, images, names)
    quant = FakeQuant(model, ranges, signed, weight_levels)
    model.to(device)
    teacher = teacher.to(device).eval()
    optimizer = make_optimizer(
        model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    steps = min(len(loader), max_steps) if max_steps else len(loader)
    scheduler = cosine_schedule(optimizer, steps * epochs)
    records: list[dict] = []
    first_epoch, first_step, partial = 0, 0, {}
    state = runtime.load(checkpoint) if checkpoint else None
    if state is not None and state.get("key") != key:
        log(f"QAT: {checkpoint} checkpoint was written for other inputs; starting again")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        runtime.restore_scaler(state)
        records, first_epoch, first_step, partial = (
            list(state["records"]),
            state["epoch"],
            state["step"],
            state["partial"],
        )
        set_rng_state(state["rng"])
        log(f"QAT: resuming at epoch {first_epoch}, step {first_step}")

    def save(epoch: int, step: int, partial: dict) -> None:
        if checkpoint is not None:
            runtime.save(
                checkpoint,
                {
                    "phase": "qat",
                    "key": key,
                    "epoch": epoch,
                    "step": step,
                    "partial": partial,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "records": records,
                    "rng": rng_state(),
                },
            )

    logits = LogitCache(
        loader,
        runtime,
        enabled=cache_logits,
        images_ahead=(epochs - first_epoch) * steps * loader.batch_sampler.batch_size,
    )
    try:
        with runtime.stop.installed():
            for epoch in range(first_epoch, epochs):
                cached = logits.loader_for(0, teacher)
                resumed = epoch == first_epoch
                record = train_epoch(
                    model,
                    cached or loader,
                    optimizer,
                    scheduler,
                    loss or DistillLoss(),
                    device=device,
                    teacher=None if cached is not None else teacher,
                    description=f"QAT + KD epoch {epoch}",
                    max_steps=max_steps,
                    epoch=epoch,
                    runtime=runtime,
                    phase="qat",
                    start_step=first_step if resumed else 0,
                    partial=partial if resumed else None,
                    save=save,
                )
                if logits.seconds:
                    record["teacher_logits_seconds"], logits.seconds = logits.seconds, 0.0
                records.append(record)
                save(epoch + 1, 0, {})
    finally:
        quant.remove()
    return model.cpu().eval(), {"folded_batchnorms": folded, "fake_quantized_layers": len(names), "epochs": records}


def qat_loader(dataset, batch_size: int, seed: int, dist: Dist = SINGLE) -> DataLoader:
    """QAT's training batches in a seeded order that a checkpoint can point back into (the
    sampler's ``qat`` phase), so an interrupted epoch resumes at its step; under torchrun each
    rank takes its slice of every global batch, as in the other phases."""
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        shuffle=True,
        drop_last=len(dataset) > batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    return DataLoader(dataset, batch_sampler=sampler)


def torch_layers(model: nn.Module, shape: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The model's Conv/Linear modules in the order one forward pass runs them, with their weight
    shapes: how ONNX nodes get their PyTorch names back (:func:`~cascadec.quantize.ptq.compute_nodes`)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(m.weight.shape))))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear))
    ]
    try:
        with torch.inference_mode():
            model.cpu().eval()(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


@dataclass
class QatInputs:
    """What quantization-aware fine-tuning needs beyond the PTQ inputs; ``ranks`` where a torchrun
    job's other ranks train it too (None: this process alone, on the CPU)."""

    recipe: Recipe
    teacher: nn.Module
    student: nn.Module
    bundle: DataBundle
    ranks: QatRanks | None = None


@dataclass(frozen=True)
class QatJob:
    """One flavour's fine-tuning: everything a rank needs to train it that the recipe and the data
    do not already give every rank alike (rank 0 sends it, cascadec.quantize.qat_ranks)."""

    flavour: str
    signed: bool  # symmetric (signed) activations: the TensorRT flavour
    float_modules: tuple[str, ...]
    weight_levels: int
    key: str  # what a checkpoint must have been trained from (:func:`_inputs_key`)
    epochs: int
    lr: float
    images: int  # calibration images, sampled from the training split with ``seed``
    seed: int
    images_digest: str  # so a rank that sampled other images stops instead of training apart

    @property
    def checkpoint(self) -> str:
        return f"qat.{self.flavour}"


def images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def train_job(job: QatJob, qat: QatInputs, images: np.ndarray, run: RunDir) -> tuple[nn.Module, dict]:
    """Run ``job`` on this rank: every rank of a torchrun job calls it with the same job and
    images, rank 0 from :func:`qat_flavour`, the others from ``qat_ranks.follow``."""
    recipe = qat.recipe
    dist = qat.ranks.dist if qat.ranks is not None else SINGLE
    device = qat.ranks.device if qat.ranks is not None else torch.device("cpu")
    runtime = Runtime.for_recipe(recipe.train, device, dist, checkpoint_dir=run.file(CHECKPOINTS))
    return qat_finetune(
        qat.student,
        qat.teacher,
        qat_loader(qat.bundle.train, recipe.data.batch_size, recipe.train.seed, dist),
        images,
        signed=job.signed,
        float_layers=job.float_modules,
        epochs=job.epochs,
        lr=job.lr,
        momentum=recipe.train.momentum,
        loss=DistillLoss(
            recipe.distill.ce_weight, recipe.distill.kd_weight if recipe.distill.kd else 0.0, recipe.distill.temperature
        ),
        max_steps=recipe.train.max_steps_per_epoch,
        weight_levels=job.weight_levels,
        runtime=runtime,
        checkpoint=job.checkpoint,
        key=job.key,
        cache_logits=recipe.train.cache_teacher_logits,
    )


def _inputs_key(
    run: RunDir,
    q: QuantizeSection,
    flavour: Flavour,
    float_modules: list[str],
    levels: int,
    images: int,
    recipe: Recipe,
) -> str:
    """What a QAT checkpoint was trained from: a checkpoint for another student, flavour, float
    layers or schedule must not be resumed."""
    digest = hashlib.sha256(run.file("student.onnx").read_bytes()).hexdigest()
    parts = [
        digest,
        flavour.name,
        ",".join(sorted(float_modules)),
        levels,
        images,
        q.qat_epochs,
        q.qat_lr,
        recipe.train.seed,
        recipe.data.batch_size,
        recipe.train.max_steps_per_epoch,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def qat_flavour(
    run: RunDir,
    q: QuantizeSection,
    flavour: Flavour,
    qat: QatInputs,
    images: np.ndarray,
    float_nodes: list[str],
    nodes: list[dict[str, str]],
    sel_x: np.ndarray,
    sel_y: np.ndarray,
    ptq_graph: dict[str, Any],
    ptq_accuracy: float,
    method: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """QAT + KD for one flavour (cascadec.quantize.qat), then the same PTQ export of the fine-tuned
    weights; the file that scores best on the selection split is the one left in place."""
    recipe, work = qat.recipe, run.file("quantize")
    float_modules = [n["module"] for n in nodes if n["node"] in set(float_nodes)]
    weight_levels = 64 if flavour.quantize_kwargs(method["reduce_range"])["reduce_range"] else 127
    job = QatJob(
        flavour=flavour.name,
        signed=flavour.symmetric_activations,
        float_modules=tuple(float_modules),
        weight_levels=weight_levels,
        key=_inputs_key(run, q, flavour, float_modules, weight_levels, len(images), recipe),
        epochs=q.qat_epochs,
        lr=q.qat_lr,
        images=len(images),
        seed=recipe.train.seed,
        images_digest=images_digest(images),
    )
    ranks = qat.ranks.world_size if qat.ranks is not None else 1
    log(
        f"INT8 ({flavour.name}): quantization-aware fine-tuning with KD, {q.qat_epochs} epoch(s)"
        + (f" on {ranks} ranks" if ranks > 1 else "")
    )
    with qat.ranks.sending(job) if qat.ranks is not None else nullcontext():
        tuned, record = train_job(job, qat, images, run)
    tuned_fp32 = work / f"qat.{flavour.name}.onnx"
    export_onnx(tuned, torch.from_numpy(images[:1]), tuned_fp32, opset=recipe.export.opset, slim=recipe.export.slim)
    tuned_prepared = work / f"qat.{flavour.name}.prepared.onnx"
    prepare(tuned_fp32, tuned_prepared)
    tuned_nodes = compute_nodes(tuned_prepared, torch_layers(tuned, qat.bundle.input_shape))
    keep = [n["node"] for n in tuned_nodes if n["module"] in set(float_modules)]
    candidate = work / f"qat.{flavour.name}.int8.onnx"
    tuned_cache = work / f"calibration.qat.{flavour.name}.json"
    tuned_cache.unlink(missing_ok=True)
    tuned_method = {**method, "cache": tuned_cache, "names": {n["node"]: n["module"] for n in tuned_nodes}}
    graph = quantize_int8(tuned_prepared, candidate, flavour, images, exclude_nodes=keep, **tuned_method)
    accuracy = onnx_accuracy(candidate, sel_x, sel_y, fused=flavour.judge_fused)
    shipped = "qat" if accuracy > ptq_accuracy else "ptq"
    log(
        f"INT8 ({flavour.name}): QAT + KD {accuracy:.4f} on the selection split against PTQ {ptq_accuracy:.4f}: "
        f"{'shipping QAT' if shipped == 'qat' else 'keeping PTQ'}"
    )
    if shipped == "qat":
        os.replace(candidate, run.file(flavour.file))
    candidate.unlink(missing_ok=True)
    # this flavour's file is in place: its QAT state is not needed again
    (run.file(CHECKPOINTS) / f"{job.checkpoint}.safetensors").unlink(missing_ok=True)
    out = {
        "ptq_selection_accuracy": ptq_accuracy,
        "qat_selection_accuracy": accuracy,
        "shipped": shipped,
        "epochs": q.qat_epochs,
        "lr": q.qat_lr,
        "ranks": ranks,
        "folded_batchnorms": record["folded_batchnorms"],
        "fake_quantized_layers": record["fake_quantized_layers"],
        "train": [
            {k: e.get(k) for k in ("loss", "seconds", "images_per_s", "teacher_logits_seconds") if k in e}
            for e in record["epochs"]
        ],
    }
    return out, (graph if shipped == "qat" else ptq_graph), max(accuracy, ptq_accuracy)
