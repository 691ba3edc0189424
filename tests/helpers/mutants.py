"""Known mistakes the suite must catch, replayed in CI (issue 31, item 5).

Each :class:`Mutant` is a one-line slip in a module (text ``old`` replaced by ``new``) and the
named tests that must then fail. ``tests/test_mutants_audit.py`` replays the slips a read-only
audit found the suite blind to (each now caught by a named test), and
``tests/test_mutants_tensorrt.py`` the TensorRT builder's hand-written mutations
(``scripts/mutate_tensorrt.py``). A mutant that survives means a test was weakened: the build
fails. The mutant runs in a copy of the package (``PYTHONPATH``), so the checkout is never
touched; processes the named tests start import the copy too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # path from the repository root
    old: str  # must occur exactly once in the module
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail
    replace_all: bool = False  # every occurrence of ``old`` (scripts/mutate_tensorrt.py's way) instead of one

    def __str__(self) -> str:
        return self.name


def package_copy(root: Path) -> Path:
    """What the mutants run against: the package, its tests and recipes, under ``root``."""
    for part in ("cascadec", "tests", "recipes"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def run_tests(root: Path, tests: tuple[str, ...] | list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "CASCADEC_NO_PROGRESS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly"]
    return subprocess.run([*cmd, *tests], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def apply(root: Path, mutant: Mutant) -> str:
    """Write the mutant into the copy; return the module's original text (to put back)."""
    path = root / mutant.module
    source = path.read_text()
    count = source.count(mutant.old)
    if count != 1 and not (mutant.replace_all and count):
        raise AssertionError(
            f"mutant {mutant.name!r}: {mutant.old!r} occurs {count} times in {mutant.module}; update the mutant"
        )
    path.write_text(source.replace(mutant.old, mutant.new))
    shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)  # same-size edits: no stale .pyc
    return source


def survives(root: Path, mutant: Mutant) -> tuple[bool, str]:
    """Whether the mutant's tests still pass (a survivor), and the end of their output."""
    source = apply(root, mutant)
    try:
        proc = run_tests(root, mutant.tests)
    finally:
        (root / mutant.module).write_text(source)
        shutil.rmtree((root / mutant.module).parent / "__pycache__", ignore_errors=True)
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage, nothing collected
        raise AssertionError(f"mutant {mutant.name!r}: pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}")
    return proc.returncode == 0, proc.stdout[-1500:]


A = "tests/test_audit.py::"
H = "tests/test_distill_hints.py::"
AUDIT: tuple[Mutant, ...] = (
    Mutant(
        "CaP's OBS error without the inverse of P's block",
        "cascadec/prune/cap.py",
        'torch.einsum("uob,ubc,uoc->uo", w_b, torch.linalg.inv(p_bb), w_b)',
        'torch.einsum("uob,ubc,uoc->uo", w_b, p_bb, w_b)',
        (A + "test_cap_scores_are_the_error_left_after_a_brute_force_refit",),
    ),
    Mutant(
        "HSAKD's KD term read on the upright images only",
        "cascadec/distill/hsakd.py",
        "loss = loss + weights.kd * kd_kl(logits, teacher_logits, weights.temperature)",
        "loss = loss + weights.kd * kd_kl(logits[: len(labels)], teacher_logits[: len(labels)], weights.temperature)",
        (A + "test_hsakd_loss_term_by_term",),
    ),
    Mutant(
        "HSAKD's head training never steps its optimiser",
        "cascadec/distill/hsakd.py",
        "                        opt.step()\n                        sched.step()",
        "                        pass\n                        sched.step()",
        (A + "test_train_heads_learns_an_easy_joint_label",),
    ),
    Mutant(
        "the memory refusal switched off",
        "cascadec/memory.py",
        "    if need > budget:",
        "    if False:",
        (A + "test_a_tiny_memory_limit_refuses_compress_in_one_line",),
    ),
    Mutant(
        "the speed-up meter's ratio inverted",
        "cascadec/prune/latency_refine.py",
        '"speedup": full_ms / student_ms * self.scale,',
        '"speedup": student_ms / full_ms * self.scale,',
        (A + "test_the_speedup_meter_reports_a_much_cheaper_student_as_faster",),
    ),
    Mutant(
        "stage hints without the teacher feature's energy normalisation",
        "cascadec/distill/hints.py",
        "total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)",
        "total = total + F.mse_loss(s, t)",
        (H + "test_stage_hint_terms_are_normalised_by_the_teacher_features_energy",),
    ),
    Mutant(
        "the joint loss's teacher and upper-model features swapped",
        "cascadec/prune/cascade.py",
        "teacher_features if stages else upper_features",
        "upper_features if stages else teacher_features",
        (H + "test_joint_hints_compare_each_model_with_the_right_features",),
    ),
    Mutant(
        "FBS gating before the BatchNorm instead of after it",
        "cascadec/prune/fbs.py",
        "return self.norm(self.conv(x)) * g[:, :, None, None]",
        "return self.norm(self.conv(x) * g[:, :, None, None])",
        (A + "test_fbs_gates_scale_the_normalised_output_of_gated_convs_in_a_chain",),
    ),
    Mutant(
        "TrtRunner.stage without the cast to the engine's input type",
        "cascadec/backends/tensorrt_backend.py",
        "torch.from_numpy(x).to(self._dtypes[self.input_name])",
        "torch.from_numpy(x)",
        ("tests/test_tensorrt.py::test_trt_runner_casts_to_and_from_the_engines_io_types",),
    ),
)
