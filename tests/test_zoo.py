"""Acceptance matrix: every architecture family we claim to support prunes, shrinks, saves,
reloads and deploys correctly.

For each model (random weights, BatchNorm statistics and affine parameters randomised so
that masking a channel really changes the output), a mask is solved at 50% fewer FLOPs
from random scores, and we check what a user relies on:

(a) the masked full network computes exactly what the physically shrunk one does;
(b) the analytic cost model equals MACs/params counted on the shrunk module;
(c) the shrunk network hits the FLOPs target;
(d) the pickle-free student artifacts reload in a fresh process to the same outputs;
(e) the exported ONNX graph runs on ONNX Runtime with the same outputs at batch 2.

Each model is built once (module-scoped fixture). All students are reloaded by ONE
subprocess, started as soon as they are saved, so the torch import is paid once. ONNX
export (the dynamo exporter: the slow part, single-threaded) is split between this process
and that subprocess so both CPU cores work: the subprocess exports the students it has just
reloaded from disk (what ``cascadec export`` does), this process exports its in-memory
shrunk models, and every graph is checked here against the in-process shrunk outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cascadec.models import create_model
from cascadec.prune.cost import CostModel, count_macs, count_params
from cascadec.prune.groups import build_groups
from cascadec.prune.masks import masked
from cascadec.prune.shrink import pruned_root_idxs, shrink
from cascadec.prune.spec import save_student
from cascadec.prune.targets import Budget, MaskSolver

pytestmark = pytest.mark.slow  # every test shares a module fixture that prunes and exports a model zoo

# model -> input image size (all accept 64x64; vgg16_bn needs >= 32)
MODELS: dict[str, int] = {
    "resnet18": 64,
    "resnet50": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "densenet121": 64,
    "regnet_y_400mf": 64,
    "convnext_tiny": 64,
    "vgg16_bn": 64,
}
# ONNX export is split between the two processes (roughly equal seconds): the fresh
# process exports these after it has reloaded every student; this process exports the rest.
EXPORTED_IN_SUBPROCESS = ("densenet121", "mobilenet_v3_small", "vgg16_bn", "resnet18")
NUM_CLASSES = 10
FLOPS_REDUCTION = 0.5
TARGET_SLACK = 0.02  # |achieved FLOPs ratio - 0.5| allowed
STUDENT_FILES = {"student.widths.json", "student.safetensors"}


def randomise_normalisation(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters: a mask applied before BN (the
    classic bug) would then leak BN's bias and masked != shrunk would show.

    ConvNeXt's layer scale starts at 1e-6, which makes every block (and so every mask)
    nearly invisible in the output; it is set to O(1) too.
    """
    with torch.no_grad():
        for m in model.modules():
            scale = getattr(m, "layer_scale", None)
            if isinstance(scale, nn.Parameter):
                scale.copy_(0.5 + torch.rand(scale.shape, generator=generator))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    m.bias.copy_(0.2 * torch.randn(n, generator=generator))


@dataclass
class Case:
    name: str
    error: BaseException | None = None
    size: int = 64
    shrunk: nn.Module | None = None
    sample: torch.Tensor | None = None  # 1xCxHxW (export / counting)
    batch: torch.Tensor | None = None  # 2xCxHxW (comparisons)
    y_full: np.ndarray | None = None
    y_masked: np.ndarray | None = None
    y_shrunk: np.ndarray | None = None
    budget: Budget | None = None
    base_macs: float = 0.0
    full_macs_counted: int = 0
    full_params_counted: int = 0
    analytic_macs: float = 0.0
    analytic_params: float = 0.0
    shrunk_macs: int = 0
    shrunk_params: int = 0
    kept_units: int = 0
    total_units: int = 0
    student_dir: Path | None = None
    io_dir: Path | None = None
    seconds: dict = field(default_factory=dict)

    def require(self) -> Case:
        if self.error is not None:
            raise AssertionError(
                f"building/pruning {self.name} failed: {type(self.error).__name__}: {self.error}"
            ) from self.error
        return self

    @property
    def scale(self) -> float:
        return float(np.abs(self.y_shrunk).max())


