"""The recipe's stages, in order. Each reads what earlier stages left in the run directory and
writes its own artifacts there, so any stage can be resumed or re-run on its own; each calls
into the module that owns the work.

    teacher -> prune (+ shrink) -> export -> verify -> profile -> [quantize] -> report

:func:`compress` runs them all, like torchvision's ``main()``; ``cascadec export``, ``verify``
and ``profile`` on an existing run are :mod:`cascadec.commands`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from cascadec import memory, progress
from cascadec.backends import get_backend
from cascadec.backends.onnx_export import export_onnx
from cascadec.backends.torch_backend import resolve_device
from cascadec.data.bundle import DataBundle
from cascadec.data.loaders import Loaders, load_data, make_loaders, model_kwargs
from cascadec.distill import images_per_sample
from cascadec.errors import GateFailed, UserError, first_line
from cascadec.models import create_model
from cascadec.models.external import canonical_name
from cascadec.preflight import check_input_memory
from cascadec.profile.engines import profile_backend
from cascadec.profile.protocol import Timing, profile_interleaved, protocol_record
from cascadec.profile.results import ProfileResult
from cascadec.progress import log, track
from cascadec.prune.analysis import Analysis, analyse, check_feasible
from cascadec.prune.cost import count_macs, count_params
from cascadec.prune.latency import latency_prediction
from cascadec.prune.method import get_method
from cascadec.prune.methods import prune_model
from cascadec.prune.shrink import pruned_root_idxs, shrink
from cascadec.prune.spec import load_student, save_student, state_dict_for_safetensors
from cascadec.prune.trial import check_shrunk
from cascadec.quantize.qat import QatInputs
from cascadec.quantize.qat_ranks import QatRanks, follow
from cascadec.quantize.stage import raise_on_quantize_failure, stage_quantize
from cascadec.recipe import ProfileSection, Recipe, load_recipe, with_values
from cascadec.report import write_run_report
from cascadec.run import CHECKPOINTS, RunDir, closing_run, open_run
from cascadec.teacher import obtain_teacher
from cascadec.train.distributed import elastic_restart, init_from_env, shutdown
from cascadec.train.loop import evaluate
from cascadec.train.runtime import NonFiniteLoss, Runtime
from cascadec.verify.gates import Gate
from cascadec.verify.parity import verify_backends
from cascadec.verify.present import raise_on_failure
from cascadec.verify.results import ParityResult

TEACHER_WEIGHTS = "teacher.safetensors"


# ---------------------------------------------------------------- teacher


def stage_teacher(
    run: RunDir,
    recipe: Recipe,
    bundle: DataBundle,
    loaders: Loaders,
    device: torch.device,
    runtime: Runtime | None = None,
) -> nn.Module:
    path = run.file(TEACHER_WEIGHTS)
    if run.is_done("teacher") and path.is_file():
        model = create_model(recipe.model.name, **model_kwargs(recipe, bundle))
        try:
            model.load_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"{path}: damaged teacher weights ({first_line(exc)}); delete it and resume to rebuild the teacher"
            ) from None
        return model.to(device).eval()
    with run.stage("teacher") as info:
        model, source = obtain_teacher(recipe, bundle, loaders, device, runtime=runtime, write_cache=run.writable)
        accuracy = evaluate(model, loaders.val, device=device, description="evaluate teacher")
        if run.writable:  # in a distributed run only rank 0 writes
            save_file(state_dict_for_safetensors(model), str(path))
        info.update(source=source, accuracy=accuracy)
        run.record("teacher.accuracy", accuracy)
        log(f"teacher: accuracy {accuracy:.4f} ({source})")
    return model


# ---------------------------------------------------------------- prune


def training_runtime(run: RunDir, recipe: Recipe, device: torch.device, dist=None) -> Runtime:
    """How the prune stage trains: checkpoints in RUN/checkpoints, precision, layout, ranks."""
    return Runtime.for_recipe(recipe.train, device, dist, checkpoint_dir=run.file(CHECKPOINTS))


def stage_prune(
    run: RunDir,
    recipe: Recipe,
    teacher: nn.Module,
    bundle: DataBundle,
    loaders: Loaders,
    device: torch.device,
    runtime: Runtime | None = None,
    analysis: Analysis | None = None,
) -> nn.Module:
    """Prune, shrink, evaluate. Resumable mid-training: ``joint``/``student`` checkpoints in
    RUN/checkpoints (every epoch, every ``train.checkpoint_every_steps``, on Ctrl-C) are
    picked up by ``--resume``; they are deleted once the student is saved."""
    if run.is_done("prune"):
        student, _ = load_student(run.path)
        return student.to(device)
    shape = bundle.input_shape
    example = torch.zeros(1, *shape)
    runtime = runtime or training_runtime(run, recipe, device)
    method = get_method(recipe.prune.method)
    with run.stage("prune") as info:
        info["checkpoints"] = CHECKPOINTS
        torch.manual_seed(recipe.train.seed)
        try:
            result = prune_model(teacher, recipe, loaders.train, loaders.selection, example, device, runtime, analysis)
        except NonFiniteLoss as exc:
            kept = (
                sorted(p.name for p in run.file(CHECKPOINTS).glob("*.safetensors"))
                if run.file(CHECKPOINTS).is_dir()
                else []
            )
            note = f"; last good checkpoint kept: {CHECKPOINTS}/{', '.join(kept)}" if kept else ""
            raise NonFiniteLoss(f"{exc}{note}") from None
        extra: dict = {"recipe": recipe.name, "method": recipe.prune.method, **result.spec}
        if result.mask is None:  # the method removed nothing: its trained network is the student
            student, removals = result.student.cpu().to(memory_format=torch.contiguous_format), {}
        else:
            student = shrink(
                result.student.cpu().to(memory_format=torch.contiguous_format),
                result.analysis.index,
                result.mask,
                example,
            )
            info["masked_vs_shrunk"] = check_shrunk(
                result.student, result.analysis.index, result.mask, student, example
            )
            removals = pruned_root_idxs(result.analysis.index, result.mask)
        if run.writable:
            save_student(
                student,
                run.path,
                model_name=recipe.model.name,
                model_kwargs=model_kwargs(recipe, bundle),
                input_shape=shape,
                removals=removals,
                extra=extra,
            )
        student = student.to(device)
        accuracy = evaluate(student, loaders.val, device=device, description="evaluate student")
        metrics = {
            "teacher.flops": count_macs(teacher.cpu(), example),
            "teacher.params": count_params(teacher),
            "student.flops": count_macs(student.cpu(), example),
            "student.params": count_params(student),
            "student.accuracy": accuracy,
            "prune.target_fraction": result.analysis.budget.keep_fraction,
            "prune.target_metric": result.analysis.budget.metric,
        }
        method.finish_metrics(metrics, student.to(device), loaders.val, device)
        teacher.to(device)
        student.to(device)
        for k, v in metrics.items():
            run.record(k, v)
        latency = result.analysis.cost.latency
        if latency is not None and result.mask is not None:
            run.record("prune.latency", latency_prediction(latency, result.mask, result.analysis.budget))
        run.record("prune.history", result.history)
        info.update(method=recipe.prune.method, groups=len(result.analysis.index.groups))
        info.pop("checkpoints")  # the student is saved: the training checkpoints have served their purpose
        log(
            f"student: accuracy {accuracy:.4f}, {metrics['student.flops'] / metrics['teacher.flops']:.1%} of the teacher's FLOPs"
        )
    if run.writable:
        shutil.rmtree(run.file(CHECKPOINTS), ignore_errors=True)
    runtime.dist.barrier()
    return student


# ---------------------------------------------------------------- export / verify / profile


def stage_export(run: RunDir, recipe: Recipe, teacher: nn.Module, student: nn.Module, shape: list[int]) -> None:
    with run.stage("export") as info:
        sample = torch.zeros(1, *shape)
        models = [("teacher", teacher), ("student", student)]
        # networks the method times beside the student (PruneMethod.extra_models)
        for extra in get_method(recipe.prune.method).extra_models(teacher, sample, run.manifest["metrics"]):
            models.append((extra.name, extra.model))
            info[extra.name] = extra.info
        for name, model in track(models, "export ONNX", total=len(models)):
            exported = export_onnx(
                model.cpu().eval(), sample, run.file(f"{name}.onnx"), opset=recipe.export.opset, slim=recipe.export.slim
            )
            info[name] = {k: v for k, v in exported.items() if isinstance(v, (str, int, float, bool, list))}


def stage_verify(
    run: RunDir,
    recipe: Recipe,
    student: nn.Module,
    val_dataset,
    backends: Sequence[str] = ("onnxruntime",),
    samples: int | None = None,
) -> ParityResult:
    v = recipe.verify
    with run.stage("verify") as info:
        loader = DataLoader(val_dataset, batch_size=64, shuffle=False)
        result = verify_backends(
            student.cpu().eval(),
            run.file("student.onnx"),
            loader,
            backends=list(backends),
            gate=Gate.from_recipe(v),
            samples=samples or v.samples,
            progress=progress.enabled(),
            engine_path=run.file("student.plan"),
        )
        info["passed"] = result.passed
        info["backends"] = list(result.backends)
    earlier = run.metric("parity")
    run.record("parity", result.merged_over(ParityResult.from_dict(earlier) if earlier else None).to_dict())
    return result


def profile_settings(recipe: Recipe, overrides: dict[str, Any] | None = None) -> ProfileSection:
    """recipe.profile with ``overrides`` (CLI --duration etc.; None means "keep") applied and
    validated by the schema, so a bad override is refused as a bad recipe value would be."""
    values = {f"profile.{k}": v for k, v in (overrides or {}).items()}
    return with_values(recipe, values, "profile options").profile


def stage_profile(
    run: RunDir,
    recipe: Recipe,
    shape: list[int],
    batches: Sequence[int] | None = None,
    *,
    backend: str = "onnxruntime",
    overrides: dict[str, Any] | None = None,
    models: dict[str, nn.Module] | None = None,
) -> dict:
    """Time teacher and student on ``backend``; recorded as ``latency.<backend>`` in the manifest.

    ``overrides`` replace recipe.profile keys (CLI --duration etc.); ``models`` are the PyTorch
    teacher/student for the torch backends. The tensorrt backend times ``student.plan`` and
    ``teacher.plan`` when it exists (the student alone otherwise, and the record says so).
    Availability is checked before the stage opens: a missing GPU must not mark the run failed."""
    spec = get_backend(backend)
    backend = spec.name
    spec.require(timing=True)
    p = profile_settings(recipe, overrides)
    cuda_graph = p.cuda_graph and backend == "torch-cuda"
    timing = Timing(warmup_s=p.warmup_s, min_duration_s=p.duration_s, min_iters=p.min_iters)
    sources: dict[str, dict[str, Any]] = {}
    extras = list(get_method(recipe.prune.method).extra_model_labels)  # the method's, beside the student
    for name in ("teacher", "student", *extras):
        if name in extras:  # timed on ONNX backends, where the export stage wrote them
            if spec.runs == "onnx" and run.file(f"{name}.onnx").is_file():
                sources[name] = {"onnx_path": run.file(f"{name}.onnx")}
            continue
        if spec.runs == "onnx":
            sources[name] = {"onnx_path": run.file(f"{name}.onnx")}
        elif spec.runs == "torch":
            if not models or name not in models:
                raise UserError(f"the {backend} backend needs the PyTorch {name}")
            sources[name] = {"model": models[name]}
        elif run.file(f"{name}.plan").is_file():
            sources[name] = {"engine_path": run.file(f"{name}.plan")}
    if "student" not in sources:
        raise UserError(f"{run.file('student.plan')}: missing; build it with cascadec export {run.path} --trt")
    with run.stage("profile" if backend == "onnxruntime" else f"profile.{backend}"):

        def profile_one(name: str, share: Timing) -> dict[int, dict]:
            return profile_backend(
                backend,
                **sources[name],
                input_shape=shape,
                batches=list(batches or p.batches),
                timing=share,
                threads=p.threads,
                cuda_graph=cuda_graph,
                cache_dir=run.file("ort_trt_cache"),
                progress=progress.enabled(),
                keep_samples=True,
            )

        # the teacher first: ratios are teacher / student
        names = [n for n in ("teacher", "student", *extras) if n in sources]
        pooled, ratios = profile_interleaved(profile_one, names, rounds=p.rounds, timing=timing)
        result = ProfileResult(
            backend=backend,
            models={name: {str(b): v for b, v in pooled[name].items()} for name in names},
            rounds=(
                {n: {str(b): r for b, r in ratios[n].items()} for n in names if n != "teacher"}
                if "teacher" in names
                else {}
            ),
            protocol=protocol_record(
                backend=backend,
                device=spec.device,
                timing=timing,
                threads=p.threads if spec.device == "cpu" else None,
                cuda_graph=cuda_graph,
                rounds=p.rounds,
            ),
            note=None if "teacher" in names else "no teacher.plan in the run: student engine only, no speed-up",
        )
    out = result.to_dict()
    run.record(f"latency.{backend}", out)
    return out


# ---------------------------------------------------------------- compress


def check_target(recipe: Recipe, bundle: DataBundle, per_image: int | None = None) -> Analysis:
    """Analyse the architecture (no data, no training) so that an unknown model or an
    infeasible target, or training batches past the machine's memory, are refused before a run
    directory exists; the analysis is then passed on to the prune stage instead of being built
    again. ``per_image``: the activation estimate ``check_input_memory`` already made."""
    # loading the weights here too means a corrupt weights file is refused before any run exists
    model = create_model(recipe.model.name, weights=recipe.model.weights, **model_kwargs(recipe, bundle)).eval()
    if per_image is None:
        per_image = check_input_memory(recipe)
    shape = "x".join(map(str, bundle.input_shape))
    batch = min(recipe.data.batch_size, len(bundle.train))
    copies, why = images_per_sample(recipe.distill)  # a distillation that trains on transformed copies
    memory.require(
        memory.training_bytes(per_image, batch, copies),
        f"training {recipe.model.name} on batches of {batch} {shape} images" + (f" {why}" if copies > 1 else ""),
        "lower data.batch_size or data.image_size",
    )
    analysis = analyse(model, recipe, torch.zeros(1, *bundle.input_shape))
    check_feasible(model, recipe, analysis)
    return analysis


def check_latency_target(run: RunDir, recipe: Recipe) -> dict | None:
    """Predicted against measured, for a latency target: the prune stage's prediction and the
    profile stage's interleaved teacher/student timing at the target's batch on its backend.
    Recorded as ``latency_target``; ``passed`` is False when the measured speed-up falls short of
    the target's by more than ``prune.latency.tolerance`` (None: reported, never failed).
    ``prune.latency.precision: int8``: the quantize stage's timing instead, the INT8 student
    against the FP32 teacher in the same rounds."""
    lat = recipe.prune.latency
    predicted = run.metric("prune.latency")
    key = str(lat.batch)
    if lat.precision == "int8":
        profiled = (run.metric("quantize") or {}).get("latency") or {}
        student = (profiled.get("student_int8") or {}).get(key) or {}
        measured_speedup = ((profiled.get("speedup") or {}).get("combined") or {}).get(key)
    else:
        profiled = run.metric(f"latency.{lat.backend}") or {}
        student = (profiled.get("student") or {}).get(key) or {}
        measured_speedup = (profiled.get("speedup") or {}).get(key)
    if not predicted or not profiled:
        return None
    if measured_speedup is None or "p50_ms" not in student:
        return None
    target = predicted["target_speedup"]
    shortfall = 1 - measured_speedup / target
    tolerance = lat.tolerance
    passed = tolerance is None or shortfall <= tolerance
    out = {
        "backend": lat.backend,
        "batch": lat.batch,
        "precision": lat.precision,
        "target_speedup": target,
        "predicted_speedup": predicted["predicted_speedup"],
        "measured_speedup": measured_speedup,
        "predicted_ms": predicted["predicted_ms"],
        "measured_ms": student["p50_ms"],
        "prediction_error": student["p50_ms"] / predicted["predicted_ms"] - 1,
        "shortfall": shortfall,
        "tolerance": tolerance,
        "passed": passed,
    }
    out["message"] = (
        f"latency target: measured {measured_speedup:.2f}x faster on {lat.backend} at batch {lat.batch}"
        + (" (INT8 student against the FP32 teacher)" if lat.precision == "int8" else "")
        + f", target {target:.2f}x (predicted {predicted['predicted_speedup']:.2f}x)"
        + (
            ""
            if passed
            else f": {shortfall:.0%} short, more than the tolerance {tolerance:.0%} (prune.latency.tolerance)"
        )
    )
    run.record("latency_target", out)
    log(out["message"])
    return out


def default_out(model: str, recipe: Recipe) -> Path:
    """``runs/<model>-<recipe>``: one path component, whatever the model name holds (a
    ``timm/...`` name, a ``file.py:fn`` builder), so a run never lands outside ``runs/``."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{model}-{recipe.name}").lstrip(".") or "run"
    return Path("runs") / stem


