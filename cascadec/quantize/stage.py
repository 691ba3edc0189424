"""The quantize stage: the pruned student in reduced precision, calibrated, verified and timed.

    student.onnx -> prepare -> calibrate once -> one Q/DQ graph per flavour (+ student.fp16.onnx)
                 -> sensitivity pass where INT8 misses quantize.max_accuracy_drop
                 -> verify each file against the FP32 student (test split, precision gates)
                 -> time teacher FP32, student FP32 and student INT8 in interleaved rounds

It reads ``student.onnx`` and ``teacher.onnx`` from the run directory and writes its files
beside them; :class:`QuantizeOutcome` is what it records (``quantize`` in the manifest) and
what the report renders, so neither reads loose keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cascadec import progress
from cascadec.backends.onnxruntime_backend import OrtRunner, graph_precision
from cascadec.data.bundle import DataBundle
from cascadec.envinfo import x86_int8_dot
from cascadec.errors import GateFailed, UserError
from cascadec.profile.engines import profile_backend
from cascadec.profile.protocol import Timing, compare, profile_interleaved, protocol_record
from cascadec.progress import log
from cascadec.quantize.calibration import sample_images
from cascadec.quantize.flavours import FP16_FILE, Flavour, get_flavour, resolve_reduce_range
from cascadec.quantize.ptq import (
    compute_nodes,
    convert_fp16,
    int8_kernel_count,
    ort_kernels,
    prepare,
    quantize_int8,
    resolve_exclude,
)
from cascadec.quantize.qat import QatInputs, qat_flavour, torch_layers
from cascadec.quantize.qat_ranks import QatRanks
from cascadec.quantize.sensitivity import FloatLayers, keep_in_float, onnx_accuracy, rank_layers
from cascadec.recipe import QuantizeSection, Recipe, with_values
from cascadec.run import RunDir, library_versions
from cascadec.verify.gates import Gate
from cascadec.verify.parity import verify_backends
from cascadec.verify.present import raise_on_failure
from cascadec.verify.results import ParityResult

WORK_DIR = "quantize"  # RUN/quantize: the prepared graph and the calibration cache
FP16_NOTE = "not timed on onnxruntime (CPU): its CPU provider has no fast FP16 kernels; FP16 is for TensorRT"


@dataclass
class QuantizedArtifact:
    """One reduced-precision file: what it is for, how accurate it is on the selection split."""

    name: str  # int8-onnxruntime, int8-tensorrt, fp16
    file: str
    precision: str
    consumer: str
    selection_accuracy: float
    accuracy_drop: float  # FP32 student minus this, on the selection split
    graph: dict[str, Any] = field(default_factory=dict)
    float_layers: FloatLayers | None = None
    kernels: dict[str, int] | None = None  # onnxruntime flavour: what ORT's optimised graph runs
    qat: dict[str, Any] | None = None  # when QAT + KD ran: its accuracy against PTQ's and which shipped
    judged_on: str = ""  # how its accuracies were computed (Flavour.judged_on)
    reduce_range: bool = False  # 7-bit weights

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "precision": self.precision,
            "consumer": self.consumer,
            "judged_on": self.judged_on,
            "selection_accuracy": self.selection_accuracy,
            "accuracy_drop": self.accuracy_drop,
            "graph": self.graph,
        }
        if self.float_layers is not None:
            out["sensitivity"] = self.float_layers.to_dict()
        if self.qat is not None:
            out["qat"] = self.qat
        if self.precision == "int8":
            out["reduce_range"] = self.reduce_range
        if self.kernels is not None:
            out["ort_kernels"] = self.kernels
            out["ort_int8_kernels"] = int8_kernel_count(self.kernels)
        return out


@dataclass
class QuantizeOutcome:
    """What the stage produced; ``to_dict`` is the manifest's and report.json's ``quantize``."""

    precision: str
    settings: dict[str, Any]
    library: dict[str, str]
    calibration: dict[str, Any]
    selection: dict[str, Any]
    artifacts: dict[str, QuantizedArtifact]
    parity: ParityResult | None = None
    reference_accuracy: dict[str, float] = field(default_factory=dict)  # on the verify samples
    latency: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "settings": self.settings,
            "library": self.library,
            "calibration": self.calibration,
            "selection": self.selection,
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "reference_accuracy": self.reference_accuracy,
            "latency": self.latency,
            "passed": self.passed,
        }


def _labelled(dataset: Dataset, count: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(int(count), len(dataset))  # type: ignore[arg-type]
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return np.stack([np.asarray(x, dtype=np.float32) for x in xs]), np.asarray([int(y) for y in ys])


def settings_with(recipe: Recipe, precision: str | None = None, calib_images: int | None = None) -> QuantizeSection:
    """recipe.quantize with the command's --precision / --calib-images, validated by the schema."""
    values = {"quantize.precision": precision, "quantize.calibration.images": calib_images}
    return with_values(recipe, values, "quantize options").quantize