def build_case(name: str, size: int, root: Path, seed: int) -> Case:
    case = Case(name, size=size)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    randomise_normalisation(model, gen)
    case.sample = torch.randn(1, 3, size, size, generator=gen)
    case.batch = torch.randn(2, 3, size, size, generator=gen)

    index = build_groups(model, case.sample)
    cost = CostModel.build(model, index, case.sample)
    case.seconds["groups"] = time.perf_counter() - t0
    scores = torch.rand(index.num_units, generator=gen)
    case.budget = Budget.from_target(cost, flops_reduction=FLOPS_REDUCTION)
    keep = MaskSolver(index, cost).solve(scores, case.budget)
    case.kept_units, case.total_units = int(keep.sum()), int(keep.numel())

    t1 = time.perf_counter()
    case.shrunk = shrink(model, index, keep, case.sample).eval()
    case.seconds["shrink"] = time.perf_counter() - t1

    with torch.no_grad():
        case.y_full = model(case.batch).numpy()
        with masked(model, index, keep):
            case.y_masked = model(case.batch).numpy()
        case.y_shrunk = case.shrunk(case.batch).numpy()

    case.base_macs = cost.base_macs
    case.full_macs_counted = count_macs(model, case.sample)
    case.full_params_counted = count_params(model)
    case.analytic_macs = cost.macs(keep)
    case.analytic_params = cost.params(keep)
    case.shrunk_macs = count_macs(case.shrunk, case.sample)
    case.shrunk_params = count_params(case.shrunk)

    case.student_dir = root / "students" / name
    case.io_dir = root / "io" / name
    case.io_dir.mkdir(parents=True)
    save_student(
        case.shrunk,
        case.student_dir,
        model_name=name,
        model_kwargs={"num_classes": NUM_CLASSES},
        input_shape=[3, size, size],
        removals=pruned_root_idxs(index, keep),
    )
    np.save(case.io_dir / "input.npy", case.batch.numpy())
    case.seconds["total_build"] = time.perf_counter() - t0
    return case


