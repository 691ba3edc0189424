"""The quantize stage: INT8 Q/DQ per consumer and FP16 ONNX, calibrated on training images,
verified against the FP32 student and timed beside it (cascadec/quantize/)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers.cli import invoke_cli, write_recipe
from onnx import numpy_helper

from cascadec.backends.onnxruntime_backend import OrtRunner, graph_precision
from cascadec.envinfo import x86_int8_dot
from cascadec.quantize.flavours import FLAVOURS, resolve_reduce_range
from cascadec.quantize.ptq import int8_kernel_count, ort_kernels
from cascadec.quantize.sensitivity import keep_in_float, rank_layers
from cascadec.recipe import QUANT_FLAVOURS, load_recipe
from cascadec.verify.compare import compare_outputs
from cascadec.verify.gates import DEFAULT_TOLERANCES


@pytest.fixture(scope="module")
def quantized(finished_run, tmp_path_factory):
    """A copy of the finished tiny run, quantized once with the CLI (INT8: both flavours + FP16).
    Also returns each ONNX Runtime session the stage opened: (file name, fused)."""
    path = tmp_path_factory.mktemp("quantized") / "run"
    shutil.copytree(finished_run.path, path)
    sessions: list[tuple[str, bool]] = []
    init = OrtRunner.__init__

    def recording(self, model_path, *args, **kwargs):
        init(self, model_path, *args, **kwargs)
        sessions.append((self.path.name, self.fused))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADEC_CACHE", str(finished_run.cache))
        mp.setenv("CASCADEC_NO_PROGRESS", "1")
        mp.setenv("COLUMNS", "120")
        mp.setattr(OrtRunner, "__init__", recording)
        result = invoke_cli("quantize", path)
    return path, result, sessions


def _zero_points(path) -> tuple[set[int], set[int]]:
    """Element types and values of the activation QuantizeLinear zero points in a Q/DQ graph."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    return {z.data_type for z in zps}, {int(v) for z in zps for v in numpy_helper.to_array(z).ravel()}


@pytest.mark.slow
def test_quantize_writes_one_verified_file_per_consumer(quantized):
    path, result, _ = quantized
    assert result.code == 0, result.err
    report = json.loads((path / "report.json").read_text())
    q = report["quantize"]
    assert set(q["artifacts"]) == {"int8-onnxruntime", "int8-tensorrt", "fp16"}
    for name, artifact in q["artifacts"].items():
        file = path / artifact["file"]
        onnx.checker.check_model(str(file))
        assert graph_precision(file) == artifact["precision"] == ("fp16" if name == "fp16" else "int8")
        assert q["parity"]["backends"][name]["precision"] == artifact["precision"]  # gated with its own tolerances
        assert q["parity"]["backends"][name]["passed"] is True
    assert graph_precision(path / "student.onnx") == "fp32"
    # the manifest records the library, the calibration data and the layers left in float
    assert q["library"]["onnxruntime"] and q["calibration"]["split"] == "train" and q["calibration"]["images"] > 0
    assert q["artifacts"]["int8-onnxruntime"]["graph"]["float_layers"] == []
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["status"] == "done"
    assert "## Quantization" in (path / "report.md").read_text()
    assert "int8-onnxruntime" in result.out and "CPU latency INT8" in result.out


def test_each_flavour_is_judged_as_its_consumer_computes(quantized):
    """ORT's flavour through ORT's fused int8 kernels; TensorRT's with ORT's graph optimisations
    off (Q/DQ in float, as TensorRT's int32 accumulation): on a CPU without VNNI the fused kernels
    saturate in int16, which TensorRT does not (docs/quantization.md)."""
    path, result, sessions = quantized
    assert result.code == 0, result.err
    opened = {name: {fused for n, fused in sessions if n == name} for name, _ in sessions}
    assert opened["student.int8.onnx"] == {True}
    assert opened["student.int8.trt.onnx"] == {False}  # every accuracy and the verify gate
    q = json.loads((path / "report.json").read_text())["quantize"]
    assert "graph optimisations off" in q["artifacts"]["int8-tensorrt"]["judged_on"]
    assert "fused" in q["artifacts"]["int8-onnxruntime"]["judged_on"]
    # reduce_range follows this CPU (auto) for ORT's flavour and never applies to TensorRT's
    assert q["calibration"]["reduce_range"] == resolve_reduce_range("auto")  # (the unit tests below force both)
    assert q["calibration"]["cpu_int8_dot"] == x86_int8_dot()
    assert q["artifacts"]["int8-onnxruntime"]["reduce_range"] == resolve_reduce_range("auto")
    assert q["artifacts"]["int8-tensorrt"]["reduce_range"] is False
    assert _max_int8_weight(path / "student.int8.trt.onnx") == 127
    assert _max_int8_weight(path / "student.int8.onnx") == (64 if resolve_reduce_range("auto") else 127)


