"""Parity metrics on hand-made arrays, the gate, and verification over real backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cascadec.verify as verify_mod
from cascadec.backends.onnx_export import export_onnx
from cascadec.errors import GateFailed, UserError
from cascadec.verify import Gate, compare_outputs, raise_on_failure, verify_backends, verify_run

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
    assert r["max_rel_diff"] == pytest.approx(0.25 / 1e-12)
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
    assert {"nonfinite", "max_abs_diff"} <= metrics


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
    assert {f["metric"] for f in failures} == {"max_abs_diff", "top1_agreement"}
    f = next(f for f in failures if f["metric"] == "max_abs_diff")
    assert f["value"] == pytest.approx(5.0) and f["threshold"] == 1e-4 and f["op"] == "<="
    assert "max_abs_diff" in f["message"]
    loose = Gate(max_abs_diff=None, min_top1_agreement=0.0)
    assert loose.check(bad) == []
    drop = Gate(max_abs_diff=None, min_top1_agreement=None, max_accuracy_drop=0.1)
    assert [f["metric"] for f in drop.check(compare_outputs(REF, REF[:, ::-1].copy(), np.array([5, 0, 1])))] == [
        "accuracy_drop"
    ]


def test_raise_on_failure():
    bad = compare_outputs(REF, REF[:, ::-1].copy())
    failures = Gate().check(bad)
    results = {"backends": {"onnxruntime": {**bad, "passed": False, "failures": failures},
                            "torch": {**compare_outputs(REF, REF), "passed": True, "failures": []}}}
    with pytest.raises(GateFailed) as info:
        raise_on_failure(results)
    assert info.value.exit_code == 3
    assert {f["backend"] for f in info.value.failures} == {"onnxruntime"}
    assert len(info.value.failures) == 2
    message = str(info.value)
    assert message.startswith("parity gate failed for onnxruntime")
    assert "backend" in message and "max_abs_diff" in message and "<= 0.0001" in message
    raise_on_failure({"backends": {"torch": results["backends"]["torch"]}})  # passing: no raise


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

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


def test_verify_backends_arrays(exported):
    model, path, x, y = exported
    out = verify_backends(model, path, (x, y), backends=["ort", "torch"], samples=40, progress=False, batch_size=16)
    assert out["samples"] == 40
    assert set(out["backends"]) == {"onnxruntime", "torch"}  # aliases are canonicalised
    ort = out["backends"]["onnxruntime"]
    assert ort["passed"] is True and ort["failures"] == []
    assert ort["max_abs_diff"] <= 1e-4 and ort["top1_agreement"] == 1.0
    with torch.no_grad():
        expected = (model(torch.from_numpy(x[:40])).argmax(1).numpy() == y[:40]).mean()
    assert out["torch_accuracy"] == pytest.approx(expected)
    assert ort["accuracy"] == pytest.approx(expected)
    assert out["gate"]["max_abs_diff"] == 1e-4
    raise_on_failure(out)


def test_verify_backends_loader_and_dataset(exported):
    model, path, x, y = exported
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for source in (DataLoader(dataset, batch_size=7), dataset):
        out = verify_run(model, path, source, samples=20, progress=True)
        assert out["samples"] == 20 and out["backends"]["onnxruntime"]["passed"]
    no_labels = verify_backends(model, path, x, samples=5, progress=False)
    assert no_labels["torch_accuracy"] is None and "accuracy" not in no_labels["backends"]["onnxruntime"]


def test_verify_backends_detects_divergence(exported, monkeypatch):
    model, path, x, y = exported
    real = verify_mod.get_runner

    def skewed(name, **kwargs):
        runner = real(name, **kwargs)
        return lambda a: runner(a) + np.linspace(0, 1, 10, dtype=np.float32)

    monkeypatch.setattr(verify_mod, "get_runner", skewed)
    out = verify_backends(model, path, (x, y), samples=50, progress=False)
    result = out["backends"]["onnxruntime"]
    assert result["passed"] is False
    assert "max_abs_diff" in {f["metric"] for f in result["failures"]}
    with pytest.raises(GateFailed, match="onnxruntime"):
        raise_on_failure(out)


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
