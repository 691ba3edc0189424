"""Which layers INT8 hurts, judged on the selection split, and the fewest kept in float.

A layer's sensitivity is the accuracy lost with that layer alone quantized (every other layer
in float), as Model Optimizer's and Neural Compressor's per-layer sweeps measure it. When the
whole INT8 graph loses more than ``quantize.max_accuracy_drop``, the most sensitive layers go
back to float one at a time until the budget holds or ``max_float_layers`` are spent; the
report lists each with what it cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cascadec.backends.onnxruntime_backend import OrtRunner

EVAL_BATCH = 256


def onnx_accuracy(
    path: Path, images: np.ndarray, labels: np.ndarray, threads: int | None = None, *, fused: bool = True
) -> float:
    """Top-1 accuracy of an ONNX classifier on ONNX Runtime's CPU provider (``fused``: with its
    graph optimisations, as :class:`~cascadec.backends.onnxruntime_backend.OrtRunner` takes it)."""
    runner = OrtRunner(path, device="cpu", threads=threads, fused=fused)
    hits = 0
    for start in range(0, len(images), EVAL_BATCH):
        logits = runner(images[start : start + EVAL_BATCH])
        hits += int(
            np.count_nonzero(logits.reshape(len(logits), -1).argmax(axis=1) == labels[start : start + EVAL_BATCH])
        )
    return hits / max(len(images), 1)


@dataclass
class FloatLayers:
    """The outcome of the sensitivity pass for one flavour."""

    budget: float
    reference_accuracy: float
    sensitivity: list[dict] = field(default_factory=list)  # {"node", "module", "drop"}, most sensitive first
    kept: list[dict] = field(default_factory=list)  # {"node", "module", "drop_alone", "accuracy_after"}
    met: bool = False
    # why the pass ran: the selection budget was missed (layers go back to float), or the verify
    # gate failed on the test split (the ranking only names the layers, nothing changes)
    reason: str = "selection budget missed"

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "reference_accuracy": self.reference_accuracy,
            "sensitivity": self.sensitivity,
            "kept_in_float": self.kept,
            "met": self.met,
            "reason": self.reason,
        }


def rank_layers(
    nodes: Sequence[dict[str, str]],
    reference_accuracy: float,
    accuracy_with: Callable[[list[str]], float],
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Each compute layer quantized alone (``accuracy_with([node])``), most accuracy lost first."""
    ranked = []
    for n in nodes:
        drop = reference_accuracy - accuracy_with([n["node"]])
        ranked.append({"node": n["node"], "module": n["module"], "drop": drop})
        if progress is not None:
            progress(n["module"])
    return sorted(ranked, key=lambda r: -r["drop"])


def keep_in_float(
    ranked: Sequence[dict],
    reference_accuracy: float,
    budget: float,
    accuracy_excluding: Callable[[list[str]], float],
    already: Sequence[str] = (),
    max_layers: int = 8,
) -> FloatLayers:
    """Return the most sensitive layers to float one at a time until the INT8 graph's accuracy is
    within ``budget`` of the reference (``accuracy_excluding(nodes)``: the graph with those in float)."""
    out = FloatLayers(budget=budget, reference_accuracy=reference_accuracy, sensitivity=list(ranked))
    excluded = list(already)
    for r in ranked:
        if len(out.kept) >= max_layers:
            break
        if r["node"] in excluded:
            continue
        excluded.append(r["node"])
        accuracy = accuracy_excluding(excluded)
        out.kept.append({"node": r["node"], "module": r["module"], "drop_alone": r["drop"], "accuracy_after": accuracy})
        if reference_accuracy - accuracy <= budget:
            out.met = True
            break
    return out
