"""The names a recipe may use for the things a registry implements, one home for each (issue 29).

The recipe schema reads these without importing torch (a typo in a recipe is refused before
torch loads); each registry that implements them checks at import, with :func:`check_registry`,
that it implements exactly these, so a new entry added to one place and not the other fails
the first import rather than a user's run. Pruning methods are the exception: plugins register
at run time, so their names live in the method registry (``prune/method.py``) itself.
"""

from __future__ import annotations

from collections.abc import Iterable

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "synthetic")
"""``data.name``: the builders of ``cascadec.data.registry``."""

CRITERIA: tuple[str, ...] = ("taylor", "l1", "cap")
"""``prune.importance``: the criteria of ``cascadec.prune.importance.CRITERIA``."""

LATENCY_BACKENDS: tuple[str, ...] = ("onnxruntime", "onnxruntime-cuda")
"""``prune.latency.backend``: where ``cascadec.prune.latency_table`` times a latency table."""

LATENCY_RANKINGS: tuple[str, ...] = ("per_ms_per_flop", "per_ms", "importance")
"""``prune.latency.ranking``: what ``cascadec.prune.latency`` divides a unit's importance by."""

DEFAULT_LATENCY_RANKING = "per_ms_per_flop"


def check_registry(what: str, implemented: Iterable[str], declared: Iterable[str]) -> None:
    """Raise at import when a registry and its declared names differ (a programming error)."""
    missing, extra = set(declared) - set(implemented), set(implemented) - set(declared)
    if missing or extra:
        raise RuntimeError(
            f"{what}: cascadec/names.py declares {sorted(missing)} that nothing implements and "
            f"the registry implements {sorted(extra)} that names.py does not declare; keep the two in step"
        )
