"""A Triton Inference Server model repository for a run's student.

    DIR/<name>_onnx/config.pbtxt      platform "onnxruntime_onnx"
    DIR/<name>_onnx/1/model.onnx
    DIR/<name>_trt/config.pbtxt       platform "tensorrt_plan" (only when student.plan exists)
    DIR/<name>_trt/1/model.plan

``<name>`` is the run directory's name (Triton allows letters, digits, ``_ . -``). Input
``input`` is FP32 ``[C, H, W]`` (``student.widths.json`` ``input_shape``), output ``logits``
is FP32 ``[num_classes]`` (``model_kwargs``); the batch axis is implicit (``max_batch_size``).
A ``.plan`` only loads in a Triton whose TensorRT version and GPU match the ones that built it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from cascadec.backends.tensorrt_backend import metadata_path
from cascadec.errors import UserError
from cascadec.prune.spec import read_spec
from cascadec.recipe import safe_name
from cascadec.run import RunDir

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def model_config(name: str, platform: str, max_batch_size: int, input_dims: Sequence[int], num_classes: int) -> str:
    """config.pbtxt text (protobuf text format) for one model."""
    dims = ", ".join(str(int(d)) for d in input_dims)
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {dims} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {int(num_classes)} ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


def repository_name(run_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(run_dir).resolve().name).strip("._") or "cascadec"
    return name


def write_model_repository(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    max_batch_size: int | None = None,
) -> list[Path]:
    """Write the repository; returns the files written. ``max_batch_size`` defaults to the
    engine's profile maximum (``student.plan.json``), else the recipe's largest profile batch."""
    with RunDir.open(Path(run_dir)) as run:
        onnx_path = run.file("student.onnx")
        if not onnx_path.is_file():
            raise UserError(f"{onnx_path}: missing; run cascadec export {run_dir} first")
        spec = read_spec(run.file("student.widths.json"))
        shape = [int(d) for d in spec["input_shape"]]
        num_classes = spec["model_kwargs"].get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"{run.file('student.widths.json')}: model_kwargs.num_classes missing")
        plan = run.file("student.plan")
        engine_max = None
        if plan.is_file() and metadata_path(plan).is_file():
            try:
                engine_max = int(json.loads(metadata_path(plan).read_text())["max_batch"])
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                engine_max = None
        if max_batch_size is None:
            max_batch_size = engine_max or max(int(b) for b in run.recipe().profile.batches)
        if max_batch_size < 1:
            raise UserError(f"max_batch_size {max_batch_size}: must be positive")
        out = Path(out_dir) if out_dir is not None else run.path / "triton"
        name = name or repository_name(run.path)
        try:
            safe_name(name, "Triton model name")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        written: list[Path] = []
        models = [(f"{name}_onnx", "onnxruntime_onnx", onnx_path, "model.onnx", max_batch_size)]
        if plan.is_file():
            # a TensorRT engine cannot serve batches above its profile's maximum
            models.append(
                (f"{name}_trt", "tensorrt_plan", plan, "model.plan", min(max_batch_size, engine_max or max_batch_size))
            )
        try:
            for model_name, platform, source, filename, mbs in models:
                version_dir = out / model_name / "1"
                version_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, version_dir / filename)
                config = out / model_name / "config.pbtxt"
                config.write_text(model_config(model_name, platform, mbs, shape, num_classes))
                written += [version_dir / filename, config]
        except OSError as exc:
            raise UserError(f"--triton-dir {out}: cannot write the model repository ({exc})") from None
        return written
