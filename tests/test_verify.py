"""Parity metrics on hand-made arrays, the gate, and verification over real backends."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cascadec.verify.parity as verify_mod
from cascadec.backends.onnx_export import export_onnx
from cascadec.backends.runner import BaseRunner
from cascadec.errors import GateFailed, UserError
from cascadec.verify.compare import compare_outputs
from cascadec.verify.diagnose import conditioning
from cascadec.verify.gates import DEFAULT_TOLERANCES, Gate, Tolerance
from cascadec.verify.parity import verify_backends
from cascadec.verify.present import describe_conditioning, parity_rows, raise_on_failure
from cascadec.verify.results import BackendParity, ParityResult

REF = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])


def test_compare_identical():
    r = compare_outputs(REF, REF.copy(), None)
    assert r["max_abs_diff"] == r["mean_abs_diff"] == r["max_rel_diff"] == r["min_atol_to_pass"] == 0.0
    assert r["top1_agreement"] == r["top5_agreement"] == 1.0
    assert r["samples"] == 3 and r["num_classes"] == 6
    assert "accuracy" not in r


def test_compare_numbers_by_hand():
    cand = REF.copy()
    cand[0, 5] = 6.5  # +0.5 on a 6: rel 1/12; top-1 unchanged
    cand[1, 1] = 7.0  # +2 on a 5: rel 0.4; top-1 flips from 0 to 1
    cand[2, 0] = 0.25  # +0.25 on a 0: rel 0.25 / eps, huge; top-1 unchanged
    labels = np.array([5, 0, 0])
    r = compare_outputs(REF, cand, labels)
    assert r["max_abs_diff"] == pytest.approx(2.0)
    assert r["mean_abs_diff"] == pytest.approx(2.75 / 18)
    assert r["min_atol_to_pass"] == pytest.approx(2.0)
    assert r["max_rel_diff"] == pytest.approx(0.25 / np.finfo(np.float64).eps)  # Polygraphy's epsilon for zeros
    assert r["top1_agreement"] == pytest.approx(2 / 3)
    # row 0 top-5 {1..5}, row 1 top-5 {0..4} in both; row 2: cand adds class 0 but ties among zeros
    assert 0.0 <= r["top5_agreement"] <= 1.0
    assert r["accuracy"] == pytest.approx(1 / 3)  # cand top-1: 5, 1, 1
    assert r["reference_accuracy"] == pytest.approx(2 / 3)  # ref top-1: 5, 0, 1


def test_top5_agreement_counts_set_changes():
    ref = np.array([[9.0, 8, 7, 6, 5, 0, 0], [9.0, 8, 7, 6, 5, 0, 0]])
    cand = ref.copy()
    cand[1, 6] = 5.5  # class 6 pushes class 4 out of row 1's top-5
    r = compare_outputs(ref, cand)
    assert r["top1_agreement"] == 1.0
    assert r["top5_agreement"] == 0.5


def test_few_classes_have_no_top5():
    r = compare_outputs(np.eye(3), np.eye(3))
    assert "top5_agreement" not in r and r["top1_agreement"] == 1.0


def test_nonfinite_never_passes():
    cand = REF.copy()
    cand[0, 0] = np.nan
    r = compare_outputs(REF, cand)
    assert r["nonfinite"] == 1 and math.isinf(r["max_abs_diff"])
    metrics = {f["metric"] for f in Gate().check(r)}
    assert {"nonfinite", "tolerance"} <= metrics
    loose = Tolerance(atol=1e9, rtol=1e9)
    assert compare_outputs(REF, cand, tolerance=loose)["mismatched_elements"] == 1  # NaN fails any tolerance


@pytest.mark.parametrize(
    ("cand", "labels", "match"),
    [(np.zeros((2, 6)), None, "shapes differ"), (REF, np.array([1, 2]), "2 labels for 3 outputs")],
)
def test_compare_errors(cand, labels, match):
    with pytest.raises(UserError, match=match):
        compare_outputs(REF, cand, labels)


def test_gate_pass_and_fail():
    ok = compare_outputs(REF, REF + 1e-6)
    assert Gate().check(ok) == []
    bad = compare_outputs(REF, REF[:, ::-1].copy())
    failures = Gate().check(bad)
    assert {f["metric"] for f in failures} == {"tolerance", "top1_agreement"}
    f = next(f for f in failures if f["metric"] == "tolerance")
    assert f["value"] == pytest.approx(5.0) and f["threshold"] == 1e-4 and f["precision"] == "fp32"
    assert "atol 0.0001" in f["required"] and "rtol 0.001" in f["required"]
    no_tensor_check = {"fp32": Tolerance(atol=None, rtol=None)}
    loose = Gate(tolerances=no_tensor_check, min_top1_agreement=0.0)
    assert loose.check(bad) == []
    drop = Gate(tolerances=no_tensor_check, min_top1_agreement=None, max_accuracy_drop=0.1)
    assert [f["metric"] for f in drop.check(compare_outputs(REF, REF[:, ::-1].copy(), np.array([5, 0, 1])))] == [
        "accuracy_drop"
    ]


def test_raise_on_failure():
    bad = compare_outputs(REF, REF[:, ::-1].copy())
    failures = Gate().check(bad)
    results = {
        "backends": {
            "onnxruntime": {**bad, "passed": False, "failures": failures},
            "torch": {**compare_outputs(REF, REF), "passed": True, "failures": []},
        }
    }
    with pytest.raises(GateFailed) as info:
        raise_on_failure(results)
    assert info.value.exit_code == 3
    assert {f["backend"] for f in info.value.failures} == {"onnxruntime"}
    assert len(info.value.failures) == 2
    message = str(info.value)
    assert message.startswith("parity gate failed for onnxruntime")
    assert "backend" in message and "precision" in message and "required" in message
    assert "tolerance" in message and "atol 0.0001" in message and "fp32" in message
    raise_on_failure({"backends": {"torch": results["backends"]["torch"]}})  # passing: no raise


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallNet().eval()
    path = tmp_path_factory.mktemp("verify") / "small.onnx"
    export_onnx(model, torch.randn(1, 1, 16, 16), path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 1, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, 50)
    return model, path, x, y


@pytest.mark.slow
def test_verify_backends_arrays(exported):
    model, path, x, y = exported
    out = verify_backends(
        model, path, (x, y), backends=["ort", "torch"], samples=40, progress=False, batch_size=16
    ).to_dict()
    assert out["samples"] == 40
    assert set(out["backends"]) == {"onnxruntime", "torch"}  # aliases are canonicalised
    ort = out["backends"]["onnxruntime"]
    assert ort["passed"] is True and ort["failures"] == []
    assert ort["max_abs_diff"] <= 1e-4 and ort["top1_agreement"] == 1.0
    with torch.no_grad():
        expected = (model(torch.from_numpy(x[:40])).argmax(1).numpy() == y[:40]).mean()
    assert out["torch_accuracy"] == pytest.approx(expected)
    assert ort["accuracy"] == pytest.approx(expected)
    assert ort["precision"] == "fp32" and ort["atol"] == 1e-4 and ort["rtol"] == 1e-3
    assert ort["mismatched_elements"] == 0 and ort["min_atol_to_pass"] == ort["max_abs_diff"]
    assert ort["thresholds"]["min_top1_agreement"] == 0.999
    assert out["gate"]["tolerances"]["fp16"]["atol"] == 5e-2
    assert "first_divergence" not in ort
    raise_on_failure(out)


def test_verify_backends_returns_typed_results(exported):
    """The CLI and the report read fields, not dict keys; to_dict/from_dict round-trip the manifest form."""
    model, path, x, y = exported
    result = verify_backends(model, path, (x, y), backends=["ort"], samples=16, progress=False)
    assert isinstance(result, ParityResult) and result.passed and result.failed == []
    ort = result.backends["onnxruntime"]
    assert isinstance(ort, BackendParity) and ort.precision == "fp32" and not ort.tensor_failed
    assert ort.metrics["top1_agreement"] == 1.0
    again = ParityResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()
    assert parity_rows(result)[0][0] == "onnxruntime" and parity_rows(result)[0][-1] == "yes"


def test_verify_backends_loader_and_dataset(exported):
    model, path, x, y = exported
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for source in (DataLoader(dataset, batch_size=7), dataset):
        out = verify_backends(model, path, source, samples=20, progress=True).to_dict()
        assert out["samples"] == 20 and out["backends"]["onnxruntime"]["passed"]
    no_labels = verify_backends(model, path, x, samples=5, progress=False).to_dict()
    assert no_labels["torch_accuracy"] is None and "accuracy" not in no_labels["backends"]["onnxruntime"]


def test_verify_backends_detects_divergence(exported, monkeypatch):
    model, path, x, y = exported
    real = verify_mod.get_runner

    def skewed(name, **kwargs):
        runner = real(name, **kwargs)
        return FnRunner(lambda a: runner(a) + np.linspace(0, 1, 10, dtype=np.float32))

    monkeypatch.setattr(verify_mod, "get_runner", skewed)
    out = verify_backends(model, path, (x, y), samples=50, progress=False).to_dict()
    result = out["backends"]["onnxruntime"]
    assert result["passed"] is False
    assert "tolerance" in {f["metric"] for f in result["failures"]}
    # the skew is added after the graph: every node agrees, and the search says so
    assert result["first_divergence"]["node"] is None
    assert "no ONNX node exceeded" in result["first_divergence"]["error"]
    with pytest.raises(GateFailed, match="onnxruntime") as info:
        raise_on_failure(out)
    assert "first divergent layer (onnxruntime): not found" in str(info.value)
    # PyTorch float32 is ~1e-7 from float64 here; the skewed backend is ~1 away: the backend, not the network
    cond = result["conditioning"]
    assert cond["ill_conditioned"] is False and cond["candidate_vs_fp64"] > 0.5 > 1e-3 > cond["torch_fp32_vs_fp64"]
    assert "onnxruntime itself departs from the exact result" in str(info.value)


class _Amplifier(nn.Module):
    """Logits of ~1e6: float32 rounding alone moves them by far more than atol 1e-4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc.weight.mul_(1e6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_conditioning_tells_an_ill_conditioned_network_from_a_wrong_backend():
    model, x = _Amplifier().eval(), np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    same = conditioning(model, x, ref, ref.copy(), tol)  # a backend exactly as good as PyTorch float32
    assert same["torch_fp32_vs_fp64"] > 1e-4 and same["ill_conditioned"] is True and same["samples"] == 4
    assert "ill-conditioned" in describe_conditioning("onnxruntime", same)
    off = conditioning(model, x, ref, ref + 1e3, tol)  # far beyond float32 rounding
    assert off["ill_conditioned"] is False and off["candidate_vs_fp64"] > 999
    assert next(model.parameters()).dtype == torch.float32  # the float64 copy left the model alone


def test_conditioning_never_raises():
    class Float32Only(nn.Module):
        def forward(self, x):
            assert x.dtype == torch.float32, "float32 only"
            return x

    x = np.ones((2, 3), dtype=np.float32)
    found = conditioning(Float32Only(), x, x, x, Tolerance(atol=1e-4, rtol=1e-3))
    assert "float64 reference failed: AssertionError: float32 only" in found["error"]
    assert "not checked" in describe_conditioning("onnxruntime", found)


def test_verify_backends_errors(exported):
    model, path, x, _ = exported
    with pytest.raises(UserError, match="unknown backend"):
        verify_backends(model, path, x, backends=["nope"], progress=False)
    with pytest.raises(UserError, match="samples"):
        verify_backends(model, path, x, samples=0, progress=False)
    with pytest.raises(UserError, match="empty"):
        verify_backends(model, path, x[:0], progress=False)
    with pytest.raises(UserError, match="cannot read samples"):
        verify_backends(model, path, 42, progress=False)


def test_polygraphy_elementwise_semantics():
    """An element passes when atol OR rtol covers it (Polygraphy's elemwise check)."""
    ref = np.array([[100.0, 1.0, 0.0, -2.0, 5.0]])
    cand = ref + np.array([[0.5, 0.05, 0.0, 0.0, 0.0]])  # 0.5 on 100 is 0.5 % rel; 0.05 on 1 is 5 % rel
    tol = Tolerance(atol=0.1, rtol=0.01)
    r = compare_outputs(ref, cand, tolerance=tol)
    assert r["mismatched_elements"] == 0  # 0.5 > atol but rel 0.005 <= rtol; 0.05 <= atol though rel 0.05 > rtol
    assert Gate(tolerances={"fp32": tol}).check(r) == []
    assert r["min_atol_to_pass"] == pytest.approx(0.5) and r["min_rtol_to_pass"] == pytest.approx(0.05)
    # with rtol 0.01 kept, only the 0.05-on-1 element needs atol; with atol 0.1 kept, only the 0.5-on-100 one needs rtol
    assert r["min_atol_at_rtol"] == pytest.approx(0.05) and r["min_rtol_at_atol"] == pytest.approx(0.005)
    strict = Tolerance(atol=0.01, rtol=0.001)
    r2 = compare_outputs(ref, cand, tolerance=strict)
    assert r2["mismatched_elements"] == 2 and r2["total_elements"] == 5
    failures = Gate(tolerances={"fp32": strict}).check(r2)
    assert [f["metric"] for f in failures] == ["tolerance"] and "2 of 5 elements" in failures[0]["shown"]
    only_rtol = Tolerance(atol=None, rtol=0.01)  # atol None counts as 0
    assert compare_outputs(ref, cand, tolerance=only_rtol)["mismatched_elements"] == 1


def test_tolerances_depend_on_precision():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10)) * 5
    cand = ref + rng.uniform(-4e-3, 4e-3, ref.shape)  # fp16-sized error
    gate = Gate()
    for precision, passes in (("fp32", False), ("fp16", True), ("int8", True)):
        r = compare_outputs(ref, cand, tolerance=gate.tolerance(precision))
        assert (gate.check(r, precision) == []) is passes, precision
    assert gate.thresholds("fp16")["min_top1_agreement"] == 0.99  # fp16's own, not the gate's 0.999
    assert gate.thresholds("fp32")["min_top1_agreement"] == 0.999
    with pytest.raises(UserError, match="no parity tolerances for precision 'bf16'"):
        gate.check(compare_outputs(ref, cand), "bf16")


