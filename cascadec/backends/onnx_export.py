"""PyTorch -> ONNX, the single door every deployment backend goes through.

The dynamo (``torch.export``) exporter is tried first because it is the exporter
PyTorch maintains; the legacy TorchScript exporter is kept as a fallback because
pruned or hook-carrying models still trip ``torch.export`` now and then, and a
working file beats a stack trace. Whatever exporter ran, the file is checked,
optionally slimmed, saved self-contained, reloaded and its batch axis verified,
so downstream backends never see a half-valid artifact.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from cascadec.errors import UserError, first_line
from cascadec.fileio import replacing

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# protobuf cannot serialise a single message over 2 GiB; leave headroom for the graph.
_PROTO_LIMIT = 2**31 - 64 * 2**20


class ExportFallbackWarning(UserWarning):
    """The dynamo exporter failed and the legacy TorchScript exporter was used instead."""


def _one_line(exc: BaseException) -> str:
    """Exporter errors span pages and name their cause last: the whole message, on one line."""
    return f"{type(exc).__name__}: {first_line(exc, whole=True)}"


def _prepare(model: nn.Module, sample: torch.Tensor, dynamic_batch: bool) -> tuple[nn.Module, torch.Tensor]:
    """Copy so exporting never flips the caller's model to eval/CPU behind its back."""
    if not isinstance(model, nn.Module):
        raise UserError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sample, torch.Tensor) or sample.dim() < 1:
        raise UserError("export_onnx needs a sample input tensor with a batch dimension")
    try:
        export_model = copy.deepcopy(model)
    except Exception:  # un-copyable modules (e.g. holding locks): fall back to the original
        export_model = model
    export_model = export_model.to(device="cpu", dtype=torch.float32).eval()
    x = sample.detach().to(device="cpu", dtype=torch.float32)
    if dynamic_batch and x.shape[0] == 1:
        # torch.export specialises size-1 dims to constants; trace with two rows instead.
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    return export_model, x.contiguous()


def _export_dynamo(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("dynamo exporter returned no program")
    return program.model_proto


def _export_legacy(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buffer,
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return -1


def _check_io(model: onnx.ModelProto, dynamic_batch: bool) -> None:
    """A fixed batch axis would only surface later as a shape error inside a backend."""
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != 1:
        raise UserError(
            f"the model returns {len(outputs)} outputs {outputs}; cascadec deploys single-output classifiers"
        )
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise UserError(f"exported graph has inputs {inputs} and outputs {outputs}, expected ['input'] -> ['logits']")
    if not dynamic_batch:
        return
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value") or not dims[0].dim_param:
            raise UserError(
                f"exported ONNX '{value.name}' has a fixed batch dimension; the model probably hard-codes "
                "the batch size (use x.flatten(1) instead of x.view(N, -1))"
            )


def _save(model: onnx.ModelProto, path: Path) -> bool:
    """Save one self-contained file when protobuf allows it; returns whether external data was needed."""
    external = model.ByteSize() > _PROTO_LIMIT
    with replacing(path) as tmp:
        if external:
            data_name = path.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        else:
            onnx.save_model(model, tmp)
    return external


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = 18,
    slim: bool = True,
    dynamic_batch: bool = True,
) -> dict:
    """Export ``model`` so that every backend reads the same verified artifact.

    ``sample`` only fixes the non-batch shape; its values do not matter. Returns
    an info dict (exporter, opset, file size, seconds, warnings...) for the report.
    Raises :class:`UserError` when neither exporter can handle the model.
    """
    if not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"opset must be an integer in 7..{onnx.defs.onnx_opset_version()}, got {opset!r}")
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserError(f"ONNX output path must end in .onnx: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model, x = _prepare(model, sample, dynamic_batch)
    start = time.perf_counter()
    notes: list[str] = []

    exporter = "dynamo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            proto = _export_dynamo(export_model, x, opset, dynamic_batch)
        except Exception as dynamo_exc:  # any exporter failure: try the older path before giving up
            reason = _one_line(dynamo_exc)
            exporter = "torchscript"
            try:
                proto = _export_legacy(export_model, x, opset, dynamic_batch)
            except Exception as legacy_exc:
                raise UserError(
                    f"cannot export {type(model).__name__} to ONNX: dynamo exporter failed ({reason}); "
                    f"legacy exporter failed ({_one_line(legacy_exc)})"
                ) from legacy_exc
            notes.append(f"dynamo ONNX exporter failed, used the legacy TorchScript exporter: {reason}")
    # Exporter chatter (deprecations etc.) goes into the info dict, not onto the console.
    for w in caught:
        msg = " ".join(str(w.message).split())[:300]
        if msg not in notes:
            notes.append(msg)
    if exporter == "torchscript":
        warnings.warn(notes[0], ExportFallbackWarning, stacklevel=2)
        log.warning("%s", notes[0])

    try:
        if proto.ByteSize() <= _PROTO_LIMIT:  # bigger graphs are checked from the saved file below
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"exported ONNX graph for {type(model).__name__} is invalid: {_one_line(exc)}") from exc

    slimmed = False
    if slim:
        try:
            import onnxslim  # here, not at import: it takes ~1 s and only export uses it

            proto = onnxslim.slim(proto)
            slimmed = True
        except Exception as exc:  # slimming is an optimisation; an unslimmed valid file is still useful
            note = f"onnxslim failed, kept the unslimmed graph: {_one_line(exc)}"
            notes.append(note)
            warnings.warn(note, stacklevel=2)

    _check_io(proto, dynamic_batch)
    external = _save(proto, path)
    try:  # prove the file on disk is what backends will load
        onnx.checker.check_model(str(path))
        reloaded = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"saved ONNX file {path} does not load back: {_one_line(exc)}") from exc
    _check_io(reloaded, dynamic_batch)

    size = path.stat().st_size
    if external:
        size += (path.parent / (path.name + ".data")).stat().st_size
    return {
        "path": str(path),
        "exporter": exporter,
        "opset": _default_opset(reloaded),
        "file_size_bytes": int(size),
        "external_data": external,
        "seconds": round(time.perf_counter() - start, 3),
        "slimmed": slimmed,
        "dynamic_batch": dynamic_batch,
        "nodes": len(reloaded.graph.node),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": [d.dim_param or d.dim_value for d in reloaded.graph.input[0].type.tensor_type.shape.dim],
        "warnings": notes,
    }
