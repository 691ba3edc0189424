"""The audit's one-line bugs (issue 31), each replayed against a copy of the package: its named
test must fail. A survivor means that test was weakened (tests/helpers/mutants.py)."""

from __future__ import annotations

import pytest
from helpers.mutants import AUDIT, Mutant, package_copy, run_tests, survives

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    return package_copy(tmp_path_factory.mktemp("mutants"))


def test_the_named_tests_pass_on_the_unmutated_copy(copy_root) -> None:
    tests = sorted({t for m in AUDIT for t in m.tests})
    proc = run_tests(copy_root, tests)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("mutant", AUDIT, ids=str)
def test_the_audits_one_line_bug_is_caught_by_its_named_test(copy_root, mutant: Mutant) -> None:
    alive, tail = survives(copy_root, mutant)
    assert not alive, f"{mutant.name}: {', '.join(mutant.tests)} still pass with it:\n{tail}"