def test_int8_is_judged_by_decisions():
    ref = np.tile(np.arange(10.0), (100, 1))
    labels = np.full(100, 9)
    cand = ref + np.random.default_rng(1).uniform(-0.3, 0.3, ref.shape)  # quantisation noise, top-1 kept
    gate = Gate()
    ok = compare_outputs(ref, cand, labels, tolerance=gate.tolerance("int8"))
    assert gate.check(ok, "int8") == []
    flipped = cand.copy()
    flipped[:5, 0] = 20.0  # 5 % of the decisions change: accuracy drops 5 points, agreement 0.95
    bad = compare_outputs(ref, flipped, labels, tolerance=gate.tolerance("int8"))
    metrics = {f["metric"] for f in gate.check(bad, "int8")}
    assert {"top1_agreement", "accuracy_drop"} <= metrics


def test_legacy_max_abs_diff_caps_fp32_only():
    r = compare_outputs(REF, REF + 1e-3)
    gate = Gate(tolerances={**DEFAULT_TOLERANCES, "fp32": Tolerance(atol=1.0, rtol=1.0)}, max_abs_diff=1e-4)
    assert [f["metric"] for f in gate.check(r, "fp32")] == ["max_abs_diff"]
    assert gate.check(r, "fp16") == []


def test_onnxruntimes_tensorrt_provider_is_gated_as_tf32(tmp_path, monkeypatch):
    """The TensorRT provider computes an fp32 graph in TF32 (TensorRT's default, no provider option
    against it): recorded and gated as its own precision; the CUDA provider runs with TF32 off."""
    import onnxruntime as ort

    import cascadec.backends.onnxruntime_backend as ortb
    from cascadec.quantize.ptq import convert_fp16

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    convert_fp16(tmp_path / "m.onnx", tmp_path / "h.onnx")
    # no GPU here: every device gets a CPU session, which is all the precision logic reads
    cpu = lambda path, device, threads, label, fused: ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # noqa: E731
    monkeypatch.setattr(ortb, "_create_session", cpu)
    assert ortb.OrtRunner(tmp_path / "m.onnx", device="tensorrt").precision == "tf32"
    assert ortb.OrtRunner(tmp_path / "m.onnx", device="cuda").precision == "fp32"
    assert ortb.OrtRunner(tmp_path / "h.onnx", device="tensorrt").precision == "fp16"
    assert ortb.PROVIDER_OPTIONS["CUDAExecutionProvider"]["use_tf32"] == "0"
    assert Gate().tolerance("tf32") == DEFAULT_TOLERANCES["fp16"] != DEFAULT_TOLERANCES["fp32"]
    from cascadec.recipe import load_recipe

    gate = Gate.from_recipe(load_recipe("fmnist_quick", ["verify.tolerances.tf32.atol=0.1"]).verify)
    assert gate.tolerance("tf32").atol == 0.1