# The fresh process: loads each student from its pickle-free artifacts and runs the saved
# input. Any call to torch.load / pickle.load(s) is recorded (and the test fails on it).
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, pickle, sys, time, traceback
    from pathlib import Path

    import numpy as np
    import torch

    unpickle_calls = []

    def _guard(label, original):
        def wrapper(*args, **kwargs):
            unpickle_calls.append(label)
            return original(*args, **kwargs)
        return wrapper

    torch.load = _guard("torch.load", torch.load)
    torch.serialization.load = _guard("torch.serialization.load", torch.serialization.load)
    pickle.load = _guard("pickle.load", pickle.load)
    pickle.loads = _guard("pickle.loads", pickle.loads)
    torch.set_num_threads(1)  # the parent exports ONNX meanwhile; share the 2 cores

    from cascadec.prune.spec import load_student

    root = Path(sys.argv[1])
    names = [n for n in sys.argv[2].split(",") if n]
    to_export = [n for n in sys.argv[3].split(",") if n]
    results = {}
    students = {}
    for name in names:
        start = time.perf_counter()
        before = len(unpickle_calls)
        try:
            model, spec = load_student(root / "students" / name)
            x = torch.from_numpy(np.load(root / "io" / name / "input.npy"))
            with torch.no_grad():
                y = model(x).numpy()
            np.save(root / "io" / name / "reloaded.npy", y)
            results[name] = {"ok": True, "spec_model": spec["model"]}
            students[name] = (model, spec)
        except Exception as exc:
            results[name] = {"ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()}
        results[name]["unpickle_calls"] = unpickle_calls[before:]
        results[name]["seconds"] = time.perf_counter() - start

    from cascadec.backends.onnx_export import export_onnx

    for name in to_export:
        if name not in students:
            continue
        model, spec = students[name]
        start = time.perf_counter()
        try:
            info = export_onnx(model, torch.zeros(1, *spec["input_shape"]), root / "onnx" / f"{name}.onnx")
            results[name]["export"] = {"ok": True, "exporter": info["exporter"]}
        except Exception as exc:
            results[name]["export"] = {"ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()}
        results[name]["export"]["seconds"] = time.perf_counter() - start
    (root / "reload.json").write_text(json.dumps(results))
    """
)


class Zoo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: dict[str, Case] = {}
        self.proc: subprocess.Popen | None = None
        self._reload: dict | None = None
        self.reload_started = 0.0

    def start_reload(self) -> None:
        names = [n for n, c in self.cases.items() if c.error is None]
        script = self.root / "reload_students.py"
        script.write_text(RELOAD_SCRIPT)
        self.log = open(self.root / "reload.log", "w")
        self.reload_started = time.perf_counter()
        exported = [n for n in EXPORTED_IN_SUBPROCESS if n in names]
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.root), ",".join(names), ",".join(exported)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=str(self.root),
        )

    def reload_results(self) -> dict:
        if self._reload is None:
            assert self.proc is not None
            try:
                rc = self.proc.wait(timeout=600)
            finally:
                self.log.close()
            log = (self.root / "reload.log").read_text()
            assert rc == 0, f"fresh-process reload script failed (exit {rc}):\n{log[-3000:]}"
            self._reload = json.loads((self.root / "reload.json").read_text())
            self.reload_seconds = time.perf_counter() - self.reload_started
        return self._reload

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "log") and not self.log.closed:
            self.log.close()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    # one torch thread here and one in the reload subprocess: both cores busy, no thread
    # oversubscription (which makes torch several times slower on a loaded 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    zoo = Zoo(tmp_path_factory.mktemp("zoo"))
    for seed, (name, size) in enumerate(MODELS.items()):
        try:
            zoo.cases[name] = build_case(name, size, zoo.root, seed)
        except Exception as exc:  # one broken model must not hide the others' results
            zoo.cases[name] = Case(name, error=exc)
    zoo.start_reload()
    yield zoo
    zoo.close()
    torch.set_num_threads(threads)


@pytest.fixture(params=list(MODELS))
def case(request, zoo) -> Case:
    return zoo.cases[request.param].require()


def _tol(case: Case, rel: float) -> float:
    return rel * max(1.0, case.scale)


# ---------------------------------------------------------------- (a) masked == shrunk


@pytest.mark.slow
def test_masks_change_the_output(case):
    """Guard for (a): with random BN statistics, masking half the FLOPs must matter."""
    change = float(np.abs(case.y_full - case.y_masked).max())
    assert change > 1e-3 * case.scale, f"{case.name}: masking barely changed the output ({change:.2e})"
    assert case.kept_units < case.total_units


def test_masked_network_equals_shrunk_network(case):
    assert case.y_masked.shape == case.y_shrunk.shape == (2, NUM_CLASSES)
    diff = float(np.abs(case.y_masked - case.y_shrunk).max())
    assert diff <= _tol(case, 1e-5), (
        f"{case.name}: masked vs shrunk max |diff| {diff:.3e} (output scale {case.scale:.3e})"
    )


# ---------------------------------------------------------------- (b) analytic cost == counted


def test_analytic_cost_matches_counted_cost(case):
    assert case.base_macs == pytest.approx(case.full_macs_counted, abs=0.5)
    assert case.analytic_macs == pytest.approx(case.shrunk_macs, abs=0.5), f"{case.name}: analytic MACs != counted MACs"
    assert case.analytic_params == pytest.approx(case.shrunk_params, abs=0.5), (
        f"{case.name}: analytic params != counted params"
    )
    assert case.shrunk_params < case.full_params_counted


# ---------------------------------------------------------------- (c) target met


def test_shrunk_flops_meet_the_target(case):
    assert case.shrunk_macs <= case.budget.value * (1 + 1e-9), "the shrunk model costs more than the budget"
    ratio = case.shrunk_macs / case.full_macs_counted
    assert abs(ratio - (1 - FLOPS_REDUCTION)) <= TARGET_SLACK, f"{case.name}: kept {ratio:.4f} of the FLOPs"


# ---------------------------------------------------------------- (e) ONNX Runtime parity


# this process's exports first, so it works while the subprocess reloads and exports the rest
ONNX_ORDER = [n for n in MODELS if n not in EXPORTED_IN_SUBPROCESS] + [n for n in MODELS if n in EXPORTED_IN_SUBPROCESS]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_ORDER)
def test_onnxruntime_matches_shrunk_model(name, zoo):
    from cascadec.backends.onnx_export import export_onnx
    from cascadec.backends.onnxruntime_backend import OrtRunner

    case = zoo.cases[name].require()
    path = zoo.root / "onnx" / f"{case.name}.onnx"
    if name in EXPORTED_IN_SUBPROCESS:  # exported from the reloaded student in the fresh process
        export = zoo.reload_results()[name].get("export")
        assert export and export["ok"], f"{name}: export in the fresh process failed: {export}"
        case.seconds["export"] = export["seconds"]
    else:
        start = time.perf_counter()
        info = export_onnx(case.shrunk, case.sample, path)
        case.seconds["export"] = time.perf_counter() - start
        assert info["dynamic_batch"]
    assert path.is_file()
    y = OrtRunner(path)(case.batch.numpy())  # batch 2 through the dynamic batch axis
    assert y.shape == case.y_shrunk.shape
    diff = float(np.abs(y - case.y_shrunk).max())
    assert diff <= _tol(case, 1e-4), f"{case.name}: onnxruntime vs torch max |diff| {diff:.3e} (scale {case.scale:.3e})"


# ---------------------------------------------------------------- (d) pickle-free reload in a fresh process


def test_student_artifacts_are_pickle_free(case):
    files = {p.name for p in case.student_dir.iterdir()}
    assert files == STUDENT_FILES, f"unexpected student artifacts: {sorted(files)}"
    assert not [p for p in case.student_dir.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin")]
    spec = json.loads((case.student_dir / "student.widths.json").read_text())
    assert spec["model"] == case.name and spec["input_shape"] == [3, case.size, case.size]
    assert spec["removed_channels"], "a 50% FLOPs cut must remove channels"


def test_fresh_process_reload_matches(case, zoo):
    result = zoo.reload_results()[case.name]
    assert result["ok"], f"{case.name}: load_student failed in a fresh process: {result.get('error')}"
    assert result["unpickle_calls"] == [], f"{case.name}: loading the student unpickled: {result['unpickle_calls']}"
    y = np.load(case.io_dir / "reloaded.npy")
    assert y.shape == case.y_shrunk.shape
    diff = float(np.abs(y - case.y_shrunk).max())
    assert diff <= _tol(case, 1e-5), f"{case.name}: reloaded vs in-process max |diff| {diff:.3e}"
