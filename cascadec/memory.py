"""Memory a request will need, estimated before anything is allocated.

A batch size or an image size is a number a user types; one digit too many asks for more
memory than the machine has, and the kernel's answer is to kill the process (or the desktop
around it). So every number that sizes memory is checked against an estimate first, and a
request that does not fit is a one-line UserError naming the limit and the estimate.

The estimates are upper bounds on purpose: the activations of one image are the sum of every
layer's output (inference keeps fewer alive at once), measured on a small probe image and
scaled by area. The budget is ``CASCADEC_MEMORY_LIMIT_GB`` when set, else 60 % of the memory
available now (``MemAvailable``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from cascadec.errors import UserError

FLOAT_BYTES = 4
TRAINING_FACTOR = 3  # forward activations kept for backward, their gradients, and the optimiser's step
PROBE_SIZE = 64  # side of the probe image activations are measured on
FALLBACK_ACTIVATIONS = 200  # activations per input byte when a model cannot run the probe (ResNet-50: ~170)


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def available_bytes() -> int:
    """Memory available to a new allocation now (Linux MemAvailable; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40  # unknown: do not refuse on a guess


def budget_bytes() -> int:
    limit = os.environ.get("CASCADEC_MEMORY_LIMIT_GB")
    if limit:
        try:
            gigabytes = float(limit)
        except ValueError:
            gigabytes = float("nan")
        # nan, inf (int() overflows) and a budget of nothing are not limits a user meant
        if not (math.isfinite(gigabytes) and gigabytes > 0):
            raise UserError(
                f"CASCADEC_MEMORY_LIMIT_GB={limit!r}: expected a positive, finite number of gigabytes"
            ) from None
        return int(gigabytes * 1e9)
    return int(0.6 * available_bytes())


def require(need: float, what: str, hint: str) -> None:
    """Refuse ``what`` when its estimate ``need`` (bytes) exceeds the budget."""
    budget = budget_bytes()
    if need > budget:
        raise UserError(
            f"{what} needs about {fmt_bytes(need)} of memory, more than the {fmt_bytes(budget)} "
            f"allowed here (60% of available memory, or CASCADEC_MEMORY_LIMIT_GB); {hint}"
        )


def training_bytes(per_image: int, batch: int, copies: int = 1) -> int:
    """Upper bound on the memory one training step of ``batch`` images (``copies`` transformed
    copies of each) needs beyond the model: ``TRAINING_FACTOR`` x the activations. Measured on
    cifar_resnet8 (batch 64 and 256, 32x32, SGD with momentum, after a warm-up step), the step's
    peak resident memory rose 1.06-1.16x the activations: the bound holds with a margin of
    2.6-2.8x (tests/test_audit.py)."""
    return TRAINING_FACTOR * batch * copies * per_image


def image_bytes(shape: Sequence[int]) -> int:
    return FLOAT_BYTES * math.prod(int(d) for d in shape)


def activation_bytes(model: nn.Module, shape: Sequence[int]) -> int:
    """Upper bound on the activation memory of one image of ``shape`` (C x H x W) in ``model``:
    the sum of every leaf module's output on a small probe image, scaled by area."""
    channels, height, width = (int(d) for d in shape)
    probe = (min(height, PROBE_SIZE), min(width, PROBE_SIZE))
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, *probe, device=device))
    except Exception:  # noqa: BLE001 - models that insist on their own input size: a coarse estimate instead
        return FALLBACK_ACTIVATIONS * image_bytes(shape)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total * (height * width) / (probe[0] * probe[1])) + image_bytes(shape)


def onnx_activation_bytes(path: str | os.PathLike[str], shape: Sequence[int]) -> int:
    """Upper bound on the memory one image of ``shape`` needs in an ONNX graph: every float
    value's size from shape inference at batch 1 (the input included). Remembered per file
    version, because interleaved profiling asks again for the same file every round."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None  # the session that opens it next reports the missing file
    return _onnx_activation_bytes(os.fspath(path), stamp, tuple(int(d) for d in shape))


@functools.lru_cache(maxsize=32)
def _onnx_activation_bytes(path: str, _stamp: int | None, shape: tuple[int, ...]) -> int:
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
        graph_input = model.graph.input[0]
        dims = graph_input.type.tensor_type.shape.dim
        for dim, size in zip(dims, (1, *shape)):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the session that loads it next reports an unreadable file properly
        return FALLBACK_ACTIVATIONS * image_bytes(shape)
    total = image_bytes(shape)
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        sizes = [d.dim_value for d in tensor.shape.dim]
        if tensor.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and sizes and all(sizes):
            total += math.prod(sizes) * (4 if tensor.elem_type == onnx.TensorProto.FLOAT else 2)
    return total
