"""What ``cascadec export``, ``verify`` and ``profile`` do to an existing run directory.

They rebuild the student from its pickle-free artifacts, so they work in a fresh process
(or on another machine) with nothing but the run directory and the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cascadec import progress
from cascadec.backends import get_backend, list_backends
from cascadec.backends.tensorrt_backend import build_engine
from cascadec.backends.triton import write_model_repository
from cascadec.compare import compare_runs
from cascadec.data.loaders import load_data
from cascadec.errors import UserError, first_line
from cascadec.models import create_model
from cascadec.plots import comparison_plot
from cascadec.profile.engines import profile_backend
from cascadec.profile.protocol import Timing, protocol_record
from cascadec.prune.spec import load_student, read_spec
from cascadec.recipe import Recipe, apply_overrides, parse_override, validate_recipe
from cascadec.report import write_run_report
from cascadec.run import RunDir
from cascadec.stages import check_latency_target, stage_export, stage_profile, stage_verify
from cascadec.verify.results import ParityResult

VERIFY_DATA_KEYS = ("data.root", "data.download", "data.workers")  # where the data is, not what it is


def _load_models(run: RunDir) -> tuple[nn.Module, nn.Module, list[int]]:
    """Teacher, student and input shape, rebuilt from the run's pickle-free artifacts."""
    spec = read_spec(run.file("student.widths.json"))
    student, _ = load_student(run.path)
    teacher = create_model(spec["model"], **spec["model_kwargs"]).eval()
    path = run.file("teacher.safetensors")
    try:
        teacher.load_state_dict(load_file(str(path)))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; re-run compress with --resume") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{path}: unreadable teacher weights ({first_line(exc)})") from None
    return teacher, student, spec["input_shape"]


def export_run(
    run_dir: Path,
    *,
    trt: bool = False,
    fp16: bool = False,
    int8: bool = False,
    int8_calibrator: bool = False,
    calib_images: int = 512,
    triton: bool = False,
    triton_dir: Path | None = None,
) -> list[str]:
    """Re-export ONNX; ``trt`` then builds ``student.plan`` (TensorRT), ``triton`` writes a
    Triton model repository (default RUN_DIR/triton). ``fp16`` and ``int8`` build strongly typed
    engines from the graphs that carry their precision (``_typed_source``); ``int8_calibrator``
    is TensorRT 10's implicit calibration of the FP32 graph instead."""
    if (fp16 or int8 or int8_calibrator) and not trt:
        raise UserError("--fp16/--int8/--int8-calibrator apply to TensorRT engines: add --trt")
    if sum((fp16, int8, int8_calibrator)) > 1:
        raise UserError("choose one of --fp16, --int8 and --int8-calibrator")
    if calib_images < 1:
        raise UserError(f"--calib-images {calib_images}: must be a positive number of images")
    if triton_dir is not None and not triton:
        raise UserError("--triton-dir applies to --triton: add --triton")
    with RunDir.open(run_dir) as run:
        if trt:  # fail fast (one line) on machines without TensorRT or a GPU, before any work
            get_backend("tensorrt").require()
        recipe = run.recipe()
        teacher, student, shape = _load_models(run)
        stage_export(run, recipe, teacher, student, shape)
        lines = [f"wrote {run.file('teacher.onnx')}", f"wrote {run.file('student.onnx')}"]
        if trt:
            images = calibration_images(recipe, calib_images) if int8_calibrator else None
            meta = build_engine(
                _typed_source(run, fp16=fp16, int8=int8),
                run.file("student.plan"),
                int8=int8_calibrator,
                batches=tuple(recipe.profile.batches),
                calibration_images=images,
            )
            run.record("tensorrt", meta)
            lines.append(
                f"wrote {run.file('student.plan')} ({meta['precision']}, TensorRT {meta['tensorrt']}, {meta['gpu']})"
            )
        if triton:
            written = write_model_repository(run.path, triton_dir)
            lines += [f"wrote {p}" for p in written]
        return lines


def _typed_source(run: RunDir, *, fp16: bool, int8: bool) -> Path:
    """The ONNX file an engine is built from: the FP16 graph (converted from student.onnx where
    missing: no data needed), the quantize stage's Q/DQ INT8 graph for TensorRT (calibrated and
    verified there: it is never made here without them), or the FP32 graph."""
    from cascadec.quantize.flavours import FP16_FILE, get_flavour

    if fp16:
        path = run.file(FP16_FILE)
        if not path.is_file():
            from cascadec.quantize.ptq import convert_fp16

            convert_fp16(run.file("student.onnx"), path)
        return path
    if int8:
        path = run.file(get_flavour("tensorrt").file)
        if not path.is_file():
            raise UserError(
                f"{path}: missing; run `cascadec quantize {run.path}` first (it calibrates and verifies the Q/DQ "
                "INT8 graph TensorRT builds strongly typed), or --int8-calibrator for TensorRT 10's implicit calibration"
            )
        return path
    return run.file("student.onnx")


