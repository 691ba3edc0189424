"""One INT8 graph per consumer, because no single one is fast on both.

TensorRT builds explicit Q/DQ as a strongly typed network and wants signed symmetric INT8
(zero point 0). ONNX Runtime's x86 CPU provider runs its VNNI int8 convolutions only for
unsigned activations (U8S8): with signed activations its signed-to-unsigned rewrite skips
tensors with several consumers (residual branches) and Relu cannot fold into a symmetric Q,
so an S8S8 graph measured no faster than FP32 here. Each flavour is calibrated from the same
ranges and verified on its own. A new consumer is one :class:`Flavour` entry.
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

    def quantize_kwargs(self) -> dict[str, Any]:
        """``quantize_static`` keyword arguments (everything but paths, reader and method)."""
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": getattr(QuantType, self.activation),
            "weight_type": QuantType.QInt8,
            "per_channel": True,
            # 7-bit weights only help CPUs without VNNI; VNNI's int8 dot products need no headroom
            "reduce_range": False,
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
    ),
    Flavour(
        "tensorrt",
        "student.int8.trt.onnx",
        "TensorRT (strongly typed)",
        activation="QInt8",
        symmetric_activations=True,
        # ModelOpt's placement: Q/DQ on the inputs of the compute layers and of residual adds
        op_types=("Conv", "ConvTranspose", "Gemm", "MatMul", "Add"),
        # keep Relu explicit: TensorRT fuses it itself, and a symmetric range cannot absorb it
        extra_options={"QDQKeepRemovableActivations": True},
        description="S8S8 Q/DQ (zero points 0), per-channel weights, on Conv/Gemm/MatMul inputs and residual adds",
    ),
)
FLAVOURS: dict[str, Flavour] = {f.name: f for f in _ENTRIES}
FP16_FILE = "student.fp16.onnx"


def get_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise UserError(f"unknown quantization flavour {name!r}; known: {', '.join(FLAVOURS)}")
    return FLAVOURS[name]
