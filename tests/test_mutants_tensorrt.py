"""The TensorRT builder's hand-written mutations (scripts/mutate_tensorrt.py), replayed in CI:
tests/test_tensorrt.py must fail on each (issue 31, item 5). On a CPU machine these tests run
against fakes of the TensorRT 10 and 11 APIs, so this is what keeps the fakes strict."""

from __future__ import annotations

import importlib.util

import pytest
from helpers.mutants import REPO, Mutant, package_copy, run_tests, survives

pytestmark = pytest.mark.slow


def _mutations() -> list[Mutant]:
    spec = importlib.util.spec_from_file_location("mutate_tensorrt", REPO / "scripts" / "mutate_tensorrt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = str(module.TARGET)
    return [
        Mutant(name, target, old, new, ("tests/test_tensorrt.py",), replace_all=True)
        for name, old, new in module.MUTATIONS
    ]


MUTATIONS = _mutations()


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    return package_copy(tmp_path_factory.mktemp("mutants"))


def test_the_tensorrt_tests_pass_on_the_unmutated_copy(copy_root) -> None:
    proc = run_tests(copy_root, ["tests/test_tensorrt.py"])
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("mutant", MUTATIONS, ids=str)
def test_the_tensorrt_tests_catch_the_mutation(copy_root, mutant: Mutant) -> None:
    alive, tail = survives(copy_root, mutant)
    assert not alive, f"{mutant.name}: tests/test_tensorrt.py still passes with it:\n{tail}"