def calibration_images(recipe: Recipe, count: int) -> np.ndarray:
    """The first ``count`` training images of the run's data (N x C x H x W float32), for INT8."""
    train = load_data(recipe).train
    n = min(int(count), len(train))
    if n == 0:
        raise UserError(f"data {recipe.data.name}: no training images to calibrate INT8 with")
    return np.stack([np.asarray(train[i][0], dtype=np.float32) for i in range(n)])


def quantize_run(
    run_dir: Path,
    *,
    precision: str | None = None,
    calib_images: int | None = None,
    overrides: Sequence[str] = (),
    profile: bool = True,
) -> dict:
    """Quantize a finished run's student (cascadec.quantize.stage); returns the outcome's dict.
    ``precision`` defaults to the recipe's, and to int8 when the recipe has none. The caller
    decides whether a failed gate fails (:func:`cascadec.quantize.stage.raise_on_quantize_failure`)."""
    from cascadec.quantize.stage import settings_with, stage_quantize

    if precision not in (None, "int8", "fp16"):
        raise UserError(f"--precision {precision!r}: use int8 or fp16")
    with RunDir.open(run_dir) as run:
        recipe = run.recipe()
        for text in overrides:
            keys = parse_override(text)[0]
            if keys[0] not in ("quantize", "verify") and ".".join(keys[:2]) not in VERIFY_DATA_KEYS:
                raise UserError(
                    f"override {'.'.join(keys)!r} cannot apply to a finished run; quantize takes "
                    f"quantize.*, verify.* and {', '.join(VERIFY_DATA_KEYS)}"
                )
        if overrides:
            recipe = validate_recipe(apply_overrides(recipe.model_dump(mode="json"), list(overrides)), "--set")
        if precision is None and recipe.quantize.precision == "none":
            precision = "int8"
        settings = settings_with(recipe, precision, calib_images)
        if not run.file("student.widths.json").is_file():
            raise UserError(f"{run.path}: no student yet; finish the run (cascadec compress --resume) first")
        teacher, student, shape = _load_models(run)
        if not (run.file("student.onnx").is_file() and run.file("teacher.onnx").is_file()):
            stage_export(run, recipe, teacher, student, shape)
        bundle = load_data(recipe)
        if bundle.input_shape != list(shape):
            raise UserError(
                f"{run.file('recipe.yaml')}: data gives {bundle.input_shape} inputs but the student takes {list(shape)}"
            )
        outcome = stage_quantize(run, recipe, teacher, student, bundle, settings, profile=profile)
        result = outcome.to_dict()
        if profile and recipe.prune.target.is_latency and recipe.prune.latency.precision == "int8":
            # the run's latency target names INT8: these rounds are what it is judged on
            result["latency_target"] = check_latency_target(run, recipe)
        write_run_report(run)
        return result


def report_runs(
    run_dirs: Sequence[Path],
    out: Path | None = None,
    *,
    backend: str | None = None,
    batch: int = 1,
    remeasure: bool = True,
) -> dict:
    """Compare runs (``cascadec.compare``): every student, and each group's teacher, with its
    accuracy, FLOPs and p50 at ``batch`` on ``backend``, timed again side by side where the ONNX
    files are here (``remeasure``); draw one Pareto front per group of comparable runs."""
    out = Path(out) if out is not None else Path("pareto.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is a PNG; give a path ending in .png")
    comparison = compare_runs(run_dirs, backend=backend, batch=batch, remeasure=remeasure)
    comparison_plot(comparison, out)
    return {**comparison.to_dict(), "plot": str(out)}


