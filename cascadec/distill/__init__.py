"""Knowledge-distillation losses."""

from __future__ import annotations

from typing import Any


def images_per_sample(distill: Any) -> tuple[int, str]:
    """How many images each training sample becomes under ``recipe.distill`` (for the memory
    estimate), and why: HSAKD trains on every image's 4 rotations."""
    if distill.method == "hsakd":
        return 4, "in 4 rotations (distill.method: hsakd)"
    return 1, ""