def test_gate_from_recipe_merges_overrides_onto_defaults():
    from cascadec.recipe import load_recipe

    recipe = load_recipe(
        "fmnist_quick",
        ["verify.tolerances.fp16.atol=0.05", "verify.max_accuracy_drop=0.02", "verify.min_top5_agreement=0.99"],
    )
    gate = Gate.from_recipe(recipe.verify)
    assert gate.tolerance("fp16") == Tolerance(atol=0.05, rtol=1e-2, min_top1_agreement=0.99)
    assert gate.tolerance("fp32") == DEFAULT_TOLERANCES["fp32"] and gate.tolerance("int8") == DEFAULT_TOLERANCES["int8"]
    assert gate.thresholds("fp32")["max_accuracy_drop"] == 0.02
    assert gate.thresholds("int8")["max_accuracy_drop"] == 0.01  # int8's own wins
    assert gate.thresholds("fp32")["min_top5_agreement"] == 0.99
    assert Gate.from_recipe(load_recipe("fmnist_quick").verify).tolerances == DEFAULT_TOLERANCES
    with pytest.raises(UserError, match="verify.tolerances.bf16"):
        load_recipe("fmnist_quick", ["verify.tolerances.bf16.atol=1"])


class FnRunner(BaseRunner):
    """A function as a runner (fp32 unless told): what a test's stand-in engine needs to be."""

    def __init__(self, fn, precision: str = "fp32") -> None:
        self.fn, self.precision = fn, precision

    def infer(self, x):
        return self.fn(x)


