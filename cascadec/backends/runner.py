"""The one interface every backend's runner implements, in the manner of Polygraphy's
``BaseRunner``: ``activate`` / ``infer`` / ``deactivate``, and what the runner computes in
(``precision``) and where (``device``).

Verification gates each runner with its precision's tolerances and profiling times it the
same way whatever the engine, so callers read ``runner.precision`` and ``runner.device``
instead of guessing from a backend's name. ``infer`` is numpy in, numpy out (float32), one
batch per call; calling a runner is ``infer``. Runners that hold resources (a CUDA stream, an
engine context) may acquire them in ``activate`` and release them in ``deactivate``; ``with
runner:`` does both. GPU runners add ``stage`` / ``compute`` / ``fetch`` for timing the engine
alone (:class:`cascadec.backends.cuda_runners.DeviceRunner`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class BaseRunner:
    """Subclass it and implement :meth:`infer`; set ``precision`` and ``device`` in ``__init__``."""

    precision: str = "fp32"  # fp32 / fp16 / int8: the gate's tolerances for its outputs
    device: Any = "cpu"  # where it computes: "cpu", or a CUDA device

    def activate(self) -> None:
        """Acquire what inference needs (no-op unless a runner holds resources)."""

    def deactivate(self) -> None:
        """Release what :meth:`activate` acquired."""

    def infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x)

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
