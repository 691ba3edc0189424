"""The recipe's stages. Each reads what earlier stages left in the run directory and writes
its own artifacts there, so any stage can be resumed or re-run on its own.

    teacher -> prune (+ shrink) -> export -> verify -> profile -> report

``compress`` runs them all; ``export_run``, ``verify_run`` and ``profile_path`` are the
entry points behind ``cascadec export``, ``verify`` and ``profile``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cascadec.data import build_data
from cascadec.data.bundle import DataBundle
from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.progress import log
from cascadec.recipe import Recipe, load_recipe
from cascadec.run import RunDir
from cascadec.train.loop import NonFiniteLoss

TEACHER_WEIGHTS = "teacher.safetensors"
CHECKPOINTS = "checkpoints"  # training checkpoints of an unfinished prune stage (RUN/checkpoints/*.safetensors)


# ---------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
        return torch.device(name)
    raise UserError(f"--device {name!r}: expected cpu or cuda")


def load_data(recipe: Recipe) -> DataBundle:
    d = recipe.data
    return build_data(
        d.name, d.root, image_size=d.image_size, train_limit=d.train_limit, val_limit=d.val_limit,
        selection_size=d.selection_size,
        seed=recipe.train.seed, download=d.download, **d.options,
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


def make_loaders(bundle: DataBundle, recipe: Recipe, device: torch.device, dist=None) -> Loaders:
    """Training batches come from an EpochBatchSampler: their order is a function of (seed,
    phase, epoch), so checkpoints can record the position and resume without replaying data,
    and in a distributed run each rank takes its slice of every global batch. Every rank
    evaluates the whole validation set (identical models give identical accuracies, so
    decisions such as teacher promotion agree without communication)."""
    from cascadec.data.sampler import EpochBatchSampler
    from cascadec.train.distributed import SINGLE

    dist = dist or SINGLE
    workers = loader_workers(recipe.data.workers, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        common["persistent_workers"] = True
    batch = recipe.data.batch_size
    sampler = EpochBatchSampler(len(bundle.train), batch, seed=recipe.train.seed, shuffle=True,
                                drop_last=len(bundle.train) > batch, rank=dist.rank, world_size=dist.world_size)
    train = DataLoader(bundle.train, batch_sampler=sampler, **common)
    val = DataLoader(bundle.val, batch_size=batch, shuffle=False, **common)
    selection = DataLoader(bundle.selection if bundle.selection is not None else bundle.val, batch_size=batch, shuffle=False, **common)
    return Loaders(train, val, selection)


def model_kwargs(recipe: Recipe, bundle_or_shape) -> dict[str, int]:
    num_classes = recipe.model.num_classes or bundle_or_shape.num_classes
    in_channels = recipe.model.in_channels or bundle_or_shape.in_channels
    return {"num_classes": int(num_classes), "in_channels": int(in_channels)}


def input_shape(bundle: DataBundle) -> list[int]:
    return [bundle.in_channels, bundle.image_size, bundle.image_size]


def _cache_root() -> Path:
    return Path(os.environ.get("CASCADEC_CACHE", Path.home() / ".cache" / "cascadec"))


# ---------------------------------------------------------------- teacher


def _teacher_cache_key(recipe: Recipe, kwargs: dict) -> str:
    payload = json.dumps(
        {"model": recipe.model.name, "kwargs": kwargs, "data": recipe.data.model_dump(exclude={"workers", "download"}),
         "teacher": recipe.teacher.model_dump(exclude={"cache"}), "seed": recipe.train.seed, "torch": torch.__version__.split("+")[0]},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_teacher(model: nn.Module, recipe: Recipe, train: DataLoader, val: DataLoader, device: torch.device,
                  runtime=None) -> float:
    """Plain supervised training, for recipes whose model has no pretrained weights. It is
    short and cached, so it is not checkpointed: an interrupted teacher stage starts over."""
    from cascadec.distill.losses import DistillLoss
    from cascadec.train.loop import cosine_schedule, evaluate, make_optimizer, steps_in, train_epoch

    t = recipe.teacher
    opt = make_optimizer(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=recipe.train.weight_decay)
    steps = steps_in(train, recipe.train.max_steps_per_epoch)
    sched = cosine_schedule(opt, t.train_epochs * steps)
    ce = DistillLoss(ce_weight=1.0, kd_weight=0.0)
    for epoch in range(t.train_epochs):
        stats = train_epoch(model, train, opt, sched, lambda lg, y, _t: ce(lg, y), device=device,
                            description=f"teacher epoch {epoch}", max_steps=recipe.train.max_steps_per_epoch,
                            epoch=epoch, runtime=runtime)
        log(f"teacher epoch {epoch}: loss {stats['loss']:.4f}, {stats['images_per_s']:.0f} images/s")
    return evaluate(model, val, device=device, description="evaluate teacher")


def stage_teacher(run: RunDir, recipe: Recipe, bundle: DataBundle, loaders, device: torch.device, runtime=None) -> nn.Module:
    from safetensors.torch import load_file, save_file

    from cascadec.prune.spec import state_dict_for_safetensors
    from cascadec.train.loop import evaluate

    kwargs = model_kwargs(recipe, bundle)
    path = run.file(TEACHER_WEIGHTS)
    if run.is_done("teacher") and path.is_file():
        model = create_model(recipe.model.name, **kwargs)
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    with run.stage("teacher") as info:
        model = create_model(recipe.model.name, weights=recipe.model.weights, **kwargs).to(device)
        source = recipe.model.weights or "random init"
        if not recipe.model.weights and recipe.teacher.train_epochs > 0:
            key = _teacher_cache_key(recipe, kwargs)
            cached = _cache_root() / "teachers" / f"{recipe.model.name}-{recipe.data.name}-{key}.safetensors"
            if recipe.teacher.cache and cached.is_file():
                model.load_state_dict(load_file(str(cached)))
                source = f"cache {cached}"
                log(f"teacher: loaded from cache {cached}")
            else:
                log(f"teacher: no weights given; training {recipe.teacher.train_epochs} epoch(s) on {bundle.name}")
                train_teacher(model, recipe, loaders.train, loaders.val, device, runtime=runtime)
                source = f"trained by cascadec ({recipe.teacher.train_epochs} epochs)"
                if recipe.teacher.cache and run.writable:
                    try:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        save_file(state_dict_for_safetensors(model), str(cached))
                    except OSError:
                        log(f"teacher: could not write cache {cached}; continuing")
        elif not recipe.model.weights:
            log("[yellow]teacher has random weights (no model.weights, teacher.train_epochs 0): accuracy numbers will be meaningless[/]")
        model.eval()
        accuracy = evaluate(model, loaders.val, device=device, description="evaluate teacher")
        if run.writable:  # in a distributed run only rank 0 writes
            save_file(state_dict_for_safetensors(model), str(path))
        info.update(source=source, accuracy=accuracy)
        run.record("teacher.accuracy", accuracy)
        log(f"teacher: accuracy {accuracy:.4f} ({source})")
    return model


# ---------------------------------------------------------------- prune


def training_runtime(run: RunDir, recipe: Recipe, device: torch.device, dist=None):
    """How the prune stage trains: checkpoints in RUN/checkpoints, precision, layout, ranks."""
    from cascadec.train.distributed import SINGLE
    from cascadec.train.runtime import Runtime

    t = recipe.train
    return Runtime(device=device, dist=dist or SINGLE, amp=t.amp, channels_last=t.channels_last,
                   checkpoint_dir=run.file(CHECKPOINTS), checkpoint_every_steps=t.checkpoint_every_steps)


def stage_prune(run: RunDir, recipe: Recipe, teacher: nn.Module, bundle: DataBundle, loaders, device: torch.device,
                runtime=None) -> nn.Module:
    """Prune, shrink, evaluate. Resumable mid-training: ``joint``/``student`` checkpoints in
    RUN/checkpoints (every epoch, every ``train.checkpoint_every_steps``, on Ctrl-C) are
    picked up by ``--resume``; they are deleted once the student is saved."""
    from cascadec.prune.cost import count_macs, count_params
    from cascadec.prune.methods import prune_model
    from cascadec.prune.shrink import pruned_root_idxs, shrink
    from cascadec.prune.spec import load_student, save_student
    from cascadec.train.loop import evaluate

    if run.is_done("prune"):
        student, _ = load_student(run.path)
        return student.to(device)
    shape = input_shape(bundle)
    example = torch.zeros(1, *shape)
    runtime = runtime or training_runtime(run, recipe, device)
    with run.stage("prune") as info:
        info["checkpoints"] = CHECKPOINTS
        torch.manual_seed(recipe.train.seed)
        try:
            result = prune_model(teacher, recipe, loaders.train, loaders.selection, example, device, runtime)
        except NonFiniteLoss as exc:
            kept = sorted(p.name for p in run.file(CHECKPOINTS).glob("*.safetensors")) if run.file(CHECKPOINTS).is_dir() else []
            note = f"; last good checkpoint kept: {CHECKPOINTS}/{', '.join(kept)}" if kept else ""
            raise NonFiniteLoss(f"{exc}{note}") from None
        student = shrink(result.student.cpu().to(memory_format=torch.contiguous_format), result.analysis.index, result.mask, example)
        removals = pruned_root_idxs(result.analysis.index, result.mask)
        if run.writable:
            save_student(student, run.path, model_name=recipe.model.name, model_kwargs=model_kwargs(recipe, bundle),
                         input_shape=shape, removals=removals, extra={"recipe": recipe.name, "method": recipe.prune.method})
        student = student.to(device)
        accuracy = evaluate(student, loaders.val, device=device, description="evaluate student")
        metrics = {
            "teacher.flops": count_macs(teacher.cpu(), example), "teacher.params": count_params(teacher),
            "student.flops": count_macs(student.cpu(), example), "student.params": count_params(student),
            "student.accuracy": accuracy, "prune.target_fraction": result.analysis.budget.keep_fraction,
            "prune.target_metric": result.analysis.budget.metric,
        }
        teacher.to(device)
        student.to(device)
        for k, v in metrics.items():
            run.record(k, v)
        run.record("prune.history", result.history)
        info.update(method=recipe.prune.method, groups=len(result.analysis.index.groups))
        info.pop("checkpoints")  # the student is saved: the training checkpoints have served their purpose
        log(f"student: accuracy {accuracy:.4f}, {metrics['student.flops'] / metrics['teacher.flops']:.1%} of the teacher's FLOPs")
    if run.writable:
        shutil.rmtree(run.file(CHECKPOINTS), ignore_errors=True)
    runtime.dist.barrier()
    return student


# ---------------------------------------------------------------- export / verify / profile


def stage_export(run: RunDir, recipe: Recipe, teacher: nn.Module, student: nn.Module, shape: list[int]) -> None:
    from cascadec.backends.onnx_export import export_onnx
    from cascadec.progress import track

    with run.stage("export") as info:
        sample = torch.zeros(1, *shape)
        for name, model in track((("teacher", teacher), ("student", student)), "export ONNX", total=2):
            exported = export_onnx(model.cpu().eval(), sample, run.file(f"{name}.onnx"), opset=recipe.export.opset, slim=recipe.export.slim)
            info[name] = {k: v for k, v in exported.items() if isinstance(v, (str, int, float, bool, list))}


def stage_verify(run: RunDir, recipe: Recipe, student: nn.Module, val_dataset, backends: Sequence[str] = ("onnxruntime",), samples: int | None = None) -> dict:
    from cascadec.verify import Gate, verify_backends

    v = recipe.verify
    with run.stage("verify") as info:
        gate = Gate.from_recipe(v)
        loader = DataLoader(val_dataset, batch_size=64, shuffle=False)
        result = verify_backends(student.cpu().eval(), run.file("student.onnx"), loader, backends=list(backends), gate=gate,
                                 samples=samples or v.samples, progress=_progress(), engine_path=run.file("student.plan"))
        info["passed"] = all(r["passed"] for r in result["backends"].values())
        info["backends"] = list(result["backends"])
    # verifying one backend keeps the other backends' last results in the report
    earlier = (run.metric("parity") or {}).get("backends") or {}
    run.record("parity", {**result, "backends": {**earlier, **result["backends"]}})
    return result


def stage_profile(run: RunDir, recipe: Recipe, shape: list[int], batches: Sequence[int] | None = None, *,
                  backend: str = "onnxruntime", overrides: dict[str, Any] | None = None,
                  models: dict[str, nn.Module] | None = None) -> dict:
    """Time teacher and student on ``backend``; recorded as ``latency.<backend>`` in the manifest.

    ``overrides`` replace recipe.profile keys (CLI --duration etc.); ``models`` are the PyTorch
    teacher/student for the torch backends. The tensorrt backend times ``student.plan`` and
    ``teacher.plan`` when it exists (the student alone otherwise, and the record says so).
    Availability is checked before the stage opens: a missing GPU must not mark the run failed."""
    from cascadec.profile import (PROFILE_BACKENDS, compare, profile_backend, profile_interleaved, protocol_record,
                                  require_backend, resolve_backend)

    backend = resolve_backend(backend)
    require_backend(backend)
    kind, where = PROFILE_BACKENDS[backend]
    p = recipe.profile.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    sources: dict[str, dict[str, Any]] = {}
    for name in ("teacher", "student"):
        if kind == "onnx":
            sources[name] = {"onnx_path": run.file(f"{name}.onnx")}
        elif kind == "torch":
            if not models or name not in models:
                raise UserError(f"the {backend} backend needs the PyTorch {name}")
            sources[name] = {"model": models[name]}
        elif run.file(f"{name}.plan").is_file():
            sources[name] = {"engine_path": run.file(f"{name}.plan")}
    if "student" not in sources:
        raise UserError(f"{run.file('student.plan')}: missing; build it with cascadec export {run.path} --trt")
    with run.stage("profile" if backend == "onnxruntime" else f"profile.{backend}"):
        def profile_one(name: str, duration_s: float, min_iters: int) -> dict[int, dict]:
            return profile_backend(backend, **sources[name], input_shape=shape, batches=list(batches or p.batches),
                                   warmup_s=p.warmup_s, min_duration_s=duration_s, min_iters=min_iters,
                                   threads=p.threads, cuda_graph=p.cuda_graph and backend == "torch-cuda",
                                   cache_dir=run.file("ort_trt_cache"), progress=_progress(), keep_samples=True)

        names = [n for n in ("teacher", "student") if n in sources]  # the teacher first: ratios are teacher / student
        pooled, ratios = profile_interleaved(profile_one, names, rounds=p.rounds, min_duration_s=p.duration_s,
                                             min_iters=p.min_iters)
        out: dict[str, Any] = {name: {str(b): v for b, v in pooled[name].items()} for name in names}
        if "teacher" in out:
            out["speedup"] = {str(b): s for b, s in compare(out["teacher"], out["student"]).items()}
            out["speedup_rounds"] = {str(b): r for b, r in ratios["student"].items()}
        out["protocol"] = protocol_record(backend=backend, device=where, warmup_s=p.warmup_s,
                                          min_duration_s=p.duration_s, min_iters=p.min_iters,
                                          threads=p.threads if where == "cpu" else None,
                                          cuda_graph=p.cuda_graph and backend == "torch-cuda", rounds=p.rounds)
        if "teacher" not in out:
            out["note"] = "no teacher.plan in the run: student engine only, no speed-up"
    run.record(f"latency.{backend}", out)
    return out


def _progress() -> bool:
    from cascadec import progress

    return progress.enabled()


# ---------------------------------------------------------------- report


def build_report(run: RunDir) -> dict:
    """Assemble report.json from the manifest; the keys are a fixed contract (README)."""
    from cascadec.envinfo import environment

    m = run.manifest["metrics"]
    recipe = run.recipe()
    report: dict[str, Any] = {
        "run": {"dir": str(run.path), "model": recipe.model.name, "recipe": recipe.name, "method": recipe.prune.method,
                "target": recipe.prune.target.model_dump(exclude_none=True), "target_description": recipe.prune.target.describe(),
                "data": recipe.data.name, "stages": {k: v.get("seconds") for k, v in run.manifest["stages"].items()}},
        "teacher": {"flops": m.get("teacher.flops"), "params": m.get("teacher.params"), "accuracy": m.get("teacher.accuracy")},
        "student": {"flops": m.get("student.flops"), "params": m.get("student.params"), "accuracy": m.get("student.accuracy")},
        "environment": environment(),
        "versions": run.manifest.get("versions", {}),
    }
    if m.get("teacher.flops") and m.get("student.flops"):
        report["student"]["flops_reduction"] = 1 - m["student.flops"] / m["teacher.flops"]
        report["student"]["params_reduction"] = 1 - m["student.params"] / m["teacher.params"]
    parity = m.get("parity")
    if parity:
        report["parity"] = {name: r for name, r in parity["backends"].items()}
        report["parity_samples"] = parity.get("samples")
        report["parity_torch_accuracy"] = parity.get("torch_accuracy")
    # one node per profiled backend, onnxruntime (the compress stage's) first
    profiled = sorted((k.split(".", 1)[1] for k, v in m.items() if k.startswith("latency.") and isinstance(v, dict)),
                      key=lambda b: (b != "onnxruntime", b))
    if profiled:
        report["latency"] = {b: {k: v for k, v in m[f"latency.{b}"].items() if k not in ("speedup", "speedup_rounds")}
                             for b in profiled}
        report["speedup"] = {b: m[f"latency.{b}"].get("speedup", {}) for b in profiled}
        report["speedup_rounds"] = {b: m[f"latency.{b}"].get("speedup_rounds", {}) for b in profiled}
    history = m.get("prune.history")
    if history:
        report["prune"] = _history_summary(history)
    return report


def _history_summary(history: dict) -> dict:
    out = {k: history[k] for k in ("fractions", "joint_seconds", "mask_changed_units", "seconds", "ladder", "freeze_step",
                                   "joint_steps") if k in history}
    if history.get("joint"):
        out["joint_epochs"] = [{k: e.get(k) for k in ("epoch", "accuracies", "mask_changes", "frozen", "seconds")} for e in history["joint"]]
    for phase in ("student", "fine_tune"):
        if history.get(phase):
            out[f"{phase}_epochs"] = [{k: e[k] for k in ("epoch", "teacher", "student_accuracy", "seconds", "kept") if k in e}
                                      for e in history[phase]]
    return out


def write_run_report(run: RunDir) -> dict:
    from cascadec.report import write_report

    from cascadec.plots import write_run_plots

    report = build_report(run)
    write_report(run.path, report)
    write_run_plots(run.path, report)  # latency.png; logs instead of failing
    return report


# ---------------------------------------------------------------- compress


def check_target(recipe: Recipe, bundle: DataBundle) -> None:
    """Analyse the architecture (random weights, no data) so that an unknown model or an
    infeasible target is refused before a run directory exists or any training starts."""
    from cascadec.prune.methods import analyse

    # loading the weights here too means a corrupt --weights file is refused before any run exists
    model = create_model(recipe.model.name, weights=recipe.model.weights, **model_kwargs(recipe, bundle)).eval()
    analysis = analyse(model, recipe, torch.zeros(1, *input_shape(bundle)))
    analysis.solver.check_feasible(analysis.budget)


def default_out(model: str, recipe: Recipe) -> Path:
    return Path("runs") / f"{model}-{recipe.name}"


def prepare_recipe(model: str, recipe_name: str, *, data: str | None = None, weights: str | None = None,
                   overrides: Sequence[str] = ()) -> Recipe:
    extra = list(overrides)
    recipe = load_recipe(recipe_name, extra, model=model)
    if data is not None:
        if not Path(data).exists():
            raise UserError(f"--data {data}: path does not exist")
        recipe.data.root = str(Path(data).resolve())
    if weights is not None:
        if "." in Path(weights).name and not Path(weights).exists() and Path(weights).suffix in (".pt", ".pth", ".safetensors"):
            raise UserError(f"--weights {weights}: file not found")
        recipe.model.weights = str(Path(weights).resolve()) if Path(weights).exists() else weights
    return recipe


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _open_run(dist, path: Path, recipe: Recipe, resume: bool, command: list[str] | None) -> RunDir:
    """Rank 0 creates (or resumes) the run directory; the other ranks open it read-only. A refusal
    on rank 0 is sent to every rank, so all of them stop with the same one-line error."""
    if not dist.active:
        return RunDir.create(path, recipe, resume=resume, command=command)
    run, error = None, None
    if dist.is_main:
        try:
            run = RunDir.create(path, recipe, resume=resume, command=command)
        except UserError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    return run if run is not None else RunDir.open(path, writable=False)


def compress(model: str, recipe_name: str, *, data: str | None = None, weights: str | None = None, out: str | None = None,
             overrides: Sequence[str] = (), device: str = "cpu", resume: bool = False, command: list[str] | None = None) -> dict:
    """The whole pipeline; returns the report. Raises GateFailed (after writing the report)
    when a parity gate fails.

    Under torchrun (WORLD_SIZE > 1) every rank trains the teacher and prune stages in data
    parallel; rank 0 alone writes the run directory and runs export, verify and profile, and
    the other ranks return an empty dict once the prune stage is done."""
    from cascadec.train.distributed import init_from_env, shutdown
    from cascadec.verify import raise_on_failure

    recipe = prepare_recipe(model, recipe_name, data=data, weights=weights, overrides=overrides)
    dist, dev = init_from_env(resolve_device(device))
    try:
        bundle = load_data(recipe)  # fail on missing data before creating anything
        check_target(recipe, bundle)
        run = _open_run(dist, Path(out) if out else default_out(model, recipe), recipe, resume, command)
        torch.manual_seed(recipe.train.seed)
        loaders = make_loaders(bundle, recipe, dev, dist)
        runtime = training_runtime(run, recipe, dev, dist)
        try:
            teacher = stage_teacher(run, recipe, bundle, loaders, dev, runtime)
            student = stage_prune(run, recipe, teacher, bundle, loaders, dev, runtime)
            if not dist.is_main:
                return {}
            shape = input_shape(bundle)
            if not run.is_done("export"):
                stage_export(run, recipe, teacher, student, shape)
            parity = run.metric("parity") if run.is_done("verify") else stage_verify(run, recipe, student, bundle.val)
            if not run.is_done("profile"):
                stage_profile(run, recipe, shape)
            report = write_run_report(run)
        except KeyboardInterrupt:
            run.finish("interrupted")
            raise
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                run.finish("failed")
                raise
            message = f"cannot write to run directory {run.path}: {exc.strerror or exc}"
            try:
                run.finish("failed")
            except UserError:
                pass  # the manifest cannot be written either; the first error is the one to report
            raise UserError(message) from None
        except BaseException:
            run.finish("failed")
            raise
        run.finish("finished")
    finally:
        shutdown(dist)
    raise_on_failure(parity)
    return report