class _Fp16Runner:
    """Stands in for a TensorRT fp16 engine: the ONNX output with fp16 rounding."""

    precision = "fp16"

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x):
        return self.inner(x).astype(np.float16).astype(np.float32)


def test_verify_backends_uses_the_runner_precision(exported, monkeypatch):
    model, path, x, y = exported
    real = verify_mod.get_runner
    monkeypatch.setattr(verify_mod, "get_runner", lambda name, **kw: _Fp16Runner(real("onnxruntime", **kw)))
    out = verify_backends(model, path, (x, y), samples=50, progress=False).to_dict()
    result = out["backends"]["onnxruntime"]
    assert result["precision"] == "fp16" and result["atol"] == 5e-2 and result["passed"] is True
    # fp16 rounding is <= 2**-11 relative, inside even fp32's rtol 1e-3: only a tighter rtol catches it
    strict = Gate(tolerances={**DEFAULT_TOLERANCES, "fp16": Tolerance(atol=1e-6, rtol=1e-5)})
    failed = verify_backends(model, path, (x, y), samples=50, progress=False, gate=strict).to_dict()["backends"][
        "onnxruntime"
    ]
    assert failed["passed"] is False and failed["failures"][0]["precision"] == "fp16"


def test_a_corrupted_graph_names_its_first_divergent_layer(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    model, path, x, y = exported
    proto = onnx.load(str(path))
    conv_weight = next(i for i in proto.graph.initializer if i.name == "body.0.weight")
    conv_weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv_weight) * 1.1, conv_weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    out = verify_backends(model, bad, (x, y), samples=20, progress=False).to_dict()
    found = out["backends"]["onnxruntime"]["first_divergence"]
    assert found["op_type"] == "Conv" and found["torch_module"] in ("body.0", "body.1")
    assert found["node"] == next(n.name for n in proto.graph.node if "body.0.weight" in n.input)
    with pytest.raises(GateFailed) as info:
        raise_on_failure(out)
    text = str(info.value)
    assert "first divergent layer (onnxruntime): ONNX node" in text and found["node"] in text
    assert text.splitlines()[1].split() == ["backend", "precision", "metric", "value", "required"]