def _max_int8_weight(path) -> int:
    """The largest |value| among the int8 initializers of rank >= 2 (the quantized weights)."""
    model = onnx.load(str(path))
    weights = [
        numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2
    ]
    assert weights
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


@pytest.mark.parametrize(
    "flavour,reduce_range,expected",
    [
        ("onnxruntime", False, 127),
        ("onnxruntime", True, 64),
        ("tensorrt", True, 127),  # TensorRT accumulates in int32: 7-bit weights would only cost accuracy
    ],
)
def test_reduce_range_gives_7_bit_weights_to_the_onnxruntime_flavour_only(tmp_path, flavour, reduce_range, expected):
    import torch

    from cascadec.backends.onnx_export import export_onnx
    from cascadec.quantize.ptq import prepare, quantize_int8

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 3),
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    export_onnx(model, x, tmp_path / "m.onnx")
    prepare(tmp_path / "m.onnx", tmp_path / "p.onnx")
    images = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    quantize_int8(tmp_path / "p.onnx", tmp_path / "q.onnx", FLAVOURS[flavour], images, reduce_range=reduce_range)
    assert _max_int8_weight(tmp_path / "q.onnx") == expected


@pytest.mark.parametrize(
    "setting, float_types", [("fp16", {onnx.TensorProto.FLOAT16}), ("fp32", {onnx.TensorProto.FLOAT})]
)
def test_the_tensorrt_flavours_float_parts_follow_the_recipe(tmp_path, setting, float_types):
    """``quantize.tensorrt_float``: FP16 by default, FP32 where a recipe asks; the outputs agree."""
    import torch

    from cascadec.backends.onnx_export import export_onnx
    from cascadec.quantize.ptq import prepare, quantize_int8
    from cascadec.quantize.stage import flavour_for
    from cascadec.recipe import QuantizeSection

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 3))
    export_onnx(model.eval(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    prepare(tmp_path / "m.onnx", tmp_path / "p.onnx")
    images = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    q = QuantizeSection(precision="int8", tensorrt_float=setting)
    assert flavour_for(q, "onnxruntime").float_dtype == "fp32"  # ORT's flavour keeps FP32 whatever the key
    graph = quantize_int8(tmp_path / "p.onnx", tmp_path / "q.onnx", flavour_for(q, "tensorrt"), images)
    assert graph["float_parts"] == setting
    model_q = onnx.load(str(tmp_path / "q.onnx"))
    floats = {i.data_type for i in model_q.graph.initializer} - {onnx.TensorProto.INT8, onnx.TensorProto.INT64}
    assert floats == float_types
    ref = OrtRunner(tmp_path / "m.onnx")(images[:4])
    assert np.abs(OrtRunner(tmp_path / "q.onnx", fused=False)(images[:4]) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize(
    "machine,flags,expected",
    [
        ("x86_64", "fpu sse4_1 avx2 avx512f avx512_vnni", "vnni"),
        ("x86_64", "fpu sse4_1 avx2 avx_vnni", "vnni"),
        ("x86_64", "fpu sse4_1 avx2 fma", "avx2"),
        ("x86_64", "fpu sse4_1", "sse"),
        ("x86_64", "", None),  # flags unreadable: unknown, and auto keeps 8-bit weights
        ("aarch64", "fp asimd asimddp", None),
    ],
)
def test_reduce_range_auto_follows_the_cpus_int8_dot_product(monkeypatch, machine, flags, expected):
    import cascadec.envinfo as envinfo

    monkeypatch.setattr(envinfo.platform, "machine", lambda: machine)
    monkeypatch.setattr(envinfo, "cpu_flags", lambda: frozenset(flags.split()))
    assert envinfo.x86_int8_dot() == expected
    assert resolve_reduce_range("auto") is (expected in ("avx2", "sse"))
    assert resolve_reduce_range(True) is True and resolve_reduce_range(False) is False


def test_onnxruntime_runner_can_run_each_node_on_its_own(quantized, tmp_path):
    import onnxruntime as ort

    path, _, _ = quantized  # ORT's flavour: FP32 around its Q/DQ, which ORT's CPU fusions take
    fused = OrtRunner(path / "student.int8.onnx")
    unfused = OrtRunner(path / "student.int8.onnx", fused=False)
    assert unfused.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert fused.session.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(0).standard_normal((4, *fused.static_input_shape())).astype(np.float32)
    assert np.abs(unfused(x) - fused(x)).max() < 0.5 * np.abs(fused(x)).max() + 1e-3  # the same graph, two ways
    # what each session runs: unfused, every Q/DQ on its own and the convolutions in float; fused,
    # ORT's int8 kernels (the same session options OrtRunner builds, with the graph written out)
    from cascadec.backends.onnxruntime_backend import _session_options

    ran = {}
    for fuse in (True, False):
        opts = _session_options(None, fuse)
        opts.optimized_model_filepath = str(tmp_path / f"ran.{fuse}.onnx")
        ort.InferenceSession(str(path / "student.int8.onnx"), opts, providers=["CPUExecutionProvider"])
        ran[fuse] = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert "QLinearConv" not in ran[False] and {"DequantizeLinear", "Conv"} <= ran[False]
    assert "QLinearConv" in ran[True]


def test_each_flavour_has_its_consumers_activation_type(quantized):
    path, _, _ = quantized
    types, values = _zero_points(path / FLAVOURS["tensorrt"].file)
    assert types == {onnx.TensorProto.INT8} and values == {0}  # TensorRT: signed, symmetric
    types, _ = _zero_points(path / FLAVOURS["onnxruntime"].file)
    assert types == {onnx.TensorProto.UINT8}  # ORT's VNNI kernels: unsigned activations
    # ONNX Runtime fuses the ORT flavour into int8 kernels rather than dequantize-then-float
    kernels = ort_kernels(path / FLAVOURS["onnxruntime"].file)
    assert kernels.get("QLinearConv", 0) > 0 and int8_kernel_count(kernels) > 0
    assert int8_kernel_count(ort_kernels(path / "student.onnx")) == 0


def test_the_tensorrt_flavour_is_int8_with_fp16_elsewhere_and_float_biases(quantized):
    """What a strongly typed TensorRT network needs: DequantizeLinear of int8 only (its parser takes
    no int32 bias), FP16 scales and float parts (ModelOpt's high_precision_dtype fp16), opset 19
    for the FP16 scales, float32 at the edges; ONNX Runtime's flavour keeps FP32 elsewhere."""
    path, _, _ = quantized
    model = onnx.load(str(path / FLAVOURS["tensorrt"].file))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert dq and q
    assert {inits[n.input[0]].data_type for n in dq if n.input[0] in inits} == {onnx.TensorProto.INT8}
    assert {inits[n.input[1]].data_type for n in dq + q} == {onnx.TensorProto.FLOAT16}
    floats = {i.data_type for i in model.graph.initializer} - {onnx.TensorProto.INT8, onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}  # no FP32 weight, bias or scale left
    edges = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in edges} == {onnx.TensorProto.FLOAT}
    ort = onnx.load(str(path / FLAVOURS["onnxruntime"].file))
    assert onnx.TensorProto.FLOAT16 not in {i.data_type for i in ort.graph.initializer}


def test_quantized_outputs_stay_close_to_fp32(quantized):
    path, _, _ = quantized
    x = np.random.default_rng(0).standard_normal((4, *OrtRunner(path / "student.onnx").static_input_shape()))
    ref = OrtRunner(path / "student.onnx")(x.astype(np.float32))
    for file in ("student.int8.onnx", "student.int8.trt.onnx", "student.fp16.onnx"):
        out = OrtRunner(path / file)(x.astype(np.float32))
        assert out.shape == ref.shape and out.dtype == np.float32  # inputs and outputs stay float32
        assert np.abs(out - ref).max() < 0.5 * np.abs(ref).max() + 1e-3


def test_quantize_reports_pruning_quantization_and_combined_speedups(quantized):
    path, _, _ = quantized
    lat = json.loads((path / "report.json").read_text())["quantize"]["latency"]
    assert set(lat["speedup"]) == {"pruning", "quantization", "combined"}
    for b, combined in lat["speedup"]["combined"].items():
        assert combined == pytest.approx(lat["teacher"][b]["p50_ms"] / lat["student_int8"][b]["p50_ms"])
    assert lat["protocol"]["rounds"] >= 1


def test_exclude_keeps_a_layer_in_float_and_calibrates_on_training_images(copy_run, cli, finished_run, monkeypatch):
    import cascadec.quantize.stage as stage

    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    seen = []
    real = stage.sample_images

    def spy(dataset, count, **kw):
        seen.append(dataset)
        return real(dataset, count, **kw)

    monkeypatch.setattr(stage, "sample_images", spy)
    built = []
    import cascadec.commands as commands

    real_data = commands.load_data

    def load(recipe):
        bundle = real_data(recipe)
        built.append(bundle)
        return bundle

    monkeypatch.setattr(commands, "load_data", load)
    run = copy_run()
    r = cli(
        "quantize", run, "--no-profile", "--set", "quantize.exclude=[conv1]", "--set", "quantize.flavours=[onnxruntime]"
    )
    assert r.code == 0, r.err
    q = json.loads((run / "report.json").read_text())["quantize"]
    assert q["artifacts"]["int8-onnxruntime"]["graph"]["float_layers"] == ["conv1"]
    assert "int8-tensorrt" not in q["artifacts"] and q["latency"] is None
    assert seen and all(d is built[0].train for d in seen)  # never the test split
    assert "kept in float: conv1" in " ".join(r.out.split())


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--precision", "int4"], "--precision"),
        (["--set", "quantize.exclude=[no_such_layer]"], "quantize.exclude"),
        (["--set", "quantize.flavours=[openvino]"], "quantize.flavours"),
        (["--set", "prune.round_to=8"], "cannot apply to a finished run"),
    ],
)
def test_bad_quantize_input_exits_2_with_one_line(args, expected, copy_run, cli, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    r = cli("quantize", copy_run(), "--no-profile", *args)
    assert r.code == 2
    assert len(r.err_lines) == 1 and expected in r.err and "Traceback" not in r.err


@pytest.mark.slow
def test_a_failed_int8_gate_exits_3_and_names_the_file(copy_run, cli, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    run = copy_run()
    r = cli(
        "quantize",
        run,
        "--no-profile",
        "--set",
        "quantize.flavours=[onnxruntime]",
        "--set",
        "verify.tolerances.int8.atol=0",
        "--set",
        "verify.tolerances.int8.rtol=0",
    )
    assert r.code == 3
    assert "quantize: parity gate failed for int8-onnxruntime" in r.err
    line = next(x for x in r.err_lines if x.startswith("most sensitive layers (int8-onnxruntime"))
    assert "node_" not in line  # named by PyTorch module, not by ONNX node
    q = json.loads((run / "report.json").read_text())["quantize"]
    assert q["passed"] is False
    sens = q["artifacts"]["int8-onnxruntime"]["sensitivity"]
    assert sens["reason"] == "verify gate failed" and sens["kept_in_float"] == []  # named, nothing changed
    assert len(sens["sensitivity"]) == q["artifacts"]["int8-onnxruntime"]["graph"]["int8_layers"]


def test_ties_in_the_reference_are_not_disagreements():
    ref = np.array([[1.0, 1.0 + 5e-8, 0.0], [3.0, 0.0, 1.0], [0.0, 2.0, 2.5]])
    cand = np.array([[1.0 + 5e-8, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 2.6, 2.5]])
    strict = compare_outputs(ref, cand)
    assert strict["top1_agreement"] == pytest.approx(1 / 3)
    tied = compare_outputs(ref, cand, tie_tolerance=DEFAULT_TOLERANCES["fp32"])
    # row 0 is a tie (margin 5e-8); row 2 flips a 0.5 margin: a real disagreement
    assert tied["top1_agreement"] == pytest.approx(2 / 3) and tied["top1_ties"] == 1


def test_sensitivity_returns_the_most_sensitive_layers_to_float_until_the_budget_holds():
    nodes = [{"node": f"n{i}", "module": f"m{i}"} for i in range(4)]
    alone = {"n0": 0.001, "n1": 0.03, "n2": 0.0, "n3": 0.01}  # accuracy lost with one layer quantized

    def accuracy_with(only):
        return 0.9 - alone[only[0]]

    def accuracy_excluding(excluded):
        return 0.9 - sum(v for k, v in alone.items() if k not in excluded)

    ranked = rank_layers(nodes, 0.9, accuracy_with)
    assert [r["module"] for r in ranked] == ["m1", "m3", "m0", "m2"]
    kept = keep_in_float(ranked, 0.9, 0.005, accuracy_excluding, max_layers=8)
    assert [k["module"] for k in kept.kept] == ["m1", "m3"] and kept.met
    capped = keep_in_float(ranked, 0.9, 0.0, accuracy_excluding, max_layers=1)
    assert [k["module"] for k in capped.kept] == ["m1"] and not capped.met


@pytest.mark.slow
def test_compress_runs_the_quantize_stage_when_the_recipe_asks(tmp_path, finished_run, monkeypatch):
    recipe = write_recipe(
        tmp_path / "q.yaml",
        quantize={"precision": "fp16"},
        profile={"batches": [1], "duration_s": 0.02, "warmup_s": 0.0, "min_iters": 2, "rounds": 1},
    )
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    monkeypatch.setenv("CASCADEC_NO_PROGRESS", "1")
    monkeypatch.setenv("COLUMNS", "120")
    r = invoke_cli("compress", "cifar_resnet8", "--recipe", recipe, "--out", tmp_path / "run")
    assert r.code == 0, r.err
    q = json.loads((tmp_path / "run" / "report.json").read_text())["quantize"]
    assert list(q["artifacts"]) == ["fp16"] and q["latency"] is None  # FP16 alone: no int8 graph to time
    assert "Accuracy fp16" in r.out


def test_recipe_quantize_section_is_validated():
    with pytest.raises(Exception, match="quantize.precision"):
        load_recipe("fmnist_quick", ["quantize.precision=int4"])
    assert load_recipe("fmnist_cap_kd").quantize.precision == "none"  # off unless a recipe asks
    assert load_recipe("fmnist_quick").quantize.precision == "int8"  # the demo shows it
    assert tuple(FLAVOURS) == QUANT_FLAVOURS


def test_batchnorm_folding_keeps_the_function_and_fake_quant_comes_off_cleanly():
    import torch

    from cascadec.models import create_model
    from cascadec.quantize.fake_quant import COMPUTE, FakeQuant, calibrate_ranges, fold_batchnorm

    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    for m in model.modules():  # non-trivial statistics, so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model, x[:2]) == 9
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert torch.allclose(model(x), ref, atol=1e-5)
    names = [n for n, m in model.named_modules() if isinstance(m, COMPUTE)]
    quant = FakeQuant(model, calibrate_ranges(model, x.numpy(), names), signed=True)
    out = model(x)
    assert not torch.allclose(out, ref, atol=1e-6) and torch.allclose(out, ref, atol=0.5)  # quantized, close
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # straight-through gradients reach every weight
    quant.remove()
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model.modules() if isinstance(m, COMPUTE))


@pytest.mark.parametrize("levels", [127, 64])
def test_qat_fake_quantizes_weights_on_the_exports_grid(levels):
    """QAT trains on the grid the export quantizes to: [-127, 127], or [-64, 64] with reduce_range."""
    import torch

    from cascadec.quantize.fake_quant import ActivationRange, FakeQuant

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
    quant = FakeQuant(torch.nn.Sequential(conv), {"0": ActivationRange(-1.0, 1.0)}, signed=True, weight_levels=levels)
    torch.nn.Sequential(conv)(torch.randn(1, 2, 5, 5))
    quant.remove()
    w, q = conv.weight.detach(), seen[0]
    scale = w.abs().flatten(1).amax(dim=1) / levels
    steps = q / scale.view(-1, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the grid
    assert steps.abs().amax().round() == levels  # and using all of it


@pytest.mark.slow
def test_qat_runs_when_asked_and_the_better_file_ships(copy_run, cli, finished_run, monkeypatch):
    monkeypatch.setenv("CASCADEC_CACHE", str(finished_run.cache))
    run = copy_run()
    r = cli("quantize", run, "--no-profile", "--set", "quantize.flavours=[onnxruntime]", "--set", "quantize.qat=always")
    assert r.code == 0, r.err
    a = json.loads((run / "report.json").read_text())["quantize"]["artifacts"]["int8-onnxruntime"]
    qat = a["qat"]
    assert qat["folded_batchnorms"] > 0 and qat["fake_quantized_layers"] > 0 and qat["train"][0]["loss"] > 0
    best = max(qat["qat_selection_accuracy"], qat["ptq_selection_accuracy"])
    assert a["selection_accuracy"] == best
    assert qat["shipped"] == ("qat" if qat["qat_selection_accuracy"] > qat["ptq_selection_accuracy"] else "ptq")
    assert graph_precision(run / "student.int8.onnx") == "int8"
    assert "QAT + KD" in (run / "report.md").read_text()
    assert not list(run.glob("checkpoints/qat.*"))  # the flavour finished: its QAT checkpoint is gone
