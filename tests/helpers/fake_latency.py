"""A latency timer with a known answer, for latency tables built without timing anything."""

from __future__ import annotations

import numpy as np
import onnx


def fake_ms(graph: bytes, x_shape: tuple[int, ...]) -> float:
    """Milliseconds as a known function of the layer: MACs of the one conv/matmul in the graph."""
    model = onnx.load_from_string(graph)
    if not model.graph.initializer:  # the call-overhead graph
        return 0.0005
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    spatial = int(np.prod(x_shape[2:])) if len(x_shape) > 2 else 1
    return 1e-6 * weight.size * spatial + 0.001  # a little fixed cost per call (above the overhead graph's)