def stage_quantize(
    run: RunDir,
    recipe: Recipe,
    teacher: nn.Module,
    student: nn.Module,
    bundle: DataBundle,
    settings: QuantizeSection | None = None,
    *,
    profile: bool = True,
    ranks: QatRanks | None = None,
) -> QuantizeOutcome:
    """Build, verify and time the reduced-precision students; records ``quantize`` and returns
    the outcome (a failed gate is in ``outcome.parity``: :func:`raise_on_quantize_failure`).
    ``ranks``: a torchrun job's other ranks, which then train QAT beside this one."""
    q = settings or recipe.quantize
    if q.precision == "none":
        raise UserError("quantize.precision is none: nothing to quantize (give --precision int8 or fp16)")
    fp32 = run.file("student.onnx")
    if not fp32.is_file():
        raise UserError(f"{fp32}: missing; run cascadec export {run.path} first")
    work = run.file(WORK_DIR)
    work.mkdir(exist_ok=True)
    with run.stage("quantize") as info:
        selection = bundle.selection if bundle.selection is not None else bundle.train
        sel_x, sel_y = _labelled(selection, q.selection_images)
        fp32_accuracy = onnx_accuracy(fp32, sel_x, sel_y)
        artifacts: dict[str, QuantizedArtifact] = {}
        calibration: dict[str, Any] = {"split": "train", "method": q.calibration.method}
        if q.precision == "int8":
            images = sample_images(bundle.train, q.calibration.images, seed=recipe.train.seed)
            calibration.update(
                images=int(len(images)),
                seed=recipe.train.seed,
                # the CPU judging the files, and whether it gave the onnxruntime flavour 7-bit weights
                # (None: no onnxruntime flavour built; each file records its own too)
                cpu_int8_dot=x86_int8_dot(),
                reduce_range=resolve_reduce_range(q.reduce_range) if "onnxruntime" in q.flavours else None,
            )
            if q.calibration.method == "percentile":
                calibration["percentile"] = q.calibration.percentile
            prepared = work / "prepared.onnx"
            calibration["prepared"] = prepare(fp32, prepared)
            cache = work / f"calibration.{q.calibration.method}.{len(images)}.json"
            cache.unlink(missing_ok=True)  # a cache from other images or another student must not be reused
            nodes = compute_nodes(prepared, torch_layers(student, bundle.input_shape))
            excluded = resolve_exclude(q.exclude, nodes)
            qat = QatInputs(recipe, teacher, student, bundle, ranks=ranks)
            for name in progress.track(q.flavours, "quantize INT8", total=len(q.flavours)):
                artifacts[f"int8-{name}"] = _int8_flavour(
                    run, q, name, prepared, images, cache, nodes, excluded, sel_x, sel_y, fp32_accuracy, qat
                )
        artifacts["fp16"] = _fp16(run, fp32, sel_x, sel_y, fp32_accuracy)
        outcome = QuantizeOutcome(
            precision=q.precision,
            settings=q.model_dump(mode="json"),
            library={k: v for k, v in library_versions().items() if k in ("onnx", "onnxruntime")},
            calibration=calibration,
            selection={"images": int(len(sel_x)), "fp32_accuracy": fp32_accuracy},
            artifacts=artifacts,
        )
        outcome.parity, outcome.reference_accuracy = _verify(run, recipe, teacher, student, bundle, artifacts)
        if q.precision == "int8" and q.max_float_layers > 0:
            for key, artifact in artifacts.items():
                failed = not outcome.parity.backends[key].passed
                if failed and artifact.precision == "int8" and artifact.float_layers is None:
                    # the gate failed on the test split though the selection budget held: name the
                    # layers INT8 hurts most, for the failure message (nothing is changed)
                    flavour = flavour_for(q, key.removeprefix("int8-"))
                    probe = Probe(
                        work / f"probe.{flavour.name}.onnx",
                        prepared,
                        flavour,
                        images,
                        _ptq_options(q, cache, nodes),
                        sel_x,
                        sel_y,
                    )
                    candidates = [n for n in nodes if n["node"] not in excluded]
                    artifact.float_layers = FloatLayers(
                        budget=q.max_accuracy_drop,
                        reference_accuracy=fp32_accuracy,
                        sensitivity=rank_layers(candidates, fp32_accuracy, probe.accuracy_only),
                        met=True,
                        reason="verify gate failed",
                    )
                    probe.path.unlink(missing_ok=True)
        if profile and "int8-onnxruntime" in artifacts:
            outcome.latency = _profile(run, recipe, artifacts["int8-onnxruntime"].file)
        info.update(
            artifacts={k: a.file for k, a in artifacts.items()},
            passed=outcome.passed,
            float_layers={
                k: [r["module"] for r in a.float_layers.kept] if a.float_layers else a.graph.get("float_layers", [])
                for k, a in artifacts.items()
                if a.precision == "int8"
            },
        )
    run.record("quantize", outcome.to_dict())
    return outcome


