"""The house's map stays true: docs/architecture.md names every module, the registries agree
with the recipe schema, and the lint configuration CI runs is the one in pyproject.toml."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from cascadec.backends import BACKENDS, list_backends
from cascadec.data.registry import input_geometry, list_datasets
from cascadec.prune.importance import CRITERIA
from cascadec.prune.method import METHODS
from cascadec.recipe import PruneSection

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cascadec"
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _modules() -> set[str]:
    return {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts
    }


def _documented() -> set[str]:
    """Module paths in the first column of the tour table: | `verify/parity.py` | ... |"""
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", DOC, flags=re.MULTILINE))


def test_every_module_is_on_the_map() -> None:
    missing = sorted(_modules() - _documented())
    assert not missing, f"docs/architecture.md does not describe: {', '.join(missing)}"


def test_the_map_names_no_module_that_is_gone() -> None:
    stale = sorted(_documented() - _modules())
    assert not stale, f"docs/architecture.md names modules that do not exist: {', '.join(stale)}"


def _literal(field: str) -> set[str]:
    return set(typing.get_args(PruneSection.model_fields[field].annotation))


def test_method_and_criterion_registries_match_the_schema() -> None:
    from cascadec.recipe import load_recipe

    for name in METHODS:  # the registry is the schema's list of methods
        overrides = ["prune.target.flops_reduction=0.5"] if name != "fbs" else []
        assert load_recipe("fmnist_quick", [f"prune.method={name}", *overrides]).prune.method == name
        assert name in PruneSection.model_fields["method"].description
    with pytest.raises(Exception, match="prune.method"):
        load_recipe("fmnist_quick", ["prune.method=nonesuch"])
    assert set(CRITERIA) == _literal("importance")


def test_latency_rankings_match_the_schema() -> None:
    from cascadec.prune.latency import DEFAULT_RANKING, RANKINGS
    from cascadec.recipe import LatencySection

    field = LatencySection.model_fields["ranking"]
    assert set(RANKINGS) == set(typing.get_args(field.annotation))
    assert field.default == DEFAULT_RANKING


def test_the_schema_knows_every_dataset_the_registry_builds() -> None:
    from cascadec.names import DATASETS

    assert set(DATASETS) == set(list_datasets())


def test_a_registry_out_of_step_with_its_declared_names_fails_at_import() -> None:
    """cascadec/names.py is the one home of the vocabularies the schema's literals are built
    from; each registry checks itself against it when imported (issue 29)."""
    from cascadec import names
    from cascadec.recipe import LatencySection

    names.check_registry("x", {"a": 1, "b": 2}, ("a", "b"))
    with pytest.raises(RuntimeError, match=r"declares \['c'\].*implements \['b'\]"):
        names.check_registry("x", {"a": 1, "b": 2}, ("a", "c"))
    assert typing.get_args(PruneSection.model_fields["importance"].annotation) == names.CRITERIA
    assert typing.get_args(LatencySection.model_fields["backend"].annotation) == names.LATENCY_BACKENDS
    assert typing.get_args(LatencySection.model_fields["ranking"].annotation) == names.LATENCY_RANKINGS


def test_every_dataset_has_a_geometry() -> None:
    for name in list_datasets():
        channels, size, classes = input_geometry(name)
        assert channels >= 1 and size >= 1 and (classes is None or classes >= 2), name


def test_one_backend_vocabulary() -> None:
    assert list_backends() == list(BACKENDS)
    assert set(list_backends("onnx")) == {"onnxruntime", "onnxruntime-cuda", "onnxruntime-trt"}


def test_ci_runs_the_linters_configured_in_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^\[tool\.ruff\]\s*\n(?:#.*\n)*line-length = 120", pyproject, flags=re.MULTILINE)
    lint = (ROOT / "scripts" / "lint.sh").read_text()
    assert "ruff check" in lint and "ruff format --check" in lint
    assert "scripts/lint.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_long_module_says_why_in_the_map() -> None:
    """No module over 450 lines without its reason under "Modules past 400 lines"."""
    section = DOC.split("## Modules past 400 lines", 1)[1].split("\n## ", 1)[0]
    long = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if len(path.read_text(encoding="utf-8").splitlines()) > 450
    ]
    missing = [m for m in long if f"`{m}`" not in section]
    assert not missing, f"docs/architecture.md gives no reason for these long modules: {', '.join(missing)}"


def test_every_backend_runner_implements_the_one_interface() -> None:
    """Polygraphy's shape: one base, ``infer`` numpy in and out, ``precision`` and ``device``;
    callers read those instead of guessing from a backend's name."""
    from cascadec.backends import cuda_runners, onnxruntime_backend, tensorrt_backend, torch_backend
    from cascadec.backends.runner import BaseRunner

    runners = (
        torch_backend.TorchRunner,
        onnxruntime_backend.OrtRunner,
        tensorrt_backend.TrtRunner,
        cuda_runners.TorchCudaRunner,
        cuda_runners.OrtDeviceRunner,
    )
    for cls in runners:
        assert issubclass(cls, BaseRunner) and "infer" in vars(cls), cls.__name__
    hits = [
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if re.search(r'"cuda" if \w+ == "onnxruntime-cuda"', path.read_text(encoding="utf-8"))
    ]
    assert not hits, f"derive the device from Backend.device, not the name: {hits}"


def test_the_verify_and_profile_defaults_have_one_home() -> None:
    """The recipe schema and the runtime objects read one set of defaults (issue 29 item 4):
    a default changed in one place cannot leave the other behind."""
    from cascadec.profile.protocol import Timing
    from cascadec.recipe import ProfileSection, VerifySection
    from cascadec.verify.gates import Gate

    profile, timing = ProfileSection(), Timing()
    assert (profile.warmup_s, profile.duration_s, profile.min_iters) == (
        timing.warmup_s,
        timing.min_duration_s,
        timing.min_iters,
    )
    verify, gate = VerifySection(), Gate()
    assert Gate.from_recipe(verify) == gate
    assert Gate.from_recipe(object()) == gate  # a section without the keys: the same defaults
    package = Path(__file__).resolve().parents[1] / "cascadec"
    homes = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if "0.999" in p.read_text()]
    assert homes == ["verify/gates.py"], homes


def test_torch_pruning_is_a_version_the_adapter_was_tested_with() -> None:
    """prune/tp_adapter.py patches private Torch-Pruning symbols: another release may have moved
    them. Upgrading means running the suite against it and adding it to TESTED_VERSIONS."""
    from cascadec.prune.tp_adapter import TESTED_VERSIONS, installed_version

    assert installed_version() in TESTED_VERSIONS, (
        f"torch-pruning {installed_version()} is not among the versions prune/tp_adapter.py was tested with "
        f"({', '.join(TESTED_VERSIONS)})"
    )
    pin = re.search(r'"torch-pruning==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) in TESTED_VERSIONS
    private = re.compile(r"^\s*(from|import) torch_pruning\.dependency", re.MULTILINE)
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if private.search(p.read_text()))
    assert users == ["prune/tp_adapter.py"], users