# ---------------------------------------------------------------- the verify command on a finished run


def test_cli_verify_prints_precision_and_tolerances(cli, copy_run):
    run = copy_run()
    result = cli("verify", run)
    assert result.code == 0, result.err
    assert "fp32" in result.out and "0.0001 / 0.001" in result.out
    parity = json.loads((run / "report.json").read_text())["parity"]["onnxruntime"]
    assert parity["precision"] == "fp32" and parity["atol"] == 1e-4 and parity["rtol"] == 1e-3
    assert parity["min_atol_to_pass"] == parity["max_abs_diff"] and "min_rtol_to_pass" in parity
    assert parity["mismatched_elements"] == 0 and "first_divergence" not in parity


def test_cli_forced_tolerance_failure_exits_3_with_table_and_first_layer(cli, copy_run):
    run = copy_run()
    result = cli(
        "verify", run, "--set", "verify.tolerances.fp32.atol=1e-12", "--set", "verify.tolerances.fp32.rtol=1e-12"
    )
    assert result.code == 3, result.err
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:5] == ["backend", "precision", "metric", "value", "required"]
    )
    assert lines[header + 1].split()[:3] == ["onnxruntime", "fp32", "tolerance"]
    assert "atol 1e-12 or rel <= rtol 1e-12" in result.err
    assert "first divergent layer (onnxruntime): ONNX node" in result.err
    report = json.loads((run / "report.json").read_text())
    parity = report["parity"]["onnxruntime"]
    assert parity["passed"] is False and parity["atol"] == 1e-12
    assert parity["first_divergence"]["node"] and parity["first_divergence"]["tolerance"] == {
        "atol": 1e-12,
        "rtol": 1e-12,
    }
    md = (run / "report.md").read_text()
    assert "first divergent layer: ONNX node" in md and "| onnxruntime | fp32 |" in md
    assert (run / "recipe.yaml").read_text().count("1e-12") == 0  # --set changes this check, not the run