RANDOM_WEIGHTS = "random"  # --weights random: prune a randomly initialised model on purpose


def prepare_recipe(
    model: str, recipe_name: str, *, data: str | None = None, weights: str | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The recipe with the command's data root, weights and ``key=value`` overrides applied.

    A recipe's weights belong to the recipe's model: asked to prune another model with them and
    nothing else to start from (no ``--weights``, no teacher training), this refuses before any
    work, instead of spending minutes pruning a random network; ``--weights random`` says that
    a random network is what is wanted."""
    recipe = load_recipe(recipe_name, list(overrides), model=canonical_name(model))
    if data is not None:
        if not Path(data).exists():
            raise UserError(f"data root {data}: path does not exist")
        recipe.data.root = str(Path(data).resolve())
    if weights == RANDOM_WEIGHTS:
        recipe.model.weights = None
    elif weights is not None:
        if (
            "." in Path(weights).name
            and not Path(weights).exists()
            and Path(weights).suffix in (".pt", ".pth", ".safetensors")
        ):
            raise UserError(f"weights {weights}: file not found")
        recipe.model.weights = str(Path(weights).resolve()) if Path(weights).exists() else weights
    elif not recipe.model.weights and recipe.teacher.train_epochs == 0:
        own = load_recipe(recipe_name, list(overrides)).model
        if own.name != recipe.model.name and own.weights:
            raise UserError(
                f"recipe {recipe.name} brings weights for {own.name} ({own.weights}), not for {model}: give --weights "
                f"for {model}, use a recipe that trains its teacher (teacher.train_epochs), or --weights "
                f"{RANDOM_WEIGHTS} to prune a randomly initialised {model}"
            )
    return recipe


def compress(
    model: str,
    recipe_name: str,
    *,
    data: str | None = None,
    weights: str | None = None,
    out: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    resume: bool = False,
    command: list[str] | None = None,
) -> dict:
    """The whole pipeline; returns the report. Raises GateFailed (after writing the report)
    when a parity gate fails.

    Under torchrun (WORLD_SIZE > 1) every rank trains the teacher and prune stages in data
    parallel; rank 0 alone writes the run directory and runs export, verify, profile and
    quantize, the other ranks joining it only to train QAT (cascadec.quantize.qat_ranks); they
    return an empty dict when rank 0 is done. When torchrun restarts the workers after one died
    (``--max-restarts``), the run resumes from its directory as ``resume`` would (a different
    recipe is still refused)."""
    recipe = prepare_recipe(model, recipe_name, data=data, weights=weights, overrides=overrides)
    dist, dev = init_from_env(resolve_device(device))
    restarts = elastic_restart()
    if restarts and not resume:  # torchrun restarted the workers after one died: carry on, as --resume does
        log(f"torchrun restart {restarts}: resuming the run from its last checkpoint")
        resume = True
    try:
        per_image = check_input_memory(recipe)  # an image size past the machine: refused before data is built
        bundle = load_data(recipe)  # fail on missing data before creating anything
        analysis = check_target(recipe, bundle, per_image)
        run = open_run(dist, Path(out) if out else default_out(model, recipe), recipe, resume, command)
        torch.manual_seed(recipe.train.seed)
        loaders = make_loaders(bundle, recipe, dev, dist)
        runtime = training_runtime(run, recipe, dev, dist)
        with closing_run(run):
            teacher = stage_teacher(run, recipe, bundle, loaders, dev, runtime)
            student = stage_prune(run, recipe, teacher, bundle, loaders, dev, runtime, analysis)
            q = recipe.quantize
            ranks = QatRanks.open(dist, dev, wants_qat=q.precision == "int8" and q.qat != "off")
            if not dist.is_main:
                if ranks is not None:  # rank 0 may ask them to fine-tune the INT8 student with it
                    follow(ranks, QatInputs(recipe, teacher, student, bundle, ranks=ranks), run)
                return {}
            try:
                parity, target_check, report = _main_rank_stages(run, recipe, teacher, student, bundle, ranks)
            finally:
                if ranks is not None:
                    ranks.close()
    finally:
        shutdown(dist)
    raise_on_failure(parity)
    if report.get("quantize"):
        raise_on_quantize_failure(report["quantize"])
    if target_check is not None and not target_check["passed"]:
        raise GateFailed(target_check["message"])
    return report


def _main_rank_stages(
    run: RunDir, recipe: Recipe, teacher: nn.Module, student: nn.Module, bundle: DataBundle, ranks: QatRanks | None
) -> tuple[Any, dict | None, dict]:
    """Rank 0's part of :func:`compress` after the prune stage: export, verify, profile,
    quantize (the other ranks join its QAT through ``ranks``), the report."""
    shape = bundle.input_shape
    if not run.is_done("export"):
        stage_export(run, recipe, teacher, student, shape)
    parity = run.metric("parity") if run.is_done("verify") else stage_verify(run, recipe, student, bundle.val)
    lat = recipe.prune.latency if recipe.prune.target.is_latency else None
    if not run.is_done("profile"):
        batches = sorted({*recipe.profile.batches, lat.batch}) if lat else None
        stage_profile(run, recipe, shape, batches)
    if lat and lat.backend != "onnxruntime" and not run.is_done(f"profile.{lat.backend}"):
        stage_profile(run, recipe, shape, [lat.batch], backend=lat.backend)
    if recipe.quantize.precision != "none" and not run.is_done("quantize"):
        stage_quantize(run, recipe, teacher, student, bundle, ranks=ranks)
    target_check = check_latency_target(run, recipe) if lat else None
    report = write_run_report(run)
    return parity, target_check, report