def flavour_for(q: QuantizeSection, name: str) -> Flavour:
    """The flavour as this recipe builds it: ``quantize.tensorrt_float`` sets the TensorRT flavour's
    float parts (FP16 by default)."""
    flavour = get_flavour(name)
    if flavour.float_dtype != "fp32":  # the flavours whose float parts may be reduced
        flavour = replace(flavour, float_dtype=q.tensorrt_float)
    return flavour


def _ptq_options(q: QuantizeSection, cache: Path, nodes: list[dict[str, str]]) -> dict[str, Any]:
    """``quantize_int8``'s keyword arguments every build of one stage shares: the calibration method,
    the one calibration cache, and the PyTorch names of the nodes."""
    return {
        "method": q.calibration.method,
        "percentile": q.calibration.percentile,
        "cache": cache,
        "names": {n["node"]: n["module"] for n in nodes},
        "reduce_range": resolve_reduce_range(q.reduce_range),
    }


@dataclass
class Probe:
    """Quantize ``prepared`` with some layers only, or some left out, and score the result on the
    selection split: the sensitivity pass's two questions, on one cached calibration."""

    path: Path
    prepared: Path
    flavour: Flavour
    images: np.ndarray
    method: dict[str, Any]
    sel_x: np.ndarray
    sel_y: np.ndarray

    def accuracy_only(self, only: list[str]) -> float:
        quantize_int8(self.prepared, self.path, self.flavour, self.images, only_nodes=only, **self.method)
        return onnx_accuracy(self.path, self.sel_x, self.sel_y, fused=self.flavour.judge_fused)

    def accuracy_excluding(self, excluded: list[str]) -> float:
        quantize_int8(self.prepared, self.path, self.flavour, self.images, exclude_nodes=excluded, **self.method)
        return onnx_accuracy(self.path, self.sel_x, self.sel_y, fused=self.flavour.judge_fused)


