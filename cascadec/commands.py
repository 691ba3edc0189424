"""What ``cascadec export``, ``verify`` and ``profile`` do to an existing run directory.

They rebuild the student from its pickle-free artifacts, so they work in a fresh process
(or on another machine) with nothing but the run directory and the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cascadec.errors import UserError
from cascadec.run import RunDir


def _load_models(run: RunDir):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cascadec.models import create_model
    from cascadec.prune.spec import load_student, read_spec

    spec = read_spec(run.file("student.widths.json"))
    student, _ = load_student(run.path)
    teacher = create_model(spec["model"], **spec["model_kwargs"]).eval()
    path = run.file("teacher.safetensors")
    try:
        teacher.load_state_dict(load_file(str(path)))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; re-run compress with --resume") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{path}: unreadable teacher weights ({str(exc).splitlines()[0]})") from None
    return teacher, student, spec["input_shape"]


def export_run(run_dir: Path, *, trt: bool = False, fp16: bool = False, int8: bool = False) -> list[str]:
    """Re-export ONNX; ``trt`` builds TensorRT engines (a later issue: fails cleanly for now)."""
    from cascadec.stages import stage_export

    if (fp16 or int8) and not trt:
        raise UserError("--fp16/--int8 apply to TensorRT engines: add --trt")
    run = RunDir.open(run_dir)
    if trt:
        from cascadec.backends.tensorrt_backend import build_engine

        build_engine(run.file("student.onnx"), run.file("student.plan"), fp16=fp16, int8=int8)
    teacher, student, shape = _load_models(run)
    stage_export(run, run.recipe(), teacher, student, shape)
    return [f"wrote {run.file('teacher.onnx')}", f"wrote {run.file('student.onnx')}"]


def verify_run(run_dir: Path, *, backends: Sequence[str] = ("onnxruntime",), samples: int | None = None) -> dict:
    from cascadec.stages import load_data, stage_verify, write_run_report

    run = RunDir.open(run_dir)
    if not run.file("student.onnx").is_file():
        raise UserError(f"{run.file('student.onnx')}: missing; run cascadec export {run_dir} first")
    recipe = run.recipe()
    _, student, _ = _load_models(run)
    bundle = load_data(recipe)
    result = stage_verify(run, recipe, student, bundle.val, backends=backends, samples=samples)
    write_run_report(run)
    return result


def profile_path(target: Path, *, backend: str = "onnxruntime", batches: Sequence[int] = (1, 8, 32)) -> dict:
    """A run directory profiles teacher and student; an .onnx file profiles itself."""
    from cascadec.backends import canonical_name
    from cascadec.profile import profile_onnx
    from cascadec.stages import _progress, stage_profile, write_run_report

    name = canonical_name(backend)
    if name not in ("onnxruntime", "onnxruntime-cuda"):
        raise UserError(f"--backend {backend}: profile supports onnxruntime and onnxruntime-cuda for now")
    device = "cuda" if name == "onnxruntime-cuda" else "cpu"
    target = Path(target)
    if target.suffix == ".onnx":
        if not target.is_file():
            raise UserError(f"{target}: file not found")
        prof = profile_onnx(target, None, list(batches), device=device, progress=_progress())
        return {target.stem: {str(b): v for b, v in prof.items()}}
    run = RunDir.open(target)
    if device != "cpu":
        raise UserError("profiling a run directory on CUDA arrives with the deployment issue; profile its .onnx files directly")
    recipe = run.recipe()
    from cascadec.prune.spec import read_spec

    shape = read_spec(run.file("student.widths.json"))["input_shape"]
    result = stage_profile(run, recipe, shape, batches)
    write_run_report(run)
    return result