def verify_run(
    run_dir: Path,
    *,
    backends: Sequence[str] = ("onnxruntime",),
    samples: int | None = None,
    overrides: Sequence[str] = (),
) -> ParityResult:
    """Gate ``backends`` against the run's PyTorch student; ``overrides`` (``verify.tolerances.fp16.atol=0.05``)
    change the run's recipe for this check only (recipe.yaml is not rewritten)."""
    specs = [get_backend(b) for b in backends]  # a typo fails before models and data load
    with RunDir.open(run_dir) as run:
        if not run.file("student.onnx").is_file():
            raise UserError(f"{run.file('student.onnx')}: missing; run cascadec export {run_dir} first")
        recipe = run.recipe()
        if overrides:
            for text in overrides:  # the run is finished: only the check and where its data lives can change
                keys = parse_override(text)[0]
                if keys[0] != "verify" and ".".join(keys[:2]) not in VERIFY_DATA_KEYS:
                    raise UserError(
                        f"override {'.'.join(keys)!r} cannot apply to a finished run; verify takes "
                        f"verify.* and {', '.join(VERIFY_DATA_KEYS)}"
                    )
            recipe = validate_recipe(apply_overrides(recipe.model_dump(mode="json"), list(overrides)), "--set")
        for spec in specs:
            spec.require()
            if spec.runs == "engine" and not run.file("student.plan").is_file():
                raise UserError(
                    f"{run.file('student.plan')}: missing; build it with 'cascadec export {run_dir} --trt' first"
                )
        _, student, shape = _load_models(run)
        bundle = load_data(recipe)
        if bundle.input_shape != list(shape):
            raise UserError(
                f"{run.file('recipe.yaml')}: data gives {bundle.input_shape} inputs but the student takes {list(shape)}"
            )
        result = stage_verify(run, recipe, student, bundle.val, backends=[s.name for s in specs], samples=samples)
        write_run_report(run)
        return result


def profile_path(
    target: Path,
    *,
    backend: str = "onnxruntime",
    batches: Sequence[int] = (1, 8, 32),
    cuda_graph: bool = False,
    warmup_s: float | None = None,
    duration_s: float | None = None,
    min_iters: int | None = None,
    threads: int | None = None,
) -> dict:
    """A run directory profiles teacher and student on ``backend`` (recorded in its report);
    an .onnx file (onnxruntime backends) or a .plan file (tensorrt) profiles itself.

    ``warmup_s``/``duration_s``/``min_iters``/``threads`` override the run's recipe (trtexec's
    defaults for a single file); ``cuda_graph`` replays a captured CUDA graph (torch-cuda only)."""
    spec = get_backend(backend)
    name = spec.name
    if cuda_graph and name != "torch-cuda":
        raise UserError(f"CUDA graphs apply to backend torch-cuda, not {name}")
    target = Path(target)
    if target.suffix in (".onnx", ".plan"):  # a run's overrides are checked by the recipe schema instead
        if duration_s is not None and not duration_s > 0:
            raise UserError(f"duration {duration_s}: must be > 0 seconds")
        if spec.suffix != target.suffix:
            usable = [b for b in list_backends() if get_backend(b).suffix == target.suffix]
            raise UserError(
                f"{target.name}: backend {name} cannot run a {target.suffix} file; use {' or '.join(usable)}"
            )
        if not target.is_file():
            raise UserError(f"{target}: file not found")
        spec.require(timing=True)
        given = {"warmup_s": warmup_s, "min_duration_s": duration_s, "min_iters": min_iters}
        timing = Timing(**{k: v for k, v in given.items() if v is not None})  # trtexec's defaults otherwise
        source = {"onnx_path": target} if spec.runs == "onnx" else {"engine_path": target}
        prof = profile_backend(
            name,
            **source,
            input_shape=None,
            batches=list(batches),
            progress=progress.enabled(),
            cache_dir=target.parent / "ort_trt_cache",
            threads=threads,
            timing=timing,
        )
        return {
            target.stem: {str(b): v for b, v in prof.items()},
            "protocol": protocol_record(
                backend=name, device=spec.device, threads=threads if spec.device == "cpu" else None, timing=timing
            ),
        }
    with RunDir.open(target) as run:
        spec.require(timing=True)  # before reading models or opening the stage: one line on machines without it
        recipe = run.recipe()
        shape = read_spec(run.file("student.widths.json"))["input_shape"]
        models = None
        if spec.runs == "torch":
            teacher, student, shape = _load_models(run)
            models = {"teacher": teacher, "student": student}
        overrides = {
            "warmup_s": warmup_s,
            "duration_s": duration_s,
            "min_iters": min_iters,
            "threads": threads,
            "cuda_graph": True if cuda_graph else None,
        }
        result = stage_profile(run, recipe, shape, batches, backend=name, overrides=overrides, models=models)
        write_run_report(run)  # report.json/report.md and latency.png
        return result