def test_cli_corrupted_student_names_the_corrupted_conv(cli, copy_run):
    import onnx
    from onnx import numpy_helper

    run = copy_run()
    proto = onnx.load(str(run / "student.onnx"))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    target = convs[len(convs) // 2]
    weight = next(i for i in proto.graph.initializer if i.name == target.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(proto, str(run / "student.onnx"))
    result = cli("verify", run)
    assert result.code == 3, result.err
    found = json.loads((run / "report.json").read_text())["parity"]["onnxruntime"]["first_divergence"]
    assert found["node"] == target.name and found["op_type"] == "Conv" and found["reference"] == "torch"
    assert found["torch_module"] is not None
    assert f"ONNX node {target.name!r}" in result.err


@pytest.mark.parametrize(
    ("backend", "needs"),
    [
        ("tensorrt", "TensorRT is not installed"),
        ("onnxruntime-cuda", "CUDAExecutionProvider"),
        ("onnxruntime-trt", "TensorrtExecutionProvider"),
    ],
)
def test_cli_missing_gpu_backend_is_exit_2_one_line(cli, copy_run, monkeypatch, backend, needs):
    import sys

    import cascadec.backends.onnxruntime_backend as ortb

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    run = copy_run()
    result = cli("verify", run, "--backend", backend)
    assert result.code == 2
    assert len(result.err_lines) == 1 and needs in result.err and "install" in result.err
    assert "Traceback" not in result.err


class _ProfiledRunner:
    """An engine whose optimisation profile takes batches 4..8 only (what TrtRunner enforces)."""

    precision = "fp32"
    batch_range = (4, 8)

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, x):
        assert 4 <= len(x) <= 8, len(x)
        self.batches.append(len(x))
        return self.inner(x)


def test_batches_are_cut_to_the_engine_profile(exported, monkeypatch):
    model, path, x, y = exported
    real = verify_mod.get_runner
    made = []
    monkeypatch.setattr(
        verify_mod, "get_runner", lambda name, **kw: made.append(_ProfiledRunner(real("onnxruntime", **kw))) or made[-1]
    )
    out = verify_backends(model, path, (x, y), samples=22, progress=False, batch_size=11).to_dict()
    assert out["backends"]["onnxruntime"]["passed"] and out["samples"] == 22
    assert made[0].batches == [8, 4, 8, 4]  # 11 = 8 + 3 padded to 4, twice


class _Cancellation(nn.Module):
    """(1e7 + logits) - 1e7: float32 keeps no fractional digit at 1e7, so PyTorch float32 itself is
    up to 0.5 from the exact logits, absolutely and relatively: no float32 backend can meet
    atol 1e-4 / rtol 1e-3 against it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.full_like(self.fc(x.flatten(1)), 1e7)
        return (big + self.fc(x.flatten(1))) - big


@pytest.fixture(scope="module")
def ill_conditioned(tmp_path_factory):
    model = _Cancellation().eval()
    path = tmp_path_factory.mktemp("verify") / "cancel.onnx"
    export_onnx(model, torch.randn(1, 16), path)
    x = np.random.default_rng(1).standard_normal((64, 16), dtype=np.float32)
    exact = model.to(torch.float64)(torch.from_numpy(x).double()).detach().numpy()
    model.float()
    return model, path, x, exact


def _backend_returning(monkeypatch, outputs: np.ndarray) -> None:
    """ONNX Runtime replaced by a runner answering ``outputs`` row by row (in batch order)."""
    real, served = verify_mod.get_runner, {"n": 0}

    def fake(name, **kwargs):
        real(name, **kwargs)  # (the real runner is still built: the ONNX file must load)

        def run(a):
            start = served["n"]
            served["n"] += len(a)
            return outputs[start : start + len(a)].astype(np.float32)

        return FnRunner(run)

    monkeypatch.setattr(verify_mod, "get_runner", fake)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float64", "fail"])
def test_an_exact_backend_of_an_ill_conditioned_network_is_judged_against_float64(ill_conditioned, monkeypatch, policy):
    model, path, x, exact = ill_conditioned
    _backend_returning(monkeypatch, exact)  # a backend as exact as float32 can be
    gate = Gate(ill_conditioned=policy)
    result = verify_backends(model, path, x, samples=64, batch_size=16, progress=False, gate=gate)
    b = result.backends["onnxruntime"]
    assert b.conditioning["ill_conditioned"] is True  # PyTorch float32 is the one far from exact
    assert b.metrics["max_abs_diff"] > 0.05  # against PyTorch float32 it fails the tolerance
    if policy == "fail":
        assert not b.passed and b.float64_judgement is None
        with pytest.raises(GateFailed, match="ill-conditioned"):
            raise_on_failure(result)
        return
    judged = b.float64_judgement
    assert b.passed, judged
    assert judged["samples"] == 64  # every verify sample, not the 4 probe samples
    assert judged["failures"] == [] and judged["excused"] == []  # it meets the gate against float64 outright
    assert "tolerance" in judged["torch_fp32_failures"]
    assert judged["candidate"]["max_abs_diff"] < 1e-5 < 0.05 < judged["torch_fp32"]["max_abs_diff"]
    raise_on_failure(result)  # passes: nothing raised
    again = ParityResult.from_dict(json.loads(json.dumps(result.to_dict())))  # the manifest round trip
    assert again.passed and again.backends["onnxruntime"].float64_judgement == judged


def test_a_backend_as_inexact_as_pytorch_float32_is_excused_not_a_worse_one(ill_conditioned, monkeypatch):
    model, path, x, exact = ill_conditioned
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    _backend_returning(monkeypatch, exact + 0.5 * (ref - exact))  # half PyTorch float32's own error
    result = verify_backends(model, path, x, samples=64, batch_size=16, progress=False)
    judged = result.backends["onnxruntime"].float64_judgement
    assert result.passed and "tolerance" in judged["excused"], judged
    assert judged["candidate"]["max_abs_diff"] <= judged["torch_fp32"]["max_abs_diff"]
    monkeypatch.undo()
    _backend_returning(monkeypatch, exact + 1.5 * (ref - exact))  # further from exact than PyTorch float32
    result = verify_backends(model, path, x, samples=64, batch_size=16, progress=False)
    b = result.backends["onnxruntime"]
    assert not b.passed and "tolerance" in [f["metric"] for f in b.float64_judgement["failures"]]
    with pytest.raises(GateFailed, match="still fails tolerance"):
        raise_on_failure(result)


def test_a_wrong_backend_of_an_ill_conditioned_network_still_fails(ill_conditioned, monkeypatch):
    model, path, x, exact = ill_conditioned
    _backend_returning(monkeypatch, exact + 0.9 * np.sign(exact - np.round(exact)))  # worse than float32's own error
    result = verify_backends(model, path, x, samples=64, batch_size=16, progress=False)
    b = result.backends["onnxruntime"]
    assert not b.passed
    if b.float64_judgement is not None:  # (judged only when the probe found it ill-conditioned)
        assert b.float64_judgement["failures"]
    with pytest.raises(GateFailed, match="onnxruntime"):
        raise_on_failure(result)


def test_a_tie_is_judged_by_atol_alone_or_rtol_alone() -> None:
    """top1_disagreements forgives a row whose reference scores the two classes within
    max(atol, rtol x |best|); either bound alone is enough (None counts as 0)."""
    from cascadec.verify.compare import top1_disagreements
    from cascadec.verify.gates import Tolerance

    ref = np.array([[10.0, 9.9995, 0.0], [10.0, 9.0, 0.0]])
    cand = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # both rows pick class 1
    differ, ties = top1_disagreements(ref, cand, Tolerance(atol=1e-3, rtol=None))
    assert differ.tolist() == [False, True] and ties == 1  # row 0: a margin of 5e-4 < atol
    differ, ties = top1_disagreements(ref, cand, Tolerance(atol=None, rtol=1e-4))
    assert differ.tolist() == [False, True] and ties == 1  # 5e-4 < 1e-4 x 10
    differ, ties = top1_disagreements(ref, cand, Tolerance(atol=1e-5, rtol=1e-6))
    assert differ.tolist() == [True, True] and ties == 0
    assert top1_disagreements(ref, cand)[0].tolist() == [True, True]


def test_one_image_of_logits_compares_as_one_row() -> None:
    """A 1-D output (one image's logits) is one row, not one row per class."""
    from cascadec.verify.compare import as_2d, compare_outputs

    logits = np.array([0.1, 2.0, -1.0, 0.5])
    assert as_2d(logits).shape == (1, 4) and as_2d(np.zeros((3, 2, 2))).shape == (3, 4)
    same = compare_outputs(logits, logits.copy())
    assert same["top1_agreement"] == 1.0
    other = compare_outputs(logits, np.array([2.0, 0.1, -1.0, 0.5]))
    assert other["top1_agreement"] == 0.0


def test_a_top5_gate_fails_below_its_minimum_and_passes_at_it() -> None:
    no_tensor_check = {"fp32": Tolerance(atol=None, rtol=None)}
    gate = Gate(tolerances=no_tensor_check, min_top1_agreement=None, min_top5_agreement=0.9)
    failures = gate.check({"top5_agreement": 0.5})
    assert [(f["metric"], f["value"], f["op"], f["threshold"]) for f in failures] == [
        ("top5_agreement", 0.5, ">=", 0.9)
    ]
    assert gate.check({"top5_agreement": 0.9}) == [] and gate.check({"top5_agreement": 1.0}) == []
    assert gate.check({}) == []  # fewer than five classes: no top-5 to judge


def test_a_result_compared_under_other_tolerances_is_judged_by_its_max_differences() -> None:
    """The element count is trusted only when the comparison used the gate's own tolerances;
    otherwise the max |diff| and max rel decide (both must exceed their bound, None being 0)."""
    gate = Gate(tolerances={"fp32": Tolerance(atol=1e-4, rtol=None)}, min_top1_agreement=None)
    loose = {"mismatched_elements": 0, "total_elements": 10, "atol": 1.0, "rtol": 1.0}
    result = {**loose, "max_abs_diff": 0.01, "max_rel_diff": 0.5}
    assert [f["metric"] for f in gate.check(result)] == ["tolerance"]  # 0.01 > 1e-4 and 0.5 > 0
    own = {**result, "atol": 1e-4, "rtol": None}
    assert gate.check(own) == []  # its own tolerances: 0 elements outside
    assert gate.check({**result, "max_abs_diff": 5e-5}) == []
