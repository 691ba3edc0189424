"""What a pruning method is to the rest of cascadec: a class registered by name.

A method gets a :class:`PruneContext` (teacher, analysis, recipe, loaders, runtime) and returns
a :class:`PruneOutcome` (the student, the mask to shrink it by or none, its history). Everything
the stages, the report and the CLI need to know about one method beyond that is a hook on its
class with a neutral default, so no module above ``prune/`` branches on a method's name:

* ``shrinks``: False when nothing is removed (FBS: the gated network is the student as is);
* ``target_description``: what the report calls its budget;
* ``finish_metrics``: metrics of its own once the student is final (FBS: MACs per image);
* ``extra_models``: networks exported and timed beside the student (FBS: a static student of
  the same MACs), with the label the report gives their rows;
* ``restore_student``: rebuild its structure on a loaded student (FBS: the gates);
* ``summary_rows`` / ``report_notes`` / ``training_lines`` / ``history_keys``: the report;
* ``preview`` / ``preview_lines``: what ``cascadec inspect`` says before a run.

A new method is one module with a subclass and ``@register_method`` (and, for its own recipe
keys, a section in the recipe); ``tests/test_method_plugin.py`` registers a toy one and runs it
through ``compress``. The built-in ones are imported on first use of the registry. A method whose
``run`` returns no mask removes nothing: the stages keep its trained network as the student.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cascadec.errors import UserError

if TYPE_CHECKING:  # annotations only: the recipe schema and `cascadec --help` read this module without torch
    import torch
    import torch.nn as nn

# the built-in methods, in the order the docs give them, and the modules that register them when
# imported: the recipe schema checks a name against these without importing the pruning stack
BUILTIN_METHODS = ("cascade", "oneshot", "cap", "fbs")
_BUILTIN_MODULES = ("cascadec.prune.methods", "cascadec.prune.cascade_method", "cascadec.prune.fbs_method")
_REGISTRY: dict[str, type[PruneMethod]] = {}
_loaded = False


@dataclass
class PruneContext:
    """Everything a method may use: ``select_loader`` (held-out training images) drives every
    decision; ``runtime`` saves and loads its checkpoints and knows the ranks."""

    teacher: nn.Module
    analysis: Any  # cascadec.prune.analysis.Analysis
    recipe: Any  # cascadec.recipe.Recipe
    loader: Any
    select_loader: Any
    device: torch.device
    runtime: Any  # cascadec.train.runtime.Runtime


@dataclass
class PruneOutcome:
    """What a method returns. ``student`` is full-width when ``mask`` is given (the shrink step
    removes what the mask drops); ``history`` is the method's record (manifest ``prune.history``);
    ``spec`` is saved with the student's widths (``student.widths.json``), for
    :meth:`PruneMethod.restore_student`."""

    student: nn.Module
    mask: torch.Tensor | None
    analysis: Any
    history: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)


@dataclass
class ExtraModel:
    """A network a method wants exported (``<name>.onnx``) and timed beside the student."""

    name: str
    model: nn.Module
    info: dict = field(default_factory=dict)  # recorded under the export stage


class PruneMethod:
    """The base every method subclasses; override ``run`` and the hooks that apply."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # keys of prune.history the report keeps besides the common ones
    history_keys: ClassVar[tuple[str, ...]] = ()
    # name -> the label its latency rows carry in the summary (extra_models)
    extra_model_labels: ClassVar[Mapping[str, str]] = {}

    def run(self, ctx: PruneContext) -> PruneOutcome:
        raise NotImplementedError

    # ------------------------------------------------------------ stages
    def target_description(self, recipe: Any) -> str:
        return recipe.prune.target.describe()

    def finish_metrics(self, metrics: dict[str, Any], student: nn.Module, val_loader: Any, device: Any) -> None:
        """Add (or drop) run metrics once the student is final; ``metrics`` holds the common ones."""

    def extra_models(self, teacher: nn.Module, sample: torch.Tensor, metrics: Mapping[str, Any]) -> list[ExtraModel]:
        return []

    def student_report(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Keys of the method's own metrics in report.json's ``student`` node."""
        return {}

    def restore_student(self, model: nn.Module, spec: Mapping[str, Any], path: Path) -> None:
        """Rebuild what the method added to the architecture, before a saved student's weights load."""

    # ------------------------------------------------------------ report
    def summary_rows(self, report: Mapping[str, Any]) -> list[list[str]]:
        """Rows after FLOPs in the summary table: [label, teacher, student, change]."""
        return []

    def report_notes(self, report: Mapping[str, Any]) -> list[str]:
        """Paragraphs after the summary table."""
        return []

    def training_lines(self, prune: Mapping[str, Any]) -> list[str]:
        """Markdown lines in the report's Training section (``prune``: report.json's ``prune``)."""
        return []

    # ------------------------------------------------------------ inspect
    def preview(self, model: nn.Module, example: torch.Tensor, recipe: Any) -> dict[str, Any] | None:
        """What ``cascadec inspect --recipe`` shows about this method before a run, in place of the
        target's widths (JSON-ready; under the method's name in ``inspect --json``)."""
        return None

    def preview_lines(self, preview: Mapping[str, Any], inspected: Mapping[str, Any]) -> list[str]:
        return []


def register_method(cls: type[PruneMethod]) -> type[PruneMethod]:
    """Class decorator: make ``cls`` the method ``prune.method: <cls.name>`` runs."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:  # a failed import leaves _loaded False: the next use retries
            importlib.import_module(module)
        _loaded = True


def known_method_names() -> list[str]:
    """The built-in names and every plugin registered so far, without importing the built-in
    modules (torch, Torch-Pruning): what the recipe schema accepts."""
    return [*BUILTIN_METHODS, *(n for n in _REGISTRY if n not in BUILTIN_METHODS)]


def method_names() -> list[str]:
    """Registered names: the built-in ones in the order the docs give them, then plugins."""
    _load_builtins()
    first = [n for n in BUILTIN_METHODS if n in _REGISTRY]
    return first + [n for n in _REGISTRY if n not in first]


def is_registered(name: str) -> bool:
    _load_builtins()
    return name in _REGISTRY


def get_method(name: str) -> PruneMethod:
    _load_builtins()
    if name not in _REGISTRY:
        raise UserError(f"unknown prune.method {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


class _Methods(Mapping[str, type[PruneMethod]]):
    """A read-only view of the registry (``METHODS``), built-ins loaded on first use."""

    def __getitem__(self, name: str) -> type[PruneMethod]:
        _load_builtins()
        return _REGISTRY[name]

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        _load_builtins()
        return len(_REGISTRY)


METHODS: Mapping[str, type[PruneMethod]] = _Methods()