def _int8_flavour(
    run: RunDir,
    q: QuantizeSection,
    name: str,
    prepared: Path,
    images: np.ndarray,
    cache: Path,
    nodes: list[dict[str, str]],
    excluded: list[str],
    sel_x: np.ndarray,
    sel_y: np.ndarray,
    fp32_accuracy: float,
    qat: QatInputs | None = None,
) -> QuantizedArtifact:
    flavour = flavour_for(q, name)
    out = run.file(flavour.file)
    method = _ptq_options(q, cache, nodes)
    graph = quantize_int8(prepared, out, flavour, images, exclude_nodes=excluded, **method)
    accuracy = onnx_accuracy(out, sel_x, sel_y, fused=flavour.judge_fused)
    float_layers = None
    if fp32_accuracy - accuracy > q.max_accuracy_drop and q.max_float_layers > 0:
        log(
            f"INT8 ({name}): {fp32_accuracy - accuracy:.4f} below FP32 on the selection split, more than "
            f"{q.max_accuracy_drop:g}: finding the layers to keep in float"
        )
        probe = Probe(run.file(WORK_DIR) / f"probe.{name}.onnx", prepared, flavour, images, method, sel_x, sel_y)
        ranked = rank_layers([n for n in nodes if n["node"] not in excluded], fp32_accuracy, probe.accuracy_only)
        float_layers = keep_in_float(
            ranked, fp32_accuracy, q.max_accuracy_drop, probe.accuracy_excluding, excluded, q.max_float_layers
        )
        if float_layers.kept:  # the best graph found is the one shipped
            kept = [*excluded, *(r["node"] for r in float_layers.kept)]
            graph = quantize_int8(prepared, out, flavour, images, exclude_nodes=kept, **method)
            accuracy = onnx_accuracy(out, sel_x, sel_y, fused=flavour.judge_fused)
        probe.path.unlink(missing_ok=True)
    qat_record = None
    short = fp32_accuracy - accuracy > q.max_accuracy_drop
    if qat is not None and (q.qat == "always" or (q.qat == "auto" and short)):
        kept = [*excluded, *(r["node"] for r in float_layers.kept)] if float_layers else list(excluded)
        qat_record, graph, accuracy = qat_flavour(
            run, q, flavour, qat, images, kept, nodes, sel_x, sel_y, graph, accuracy, method
        )
    kernels = ort_kernels(out) if name == "onnxruntime" else None
    if kernels is not None and int8_kernel_count(kernels) == 0:
        log(f"INT8 ({name}): ONNX Runtime runs no int8 kernel in {out.name}: it will be no faster than FP32")
    log(
        f"INT8 ({name}): {out.name}, selection accuracy {accuracy:.4f} (FP32 {fp32_accuracy:.4f}), "
        f"{graph['int8_layers']} int8 layers, {len(graph['float_layers'])} in float"
    )
    return QuantizedArtifact(
        name=f"int8-{name}",
        file=out.name,
        precision=graph_precision(out),
        consumer=flavour.consumer,
        selection_accuracy=accuracy,
        accuracy_drop=fp32_accuracy - accuracy,
        graph=graph,
        float_layers=float_layers,
        kernels=kernels,
        qat=qat_record,
        judged_on=flavour.judged_on,
        reduce_range=flavour.quantize_kwargs(method["reduce_range"])["reduce_range"],
    )


def _fp16(run: RunDir, fp32: Path, sel_x: np.ndarray, sel_y: np.ndarray, fp32_accuracy: float) -> QuantizedArtifact:
    out = run.file(FP16_FILE)
    graph = convert_fp16(fp32, out)
    accuracy = onnx_accuracy(out, sel_x, sel_y)
    log(f"FP16: {out.name}, selection accuracy {accuracy:.4f} (FP32 {fp32_accuracy:.4f})")
    return QuantizedArtifact(
        name="fp16",
        file=out.name,
        precision=graph_precision(out),
        consumer="TensorRT FP16 engines",
        judged_on="ONNX Runtime CPU",
        selection_accuracy=accuracy,
        accuracy_drop=fp32_accuracy - accuracy,
        graph=graph,
    )


