"""One INT8 graph per consumer, because no single one is fast on both.

TensorRT builds explicit Q/DQ as a strongly typed network and wants signed symmetric INT8
(zero point 0). ONNX Runtime's x86 CPU provider runs its VNNI int8 convolutions only for
unsigned activations (U8S8): with signed activations its signed-to-unsigned rewrite skips
tensors with several consumers (residual branches) and Relu cannot fold into a symmetric Q,
so an S8S8 graph measured no faster than FP32 here. Each flavour is calibrated from the same
ranges and verified on its own. A new consumer is one :class:`Flavour` entry.

Each flavour is also *judged* the way its consumer computes. ONNX Runtime's flavour is scored as
ORT runs it (its fused int8 kernels). TensorRT's is scored on ORT with graph optimisations off:
every QuantizeLinear/DequantizeLinear then runs on its own and the convolutions in float, which is
what TensorRT's int32 accumulation computes; ORT's fused int8 kernels on x86 CPUs without VNNI add
pairs of products into int16 with saturation, a CPU artefact TensorRT does not have (measured: the
demo's TensorRT flavour lost 1.65 points fused and 0.30 unfused on an AVX2 CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cascadec.errors import UserError


@dataclass(frozen=True)
class Flavour:
    """How ONNX Runtime's quantizer is driven for one consumer (``quantize_static`` arguments)."""

    name: str
    file: str  # in the run directory
    consumer: str
    activation: str  # QuantType name: QUInt8 / QInt8
    symmetric_activations: bool
    # None: every operator ORT's QDQ quantizer supports; else only these (TensorRT's placement)
    op_types: tuple[str, ...] | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # whether reduce_range (7-bit weights) may apply: only for a consumer whose kernels can saturate
    reduce_range_applies: bool = False
    # judged with ORT's graph optimisations on (fused int8 kernels) or off (Q/DQ evaluated in float)
    judge_fused: bool = True
    judged_on: str = ""
    # the dtype of everything outside the Q/DQ pairs: "fp16" for TensorRT (ModelOpt's
    # high_precision_dtype), where FP16 is what its non-INT8 layers should run in
    float_dtype: str = "fp32"

    def quantize_kwargs(self, reduce_range: bool = False) -> dict[str, Any]:
        """``quantize_static`` keyword arguments (everything but paths, reader and method).
        ``reduce_range``: 7-bit weights, for the flavours it applies to (:func:`resolve_reduce_range`)."""
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": getattr(QuantType, self.activation),
            "weight_type": QuantType.QInt8,
            "per_channel": True,
            # 7-bit weights: headroom for int16 saturation on x86 CPUs without VNNI
            "reduce_range": bool(reduce_range and self.reduce_range_applies),
            "op_types_to_quantize": list(self.op_types) if self.op_types else None,
            "extra_options": {
                "ActivationSymmetric": self.symmetric_activations,
                "WeightSymmetric": True,
                **self.extra_options,
            },
        }


_ENTRIES: tuple[Flavour, ...] = (
    Flavour(
        "onnxruntime",
        "student.int8.onnx",
        "ONNX Runtime CPU",
        activation="QUInt8",
        symmetric_activations=False,
        description="U8S8 Q/DQ, per-channel symmetric weights, FP32 elsewhere: ORT fuses it into QLinearConv (VNNI)",
        reduce_range_applies=True,
        judged_on="ONNX Runtime CPU, its fused int8 kernels",
    ),
    Flavour(
        "tensorrt",
        "student.int8.trt.onnx",
        "TensorRT (strongly typed)",
        activation="QInt8",
        symmetric_activations=True,
        # ModelOpt's placement: Q/DQ on the inputs of the compute layers and of residual adds
        op_types=("Conv", "ConvTranspose", "Gemm", "MatMul", "Add"),
        # keep Relu explicit: TensorRT fuses it itself, and a symmetric range cannot absorb it.
        # Biases stay float: TensorRT's parser takes DequantizeLinear of INT8 (FP8, INT4) only, not
        # the int32 bias DequantizeLinear ORT writes by default; it adds the bias after its INT8 conv
        extra_options={"QDQKeepRemovableActivations": True, "QuantizeBias": False},
        description="S8S8 Q/DQ (zero points 0), per-channel weights, on Conv/Gemm/MatMul inputs and residual adds; "
        "FP16 elsewhere (biases, scales, the layers between)",
        judge_fused=False,
        judged_on="ONNX Runtime CPU, graph optimisations off: Q/DQ in float, as TensorRT's int32 accumulation",
        float_dtype="fp16",
    ),
)
FLAVOURS: dict[str, Flavour] = {f.name: f for f in _ENTRIES}
FP16_FILE = "student.fp16.onnx"


def resolve_reduce_range(setting: bool | str) -> bool:
    """``quantize.reduce_range``: ``auto`` takes 7-bit weights on an x86 CPU without VNNI (its int8
    kernels saturate in int16; measured on the demo's student: 0.45 points lost on the selection
    split with full 8-bit weights, none with 7-bit) and 8-bit elsewhere. The CPU that builds the
    file is the one that judges it, so ``auto`` follows it; set it where the deployment CPU differs."""
    if isinstance(setting, bool):
        return setting
    from cascadec.envinfo import x86_int8_dot

    return x86_int8_dot() in ("avx2", "sse")


def get_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise UserError(f"unknown quantization flavour {name!r}; known: {', '.join(FLAVOURS)}")
    return FLAVOURS[name]
