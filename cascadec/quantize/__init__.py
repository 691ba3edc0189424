"""Reduced precision for the pruned student: explicit INT8 (Q/DQ) and FP16 ONNX.

calibration.py  training images -> ONNX Runtime's calibration reader
flavours.py     one INT8 graph per consumer (ONNX Runtime CPU, TensorRT), as a registry
ptq.py          ONNX Runtime's quantize_static / float16 converter, and what ORT really runs
sensitivity.py  accuracy on the selection split, one layer at a time, and the float layers kept
stage.py        the quantize stage: build, verify, time; returns a QuantizeOutcome
"""

from cascadec.quantize.flavours import FLAVOURS, Flavour, get_flavour

__all__ = ["FLAVOURS", "Flavour", "get_flavour"]