def _verify(
    run: RunDir,
    recipe: Recipe,
    teacher: nn.Module,
    student: nn.Module,
    bundle: DataBundle,
    artifacts: dict[str, QuantizedArtifact],
) -> tuple[ParityResult, dict[str, float]]:
    """Each file against the FP32 PyTorch student on the test split's first ``verify.samples``
    images, with its precision's gates; the teacher's accuracy on the same images beside it."""
    samples = min(recipe.verify.samples, len(bundle.val))
    subset = Subset(bundle.val, range(samples))
    gate = Gate.from_recipe(recipe.verify)
    merged: dict = {}
    torch_accuracy = None
    for name, artifact in artifacts.items():
        fused = get_flavour(name.removeprefix("int8-")).judge_fused if name.startswith("int8-") else True
        result = verify_backends(
            student.cpu().eval(),
            run.file(artifact.file),
            DataLoader(subset, batch_size=64, shuffle=False),
            runners={"onnxruntime": OrtRunner(run.file(artifact.file), device="cpu", fused=fused)},
            gate=gate,
            samples=samples,
            progress=progress.enabled(),
            find_divergence=False,  # a Q/DQ graph has no float node to line up; the sensitivity pass names layers
        )
        merged[name] = result.backends["onnxruntime"]
        torch_accuracy = result.torch_accuracy
    teacher_hits, seen = 0, 0
    with torch.inference_mode():
        for x, y in DataLoader(subset, batch_size=128, shuffle=False):
            teacher_hits += int((teacher.cpu().eval()(x).argmax(dim=1) == y).sum())
            seen += len(y)
    parity = ParityResult(samples=samples, torch_accuracy=torch_accuracy, gate=gate.as_dict(), backends=merged)
    reference = {"student_fp32": torch_accuracy, "teacher_fp32": teacher_hits / max(seen, 1)}
    return parity, reference


def _profile(run: RunDir, recipe: Recipe, int8_file: str) -> dict[str, Any]:
    """Teacher FP32, student FP32 and student INT8 on ONNX Runtime's CPU provider, in the same
    interleaved rounds: pruning's, quantization's and the combined speed-up, each per batch."""
    p = recipe.profile
    timing = Timing(warmup_s=p.warmup_s, min_duration_s=p.duration_s, min_iters=p.min_iters)
    files = {"teacher": "teacher.onnx", "student": "student.onnx", "student_int8": int8_file}
    missing = [f for f in files.values() if not run.file(f).is_file()]
    if missing:
        raise UserError(f"{run.file(missing[0])}: missing; run cascadec export {run.path} first")

    lat = recipe.prune.latency
    # an INT8 latency target is judged on these rounds (stages.check_latency_target): its batch too
    int8_target = recipe.prune.target.is_latency and lat.precision == "int8"
    batches = sorted({*p.batches, lat.batch}) if int8_target else list(p.batches)

    def profile_one(name: str, share: Timing) -> dict[int, dict]:
        return profile_backend(
            "onnxruntime",
            onnx_path=run.file(files[name]),
            input_shape=None,
            batches=batches,
            timing=share,
            threads=p.threads,
            progress=progress.enabled(),
            keep_samples=True,
        )

    pooled, ratios = profile_interleaved(profile_one, list(files), rounds=p.rounds, timing=timing)
    out: dict[str, Any] = {name: {str(b): v for b, v in pooled[name].items()} for name in files}
    for stat in out.values():
        for per_batch in stat.values():
            per_batch.pop("samples_ms", None)
            per_batch.pop("compute_samples_ms", None)
    out["speedup"] = {
        "pruning": {str(b): s for b, s in compare(out["teacher"], out["student"]).items()},
        "quantization": {str(b): s for b, s in compare(out["student"], out["student_int8"]).items()},
        "combined": {str(b): s for b, s in compare(out["teacher"], out["student_int8"]).items()},
    }
    out["combined_rounds"] = {str(b): r for b, r in ratios["student_int8"].items()}
    out["fp16"] = FP16_NOTE
    out["protocol"] = protocol_record(
        backend="onnxruntime", device="cpu", timing=timing, threads=p.threads, rounds=p.rounds
    )
    return out


def raise_on_quantize_failure(outcome: QuantizeOutcome | dict) -> None:
    """GateFailed (exit 3) when a reduced-precision file failed its gate, naming the layers that
    INT8 hurts most (the sensitivity pass's, where it ran)."""
    data = outcome.to_dict() if isinstance(outcome, QuantizeOutcome) else outcome
    parity = data.get("parity")
    if not parity:
        return
    try:
        raise_on_failure(parity)
    except GateFailed as exc:
        lines = [str(exc)]
        for name, artifact in (data.get("artifacts") or {}).items():
            ranked = ((artifact.get("sensitivity") or {}).get("sensitivity")) or []
            if ranked:
                top = ", ".join(f"{r['module']} (-{r['drop']:.4f})" for r in ranked[:3])
                lines.append(f"most sensitive layers ({name}, accuracy lost quantized alone): {top}")
        raise GateFailed("quantize: " + "\n".join(lines), failures=exc.failures) from None
