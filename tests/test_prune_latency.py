"""cascadec.prune.latency: the latency table, the latency model, latency targets in the solver,
the recipe, the refusal of backends this machine lacks, and predicted against measured.

Most tests time layers with a fake timer (a known function of the widths), so they check the
mechanics exactly; one runs ONNX Runtime on a tiny network end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from helpers.fake_latency import fake_ms
from helpers.nets import Chain

from cascadec.errors import UserError
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import build_groups
from cascadec.prune.latency import LatencyModel
from cascadec.prune.latency_table import LatencyTable, LayerTable, build_table, layer_configs, layer_onnx, width_grid
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.recipe import Recipe, TargetSection

EX = torch.zeros(1, 1, 16, 16)


class CountingTimer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, graph: bytes, x_shape: tuple[int, ...]) -> float:
        self.calls += 1
        return fake_ms(graph, x_shape)


@pytest.fixture
def chain(isolated_cache):
    torch.manual_seed(0)
    model = Chain().eval()
    index = build_groups(model, EX)
    cost = CostModel.build(model, index, EX)
    return model, index, cost


def test_width_grid_is_multiples_up_to_the_full_width() -> None:
    assert width_grid(64, 4) == [8, 16, 32, 48, 64]
    assert width_grid(100, 4) == [8, 24, 48, 72, 100]
    assert width_grid(960, 4, 16) == [16, 240, 480, 720, 960]  # the narrowest rounded width is timed
    assert width_grid(8, 4) == [4, 8]
    assert width_grid(1, 4) == [1]
    # a staircase backend's half block is timed too: the one width below the block a target keeps
    assert width_grid(960, 4, 16, narrow=8) == [8, 16, 240, 480, 720, 960]
    assert width_grid(16, 4, 16, narrow=8) == [8, 16]
    assert width_grid(12, 4, 16, narrow=8) == [6, 8, 12]
    assert width_grid(8, 4, 16, narrow=8) == [4, 8]  # never past the full width
    assert width_grid(64, 1, 16, narrow=8) == [64]  # one point: the full width only


def test_bilinear_table_is_exact_at_grid_points_and_linear_between() -> None:
    config = layer_configs(Chain().eval(), EX)["conv2"]
    table = LayerTable(config, [4, 8], [6, 12], [[1.0, 2.0], [3.0, 4.0]])
    assert table.at(4, 6) == 1.0 and table.at(8, 12) == 4.0
    assert table.at(6, 9) == pytest.approx(2.5)
    assert table.at(2, 3) == 1.0  # below the grid: the smallest width's time, never less


def test_layer_graph_is_a_valid_onnx_conv_at_the_asked_widths() -> None:
    config = layer_configs(Chain().eval(), EX)["conv2"]
    graph, x_shape = layer_onnx(config, 5, 7, batch=3)
    model = onnx.load_from_string(graph)
    onnx.checker.check_model(model)
    assert x_shape == (3, 5, *config.input_hw)
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).shape[:2] == (7, 5)


def test_table_is_cached_per_machine_and_reused(chain, isolated_cache) -> None:
    model, _, cost = chain
    timer = CountingTimer()
    first = build_table(model, EX, cost=cost, timer=timer, network_ms=lambda: 1.0)
    measured = timer.calls
    assert measured > 0 and not first.cached
    second = build_table(model, EX, cost=cost, timer=timer, network_ms=lambda: 1.0)
    assert timer.calls == measured and second.cached  # nothing timed again
    assert json.loads(json.dumps(second.to_json()["tables"])) == json.loads(json.dumps(first.to_json()["tables"]))
    # a damaged entry is measured again and replaced
    (entry,) = (isolated_cache / "latency").glob("*.json")
    entry.write_text("{not json")
    third = build_table(model, EX, cost=cost, timer=timer, network_ms=lambda: 1.0)
    assert not third.cached and timer.calls == 2 * measured
    assert json.loads(entry.read_text())["layers"] == first.layers


def test_only_axes_a_group_reaches_get_a_grid(chain) -> None:
    model, _, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, use_cache=False)
    grids = {name: table.tables[key] for name, key in table.layers.items()}
    assert len(grids["conv1"].in_grid) == 1  # the image's channel: never pruned
    assert len(grids["conv1"].out_grid) == 1  # conv1's outputs: frozen (the first conv)
    assert len(grids["conv2"].in_grid) == 1 and len(grids["conv2"].out_grid) > 1
    assert len(grids["fc"].out_grid) == 1  # the classifier's outputs


def test_prediction_is_the_network_scaled_sum_of_its_layers(chain) -> None:
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    latency = LatencyModel(table, cost)
    full = torch.ones(index.num_units)
    assert latency.predict(full) == pytest.approx(0.5)  # calibrated on the measured network
    keep = full.clone()
    keep[: index.groups[0].size // 2] = 0.0  # half of conv2's outputs
    kin, kout = cost._kept(keep)
    direct = sum(table.layer_ms(n, ci, co) for n, ci, co in zip(cost.layer_names, kin.tolist(), kout.tolist()))
    assert latency.predict(keep) == pytest.approx(direct * latency.scale)
    assert latency.predict(keep) < latency.predict(full)


def test_solver_meets_a_latency_budget_and_ranks_by_importance_per_millisecond(chain) -> None:
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    cost.latency = LatencyModel(table, cost, ranking="per_ms")
    budget = Budget.from_target(cost, latency_reduction=0.4)
    assert budget.metric == "latency" and budget.value == pytest.approx(0.6 * 0.5)
    keep = MaskSolver(index, cost).solve(torch.ones(index.num_units), budget)
    assert cost.metric("latency", keep) <= budget.value
    # equal importance: the units that cost more milliseconds go first
    weights = cost.latency.unit_weights()
    assert weights.min() > 0
    dropped, kept = weights[keep < 0.5], weights[keep > 0.5]
    assert dropped.mean() >= kept.mean()
    absolute = Budget.from_target(cost, latency_ms=0.25)
    assert absolute.keep_fraction == pytest.approx(0.5)
    with pytest.raises(UserError, match="already takes"):
        Budget.from_target(cost, latency_ms=0.9)


def test_ms_per_flop_ranking_is_the_flops_solvers_where_time_follows_flops(chain) -> None:
    """fake_ms is proportional to MACs: every unit costs the same milliseconds per FLOP, so the
    default ranking leaves importance alone and a latency budget picks exactly the student a
    FLOPs budget of the same latency picks (the FLOPs solver ranks by importance alone)."""
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    cost.latency = LatencyModel(table, cost)
    assert cost.latency.ranking == "per_ms_per_flop"
    assert torch.allclose(cost.latency.unit_weights(), torch.ones(index.num_units), atol=1e-5)
    scores = torch.rand(index.num_units, generator=torch.Generator().manual_seed(1))
    solver = MaskSolver(index, cost, round_to=table.multiple)  # as compress rounds a latency target
    by_flops = solver.solve(scores, Budget.from_target(cost, flops_reduction=0.5))
    same_ms = 1 - cost.latency.predict(by_flops) / cost.latency.base_ms
    by_latency = solver.solve(scores, Budget.from_target(cost, latency_reduction=same_ms))
    assert torch.equal(by_latency, by_flops)
    # per_ms would not: it divides by milliseconds, which here are FLOPs
    cost.latency.ranking = "per_ms"
    assert cost.latency.unit_weights().std() > 0.1
    cost.latency.ranking = "importance"
    assert torch.equal(cost.latency.unit_weights(), torch.ones(index.num_units))
    with pytest.raises(ValueError, match="ranking"):
        cost.latency.ranking = "fastest"


@pytest.fixture
def mixed(isolated_cache):
    """MixedNet: a depthwise conv coupled with the pointwise conv before it, plus plain convs
    and linear layers."""
    from helpers.nets import MixedNet

    torch.manual_seed(0)
    model = MixedNet().eval()
    index = build_groups(model, EX)
    return model, index, CostModel.build(model, index, EX)


def slow_depthwise_ms(graph: bytes, x_shape: tuple[int, ...]) -> float:
    """fake_ms on a backend where depthwise convs take 4x the time per MAC of everything else
    (as MobileNetV2's do on this CPU: docs/benchmarks.md)."""
    ms = fake_ms(graph, x_shape)
    initializers = onnx.load_from_string(graph).graph.initializer
    shape = tuple(initializers[0].dims) if initializers else ()
    depthwise = len(shape) == 4 and shape[1] == 1 and len(x_shape) == 4 and x_shape[1] == shape[0] > 1
    return ms * 4 if depthwise else ms


def test_ms_per_flop_ranking_drops_the_slow_layers_flops_first(mixed) -> None:
    """Depthwise convs 4x slower per MAC: with equal importance, the units of the group that
    reaches the depthwise conv weigh most, and at the same latency the student keeps more FLOPs
    than the FLOPs target and at least as many as per_ms (which only sees milliseconds)."""
    model, index, cost = mixed
    table = build_table(model, EX, cost=cost, timer=slow_depthwise_ms, network_ms=lambda: 0.5, use_cache=False)
    cost.latency = LatencyModel(table, cost)
    weights = cost.latency.unit_weights()

    def touches(layer: str) -> torch.Tensor:
        row = cost.layer_names.index(layer)
        return (cost.a_in[row] + cost.a_out[row]) > 0

    # fake_ms times a layer by its input size, so the stride-2 conv3 is slow per MAC too
    plain = ~touches("dw") & ~touches("conv3")
    assert touches("dw").any() and plain.any()
    assert weights[touches("dw")].min() > 2 * weights[plain].max()
    ones = torch.ones(index.num_units)
    solver = MaskSolver(index, cost, round_to=4)  # MixedNet's groups are 12-20 wide: finer than 8
    by_flops = solver.solve(ones, Budget.from_target(cost, flops_reduction=0.3))
    same_ms = 1 - cost.latency.predict(by_flops) / cost.latency.base_ms
    kept = {}
    for ranking in ("per_ms_per_flop", "per_ms"):
        cost.latency.ranking = ranking
        keep = solver.solve(ones, Budget.from_target(cost, latency_reduction=same_ms))
        assert cost.latency.predict(keep) <= cost.latency.predict(by_flops) * (1 + 1e-9)
        kept[ranking] = cost.macs(keep)
    assert kept["per_ms_per_flop"] > cost.macs(by_flops)
    assert kept["per_ms_per_flop"] >= kept["per_ms"]


def test_unit_macs_are_what_removing_one_unit_saves(chain, mixed) -> None:
    """Every unit, on a chain and on a network with a depthwise conv, a biased conv and linear
    layers."""
    for _, index, cost in (chain, mixed):
        full = torch.ones(index.num_units)
        for u in range(index.num_units):
            one_less = full.clone()
            one_less[u] = 0
            assert cost.unit_macs()[u] == pytest.approx(cost.macs(full) - cost.macs(one_less))


def test_latency_target_without_a_table_is_refused(chain) -> None:
    _, _, cost = chain
    with pytest.raises(UserError, match="latency table"):
        Budget.from_target(cost, latency_reduction=0.5)


def test_recipe_latency_target() -> None:
    target = TargetSection(latency_reduction=0.5)
    assert target.is_latency and target.describe() == "2x lower latency"
    assert TargetSection(latency_ms=3.0).describe() == "3 ms latency"
    with pytest.raises(ValueError, match="exactly one"):
        TargetSection(latency_reduction=0.5, flops_reduction=0.5)
    recipe = Recipe.model_validate(
        {"name": "r", "model": {"name": "cifar_resnet8"}, "prune": {"target": {"latency_reduction": 0.3}}}
    )
    assert recipe.prune.latency.backend == "onnxruntime" and recipe.prune.latency.batch == 1
    with pytest.raises(ValueError):
        Recipe.model_validate({"name": "r", "model": {"name": "m"}, "prune": {"latency": {"backend": "tensorrt"}}})


def test_backends_without_a_table_or_missing_here_are_refused(chain) -> None:
    model, _, cost = chain
    with pytest.raises(UserError, match="not supported"):
        build_table(model, EX, cost=cost, backend="tensorrt", timer=fake_ms)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        from cascadec.prune.latency import attach_latency_model

        with pytest.raises(UserError):
            attach_latency_model(model, EX, cost, backend="onnxruntime-cuda", batch=1, grid_points=2, threads=1)


def test_table_round_trips_through_json(chain) -> None:
    model, _, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    again = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    for name in table.layers:
        assert again.layer_ms(name, 3.5, 5.0) == pytest.approx(table.layer_ms(name, 3.5, 5.0))
    assert again.summary()["layers"] == table.summary()["layers"]


class _Run:
    """The two manifest entries check_latency_target reads, and what it records."""

    def __init__(self, predicted: dict, profiled: dict) -> None:
        self.metrics = {"prune.latency": predicted, "latency.onnxruntime": profiled}

    def metric(self, key, default=None):
        return self.metrics.get(key, default)

    def record(self, key, value):
        self.metrics[key] = value


@pytest.mark.parametrize("measured, tolerance, passed", [(1.9, 0.1, True), (1.7, 0.1, False), (1.7, None, True)])
def test_latency_gate_compares_measured_speedup_with_the_target(measured, tolerance, passed) -> None:
    from cascadec.stages import check_latency_target

    recipe = Recipe.model_validate(
        {
            "name": "r",
            "model": {"name": "cifar_resnet8"},
            "prune": {"target": {"latency_reduction": 0.5}, "latency": {"tolerance": tolerance}},
        }
    )
    run = _Run(
        {"predicted_ms": 5.0, "predicted_speedup": 2.0, "target_speedup": 2.0},
        {"student": {"1": {"p50_ms": 10.0 / measured}}, "speedup": {"1": measured}},
    )
    out = check_latency_target(run, recipe)
    assert out["passed"] is passed and run.metrics["latency_target"] is out
    assert out["measured_speedup"] == measured
    assert out["prediction_error"] == pytest.approx((10.0 / measured) / 5.0 - 1)
    assert ("short" in out["message"]) is (not passed)


@pytest.mark.slow
def test_inspect_latency_on_onnx_runtime(isolated_cache, cli) -> None:
    """The real backend: the table is built once, then loaded; the dry run predicts the student;
    where the time goes against the FLOPs is shown per layer kind and input size."""
    from cascadec.preflight import inspect_model

    first = inspect_model("cifar_resnet8", in_channels=1, image_size=16, num_classes=10, latency_backend="onnxruntime")
    lat = first["latency"]
    assert not lat["cached"] and lat["network_ms"] > 0 and lat["grid_points"] > lat["layers"]
    second = inspect_model("cifar_resnet8", in_channels=1, image_size=16, num_classes=10, latency_backend="onnxruntime")
    assert second["latency"]["cached"]
    rows = second["latency"]["time_per_flop"]
    assert sum(r["layers"] for r in rows) == lat["layers"]
    assert sum(r["time_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["flops_share"] for r in rows) == pytest.approx(1.0)
    assert {"conv 3x3", "linear"} <= {r["kind"] for r in rows}
    shown = cli("inspect", "cifar_resnet8", "--in-channels", "1", "--image-size", "16", "--latency")
    assert shown.code == 0 and "where the time goes" in shown.out and "conv 3x3" in shown.out


def test_time_per_flop_groups_layers_and_finds_the_slow_ones(chain) -> None:
    """fake_ms: time proportional to MACs plus a small cost per call, so the convs (all 3x3 at
    16x16: one row) run at about the network's time per FLOP and the tiny linear layer, all call
    cost, far above it."""
    from cascadec.prune.latency import time_per_flop

    model, index, cost = chain
    latency = LatencyModel(build_table(model, EX, cost=cost, timer=fake_ms, use_cache=False), cost)
    rows = {r["kind"]: r for r in time_per_flop(latency)}
    assert set(rows) == {"conv 3x3", "linear"} and rows["conv 3x3"]["layers"] == 3
    assert rows["conv 3x3"]["time_per_flop"] == pytest.approx(1.0, abs=0.05)
    assert rows["linear"]["time_per_flop"] > 3
    assert rows["conv 3x3"]["input"] == "16x16" and rows["linear"]["input"] == "-"


@pytest.mark.slow
def test_compress_with_a_latency_target_reports_predicted_and_measured(
    tiny_recipe, tmp_path, cli, isolated_cache
) -> None:
    """End to end on ONNX Runtime: the prune stage predicts, profile measures at the target's
    batch, the report sets them side by side; a tolerance of 0 on a target the measurement misses
    fails the check."""

    def compress(out, reduction: float, tolerance: str):
        return cli(
            "compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out,
            "--set", "prune.target.flops_reduction=null", "--set", f"prune.target.latency_reduction={reduction}",
            "--set", "prune.latency.batch=2", "--set", f"prune.latency.tolerance={tolerance}",
            "--set", "prune.latency.grid_points=2", "--set", "prune.latency.refine=2",  # keep this test short
        )  # fmt: skip

    out = tmp_path / "run"
    result = compress(out, 0.1, "null")
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    check = report["latency_target"]
    assert check["batch"] == 2 and check["passed"] and check["tolerance"] is None
    assert check["target_speedup"] == pytest.approx(1 / 0.9)
    assert check["measured_ms"] > 0 and check["predicted_ms"] > 0
    assert report["latency_prediction"]["table"]["layers"] > 0
    assert "2" in report["latency"]["onnxruntime"]["student"]  # the target's batch was profiled
    markdown = (out / "report.md").read_text()
    assert "## Latency target (onnxruntime, batch 2)" in markdown
    tries = report["prune"]["latency_refine"]  # the cascade measured its student before the freeze
    assert 1 <= len(tries) <= 2 and sum(t["chosen"] for t in tries) == 1
    assert all(t["measured_speedup"] > 0 for t in tries) and "prune.latency.refine" in markdown
    assert report["latency_prediction"]["ranking"] == "per_ms_per_flop"
    assert "ranked by importance per millisecond per FLOP" in markdown

    # the same measurement against a target twice what it delivered, with no tolerance: the check
    # fails (and compress raises GateFailed on it, exit 3). Judged on the stored rounds, not on a
    # second run, so the outcome cannot depend on how fast this machine happens to be
    from cascadec.recipe import with_values
    from cascadec.run import RunDir
    from cascadec.stages import check_latency_target

    with RunDir.open(out) as run:
        strict = with_values(run.recipe(), {"prune.latency.tolerance": 0}, "test")
        run.manifest["metrics"]["prune.latency"]["target_speedup"] = 2 * check["measured_speedup"]
        failed = check_latency_target(run, strict)
    assert failed is not None and not failed["passed"] and failed["shortfall"] == pytest.approx(0.5)
    assert "50% short, more than the tolerance 0% (prune.latency.tolerance)" in failed["message"]


def test_packed_prediction_equals_the_tables_layer_by_layer(chain) -> None:
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, use_cache=False)
    latency = LatencyModel(table, cost)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        keep = (torch.rand(index.num_units, generator=gen) < 0.5).float()
        kin, kout = cost._kept(keep)
        direct = sum(table.layer_ms(n, ci, co) for n, ci, co in zip(cost.layer_names, kin.tolist(), kout.tolist()))
        assert latency.predict(keep) == pytest.approx(direct * latency.scale)


@pytest.mark.parametrize(
    "backend, message", [("tensorrt", "not supported"), ("trt", "not supported"), ("foo", "unknown backend")]
)
def test_inspect_latency_on_a_backend_without_tables_exits_2(cli, backend, message) -> None:
    result = cli(
        "inspect", "cifar_resnet8", "--in-channels", "1", "--image-size", "16", "--latency", "--backend", backend
    )
    assert result.code == 2 and message in result.err and "Traceback" not in result.err


# --------------------------------------------------------------------------- channel block and measured re-solves


@pytest.mark.parametrize("block", [8, 16, 32])
def test_channel_block_reads_a_staircase(block) -> None:
    from cascadec.prune.latency_table import PROBE_WIDTHS, channel_block

    assert channel_block([0.1 + 0.01 * math.ceil(w / block) * block for w in PROBE_WIDTHS]) == block


def test_channel_block_of_smooth_or_flat_latency_is_1() -> None:
    from cascadec.prune.latency_table import PROBE_WIDTHS, channel_block

    assert channel_block([0.05 + 0.01 * w for w in PROBE_WIDTHS]) == 1
    assert channel_block([1.0] * len(PROBE_WIDTHS)) == 1
    assert channel_block([1.0, float("nan")] + [1.0] * (len(PROBE_WIDTHS) - 2)) == 1


def test_channel_block_of_uneven_noisy_steps() -> None:
    """The probe as measured on this project's AVX-512 CPU (ONNX Runtime 1.32, batch 1): steps
    of 37, 34, 53 and 3 % after 32, 48, 64 and 80 channels, up to 7 % noise within a block."""
    from cascadec.prune.latency_table import channel_block

    ms = [0.38, 0.522, 0.542, 0.542, 0.544, 0.728, 0.681, 0.685, 0.671, 1.027, 1.031, 1.003, 1.038, 1.059]
    ms += [1.057, 1.053, 1.089]
    assert channel_block(ms) == 16


def stair_ms(graph: bytes, x_shape: tuple[int, ...]) -> float:
    """fake_ms on a backend that pads every conv's output channels to 16."""
    model = onnx.load_from_string(graph)
    if not model.graph.initializer:
        return 0.0005
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    cout = weight.shape[0]
    spatial = int(np.prod(x_shape[2:])) if len(x_shape) > 2 else 1
    return 1e-6 * weight.size / cout * math.ceil(cout / 16) * 16 * spatial + 0.001


def test_table_probes_the_block_and_grids_at_its_multiples(chain) -> None:
    model, _, cost = chain
    table = build_table(model, EX, cost=cost, timer=stair_ms, network_ms=lambda: 0.5, use_cache=False)
    assert table.channel_block == 16 and table.multiple == 16 and len(table.probe_ms) > 0
    for t in table.tables.values():
        for grid, full in ((t.in_grid, t.config.in_channels), (t.out_grid, t.config.out_channels)):
            assert all(w % 16 == 0 or w == full or full <= 16 for w in grid)
    smooth = build_table(model, EX, cost=cost, timer=fake_ms, use_cache=False)
    assert smooth.channel_block == 1 and smooth.multiple == 8  # smooth: the old default rounding
    fixed = build_table(model, EX, cost=cost, timer=stair_ms, multiple=8, use_cache=False)
    assert fixed.probe_ms == [] and fixed.channel_block == 8 and fixed.multiple == 8  # no probe
    # the half block is timed where the block was probed, not where the recipe fixed a multiple
    assert table.narrow == 8 and smooth.narrow == 0 and fixed.narrow == 0
    conv3 = table.tables[table.layers["conv3"]]
    assert 8 in conv3.out_grid and table.summary()["narrow"] == 8
    again = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert (again.channel_block, again.multiple, again.narrow, again.probe_ms) == (16, 16, 8, table.probe_ms)


def test_prediction_rounds_widths_up_to_the_block(chain) -> None:
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=stair_ms, network_ms=lambda: 0.5, use_cache=False)
    latency = LatencyModel(table, cost)
    widths = torch.tensor([50.0, 3.0, 70.0, 12.0, 9.0, 8.0])
    padded = latency._padded(widths, torch.tensor([64.0, 64.0, 72.0, 12.0, 64.0, 64.0]))
    # never past the layer's own width; up to the half block, that half (timed on its own)
    assert padded.tolist() == [64.0, 8.0, 72.0, 12.0, 16.0, 8.0]
    table.narrow = 0  # a table without the half block (a fixed multiple): the block is the floor
    assert latency._padded(torch.tensor([3.0]), torch.tensor([64.0])).tolist() == [16.0]
    table.narrow = 8
    # conv3 (16 outputs) keeps 9..16 channels: one block, one latency
    group = next(i for i, g in enumerate(index.groups) if g.size == 16)
    offset = index.offsets()[group]
    keep = torch.ones(index.num_units)
    predictions = []
    for kept in (16, 12, 9):
        keep[offset : offset + 16] = (torch.arange(16) < kept).float()
        predictions.append(latency.predict(keep))
    assert predictions[0] == pytest.approx(predictions[1]) == pytest.approx(predictions[2])


def test_latency_solver_keeps_the_half_block_below_the_block(chain) -> None:
    """On a 16-channel staircase a group 16 wide could not be narrowed at all (the Fashion-MNIST
    ResNet-8's layer1): the half block is the one width below the block a latency target keeps,
    priced by its own grid point, and the solver only narrows to it where the table says it pays."""
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=stair_ms, network_ms=lambda: 0.5, use_cache=False)
    cost.latency = LatencyModel(table, cost)
    sizes = [g.size for g in index.groups]
    assert sorted(sizes) == [12, 16]
    blocks = MaskSolver(index, cost, round_to=16)
    halves = MaskSolver(index, cost, round_to=16, narrow=table.narrow)
    one = torch.ones(len(sizes), dtype=torch.long)
    assert halves.widths(one).tolist() == [8, 8] and blocks.widths(one).tolist() == sizes
    assert halves.widths(one * 9).tolist() == [min(16, s) for s in sizes]  # past the half: the block
    assert halves.narrowest == 8 and blocks.narrowest == 16
    # the narrowest network the blocks allow is the full one: any latency target is refused
    budget = Budget.from_target(cost, latency_reduction=0.15)  # the halves' narrowest: 0.81
    with pytest.raises(UserError, match="keeping 12-16 channel"):  # the 12-wide group whole
        blocks.solve(torch.rand(index.num_units), budget)
    keep = halves.solve(torch.rand(index.num_units), budget)
    assert cost.latency.predict(keep) <= budget.value * (1 + 1e-9)
    kept = torch.bincount(halves.group_of_unit, weights=keep, minlength=len(sizes)).long().tolist()
    assert all(k in (8, s) for k, s in zip(kept, sizes))  # only the allowed widths
    with pytest.raises(UserError, match="keeping 8 channel"):
        halves.solve(torch.rand(index.num_units), Budget.from_target(cost, latency_reduction=0.9))


def test_analysis_gives_a_latency_target_the_half_block_but_not_a_recipes_round_to(chain, monkeypatch) -> None:
    from cascadec.prune import analysis as analysis_module

    model, _, _ = chain

    def attach(model, example, cost, **kwargs):
        cost.latency = LatencyModel(
            build_table(model, example, cost=cost, timer=stair_ms, network_ms=lambda: 0.5, use_cache=False), cost
        )
        return cost.latency

    monkeypatch.setattr(analysis_module, "attach_latency_model", attach)
    head = {"name": "r", "model": {"name": "chain"}}
    recipe = Recipe.model_validate({**head, "prune": {"target": {"latency_reduction": 0.2}}})
    solver = analysis_module.analyse(model, recipe, EX).solver
    assert (solver.round_to, solver.narrowest) == (16, 8)
    recipe = Recipe.model_validate({**head, "prune": {"target": {"latency_reduction": 0.2}, "round_to": 4}})
    solver = analysis_module.analyse(model, recipe, EX).solver
    assert (solver.round_to, solver.narrowest) == (4, 4)  # the recipe's rounding, exactly


def _latency_chain(chain):
    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    cost.latency = LatencyModel(table, cost)
    return index, cost


def test_refinement_holds_the_target_to_the_measured_speedup(chain) -> None:
    """A backend 15 % slower on pruned networks than the table says: the re-solves shrink the
    budget until the measured speed-up reaches the target; the table alone would miss it."""
    from cascadec.prune.latency_refine import refine_latency_mask

    index, cost = _latency_chain(chain)
    solver = MaskSolver(index, cost)
    budget = Budget.from_target(cost, latency_reduction=0.4)
    target = 1 / 0.6
    scores = torch.rand(index.num_units, generator=torch.Generator().manual_seed(0))

    def measured(keep: torch.Tensor) -> float:
        pruned = 1 - cost.latency.predict(keep) / cost.latency.base_ms
        return 1 / (1 - 0.85 * pruned)  # the backend saves 85 % of what the table predicts

    refined = refine_latency_mask(solver, scores, budget, measured, rounds=4)
    first = refined.history[0]
    assert first["measured_speedup"] < target * 0.95 and first["budget_fraction"] == pytest.approx(0.6)
    assert 2 <= len(refined.history) <= 4 and sum(h["chosen"] for h in refined.history) == 1
    assert measured(refined.keep) >= target * 0.98 and refined.budget.keep_fraction < 0.6
    assert measured(refined.keep) == max(h["measured_speedup"] for h in refined.history if h["chosen"])
    # an exact table: the first mask already reaches the target
    exact = refine_latency_mask(
        solver, scores, budget, lambda k: cost.latency.base_ms / cost.latency.predict(k), rounds=4
    )
    assert exact.history[0]["measured_speedup"] == pytest.approx(exact.history[0]["predicted_speedup"])
    assert exact.history[0]["measured_speedup"] >= target  # the table's mask meets its own budget
    chosen = next(h for h in exact.history if h["chosen"])
    assert chosen["measured_speedup"] >= target * 0.98


def test_refinement_interpolates_once_two_tries_bracket_the_target(chain) -> None:
    """A backend whose speed-up grows faster than the table's (measured = predicted ** 1.6): the
    first try overshoots; once a try lands on either side, the next budget is interpolated
    between them instead of rescaled by the last error alone."""
    from cascadec.prune.latency_refine import _next_fraction, refine_latency_mask

    index, cost = _latency_chain(chain)
    budget = Budget.from_target(cost, latency_reduction=0.5)  # 2x
    # (budget fraction, measured latency fraction): 0.5 gave 0.3 (too fast), 0.7 gave 0.6 (too slow)
    assert _next_fraction([(0.5, 0.3), (0.7, 0.6)], budget) == pytest.approx(0.5 + 0.2 * 0.2 / 0.3)
    assert _next_fraction([(0.5, 0.3)], budget) == pytest.approx(0.5 / (2 / 3))  # damped rescale
    assert _next_fraction([(0.5, 0.55)], budget) == pytest.approx(0.5 / 1.1)
    # 0.55 landed on the network 0.5 gave: interpolate from 0.55, or the step repeats itself
    stuck = [(0.5, 0.3), (0.7, 0.6), (0.55, 0.3)]
    assert _next_fraction(stuck, budget) == pytest.approx(0.55 + 0.2 * 0.15 / 0.3)

    wide = Chain(widths=(32, 48, 64)).eval()  # fine enough for budgets to land between tries
    index = build_groups(wide, EX)
    cost = CostModel.build(wide, index, EX)
    cost.latency = LatencyModel(build_table(wide, EX, cost=cost, timer=fake_ms, use_cache=False), cost)
    budget = Budget.from_target(cost, latency_reduction=0.5)
    calls = []

    def measured(keep: torch.Tensor) -> float:
        calls.append(keep)
        return (cost.latency.base_ms / cost.latency.predict(keep)) ** 1.6

    refined = refine_latency_mask(MaskSolver(index, cost), torch.ones(index.num_units), budget, measured, rounds=5)
    first, second = refined.history[:2]
    assert first["measured_speedup"] > 2 * 1.1 and second["measured_speedup"] < 2  # bracketed
    chosen = next(h for h in refined.history if h["chosen"])
    assert abs(chosen["measured_speedup"] / 2 - 1) < 0.05
    assert len(calls) == len(refined.history)
    assert len({tuple(c.tolist()) for c in calls}) == len(calls)  # no network timed twice


def test_refinement_stops_at_the_narrowest_network(chain) -> None:
    """A backend that saves nothing: the budget shrinks to the floor and the best try is kept
    (no traceback from an infeasible rescaled budget)."""
    from cascadec.prune.latency_refine import refine_latency_mask

    index, cost = _latency_chain(chain)
    solver = MaskSolver(index, cost)
    budget = Budget.from_target(cost, latency_reduction=0.3)
    refined = refine_latency_mask(solver, torch.ones(index.num_units), budget, lambda keep: 1.0, rounds=6)
    assert refined.history and all(h["measured_speedup"] == 1.0 for h in refined.history)
    assert sum(h["chosen"] for h in refined.history) == 1


def test_a_coarse_network_bounds_the_solves_not_only_the_measurements(chain) -> None:
    """Every budget lands on the one network measured already: no second measurement, and the
    re-solves stop after SOLVES_PER_MEASUREMENT (4) x rounds instead of running on."""
    from cascadec.prune.latency_refine import refine_latency_mask

    index, cost = _latency_chain(chain)
    budget = Budget.from_target(cost, latency_reduction=0.3)
    solves, measured = [], []

    class Coarse:  # one network whatever the budget
        def __init__(self) -> None:
            self.cost = cost

        def solve(self, scores, current):
            solves.append(current.keep_fraction)
            return torch.ones(index.num_units)

    refined = refine_latency_mask(
        Coarse(), torch.ones(index.num_units), budget, lambda keep: measured.append(1) or 1.0, rounds=2
    )
    assert len(measured) == 1 and len(refined.history) == 1
    assert len(solves) == 4 * 2 and len(set(solves)) == len(solves)  # each a new budget, the same network


def test_recipe_latency_multiple_and_refine() -> None:
    base = {"name": "r", "model": {"name": "cifar_resnet8"}, "prune": {"target": {"latency_reduction": 0.3}}}
    recipe = Recipe.model_validate(base)
    assert recipe.prune.latency.multiple == "auto" and recipe.prune.latency.fixed_multiple is None
    assert recipe.prune.latency.refine == 3
    assert recipe.prune.latency.ranking == "per_ms_per_flop"
    per_ms = Recipe.model_validate({**base, "prune": {**base["prune"], "latency": {"ranking": "per_ms"}}})
    assert per_ms.prune.latency.ranking == "per_ms"
    fixed = Recipe.model_validate({**base, "prune": {**base["prune"], "latency": {"multiple": 32, "refine": 0}}})
    assert fixed.prune.latency.fixed_multiple == 32 and fixed.prune.latency.refine == 0
    for bad in ({"multiple": 0}, {"multiple": "fast"}, {"refine": -1}, {"ranking": "flops"}):
        with pytest.raises(ValueError):
            Recipe.model_validate({**base, "prune": {**base["prune"], "latency": bad}})


def test_report_and_inspect_name_the_half_block(capsys) -> None:
    from rich.console import Console

    from cascadec.console_tables import print_inspect
    from cascadec.report_render import _latency_target_md

    table = {"layers": 9, "grid_points": 40, "cached": True, "channel_block": 16, "multiple": 16, "narrow": 8}
    check = {
        "backend": "onnxruntime", "batch": 32, "target_speedup": 1.4, "predicted_speedup": 1.41,
        "measured_speedup": 1.38, "predicted_ms": 1.3, "measured_ms": 1.35, "tolerance": None,
        "prediction_error": 0.02, "passed": True,
    }  # fmt: skip
    markdown = "\n".join(_latency_target_md(check, {"table": table}))
    assert "widths at multiples of 16 and 8 below them" in markdown
    without = "\n".join(_latency_target_md(check, {"table": {**table, "narrow": 0}}))
    assert "widths at multiples of 16" in without and "below them" not in without
    lat = {**table, "backend": "onnxruntime", "batch": 32, "configurations": 9, "build_seconds": 1.0}
    print_inspect(Console(width=160), {"model": "m", "input_shape": [1, 28, 28], "flops": 1, "params": 1, "prunable_units": 1,
                    "groups": [], "frozen": [], "latency": lat})  # fmt: skip
    assert "at multiples of 16 and 8 below them" in capsys.readouterr().out


def test_grouped_conv_grids_keep_whole_groups(isolated_cache) -> None:
    """A grouped conv (16 groups) cannot be timed at the half block's 8 channels (a graph with 0
    input channels per group): its grid widths are multiples of its groups."""
    import torch.nn as nn

    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    index = build_groups(model, EX)
    cost = CostModel.build(model, index, EX)
    table = build_table(model, EX, cost=cost, timer=stair_ms, network_ms=lambda: 0.5, use_cache=False)
    assert table.narrow == 8
    grouped = table.tables[table.layers["3"]]
    assert grouped.config.groups == 16 and len(grouped.in_grid) + len(grouped.out_grid) > 2
    assert all(w % 16 == 0 for w in grouped.in_grid + grouped.out_grid)
    assert 8 in table.tables[table.layers["8"]].in_grid  # the classifier, not grouped, times the half block


# ----------------------------------------------------------------- latency targets in INT8


def _int8_fake_ms(graph: bytes, x_shape: tuple[int, ...]) -> float:
    """Half the FP32 fake's time for a quantized layer (its weight is the int8 initializer)."""
    model = onnx.load_from_string(graph)
    if not model.graph.initializer:
        return 0.0005
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node), "an INT8 table times quantized graphs"
    weight = max((onnx.numpy_helper.to_array(t) for t in model.graph.initializer), key=lambda a: a.size)
    spatial = int(np.prod(x_shape[2:])) if len(x_shape) > 2 else 1
    return 0.5e-6 * weight.size * spatial + 0.001


def test_int8_table_times_quantized_graphs_and_keys_its_own_cache(chain, isolated_cache) -> None:
    model, _, cost = chain
    fp32 = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 1.0)
    int8 = build_table(
        model, EX, cost=cost, timer=_int8_fake_ms, network_ms=lambda: 0.4, reference_ms=lambda: 1.0, precision="int8"
    )
    assert not int8.cached and int8.precision == "int8" and int8.reference_ms == 1.0
    assert "precision" not in fp32.environment and int8.environment["precision"] == "int8"
    assert len(list((isolated_cache / "latency").glob("*.json"))) == 2  # two entries, neither reused
    again = LatencyTable.from_json(json.loads(json.dumps(int8.to_json())))
    assert again.precision == "int8" and again.reference_ms == 1.0
    for name in int8.layers:  # the quantized layers were timed, not the FP32 ones
        assert int8.layer_ms(name, 4.0, 4.0) < fp32.layer_ms(name, 4.0, 4.0)


def test_int8_target_counts_from_fp32_and_budgets_what_int8_leaves(chain) -> None:
    """ "3x faster in INT8" where INT8 alone gives 2x: the INT8 table's budget is 2/3 of the
    unpruned INT8 network; the prediction's speed-ups count from the FP32 one."""
    from cascadec.prune.latency import latency_prediction

    model, index, cost = chain
    table = build_table(model, EX, cost=cost, timer=fake_ms, network_ms=lambda: 0.5, use_cache=False)
    table.precision, table.reference_ms = "int8", 1.0  # INT8 unpruned 0.5 ms, FP32 unpruned 1.0 ms
    cost.latency = LatencyModel(table, cost)
    budget = Budget.from_target(cost, latency_reduction=1 - 1 / 3)
    assert budget.keep_fraction == pytest.approx(2 / 3) and budget.value == pytest.approx(0.5 * 2 / 3)
    keep = MaskSolver(index, cost).solve(torch.ones(index.num_units), budget)
    record = latency_prediction(cost.latency, keep, budget)
    assert record["precision"] == "int8" and record["target_speedup"] == pytest.approx(3.0)
    assert record["predicted_speedup"] == pytest.approx(1.0 / cost.latency.predict(keep))
    with pytest.raises(UserError, match="INT8 alone already gives 2.00x"):
        Budget.from_target(cost, latency_reduction=0.4)  # 1.67x: quantization alone is faster
    # an absolute target is in the table's own precision
    assert Budget.from_target(cost, latency_ms=0.25).keep_fraction == pytest.approx(0.5)


def test_int8_latency_target_needs_the_int8_student_and_a_cpu_table() -> None:
    base = {"name": "r", "model": {"name": "cifar_resnet8"}}
    target = {"target": {"latency_reduction": 0.5}}
    ok = Recipe.model_validate(
        {**base, "prune": {**target, "latency": {"precision": "int8"}}, "quantize": {"precision": "int8"}}
    )
    assert ok.prune.latency.precision == "int8"
    with pytest.raises(ValueError, match="quantize.precision: int8"):
        Recipe.model_validate({**base, "prune": {**target, "latency": {"precision": "int8"}}})
    with pytest.raises(ValueError, match="onnxruntime"):
        Recipe.model_validate(
            {
                **base,
                "prune": {**target, "latency": {"precision": "int8", "backend": "onnxruntime-cuda"}},
                "quantize": {"precision": "int8"},
            }
        )
    from cascadec.prune.latency_table import check_precision

    with pytest.raises(UserError, match="fp32 or int8"):
        check_precision("onnxruntime", "fp16")


def test_int8_latency_gate_reads_the_quantize_stages_rounds() -> None:
    """The INT8 student against the FP32 teacher (quantize.latency), not the FP32 student."""
    from cascadec.stages import check_latency_target

    recipe = Recipe.model_validate(
        {
            "name": "r",
            "model": {"name": "cifar_resnet8"},
            "prune": {"target": {"latency_reduction": 0.75}, "latency": {"precision": "int8"}},
            "quantize": {"precision": "int8"},
        }
    )
    run = _Run(
        {"predicted_ms": 2.5, "predicted_speedup": 4.0, "target_speedup": 4.0},
        {"student": {"1": {"p50_ms": 5.0}}, "speedup": {"1": 2.0}},  # FP32 student: 2x
    )
    assert check_latency_target(run, recipe) is None  # the quantize stage has not timed anything yet
    run.metrics["quantize"] = {
        "latency": {"student_int8": {"1": {"p50_ms": 2.6}}, "speedup": {"combined": {"1": 3.85}}}
    }
    out = check_latency_target(run, recipe)
    assert out["precision"] == "int8" and out["measured_speedup"] == 3.85 and out["passed"]
    assert out["measured_ms"] == 2.6 and "INT8 student against the FP32 teacher" in out["message"]


def test_yaml_off_is_qat_off() -> None:
    """``--set quantize.qat=off`` and a bare ``qat: off`` in a recipe arrive as YAML's false."""
    recipe = Recipe.model_validate({"name": "r", "model": {"name": "m"}, "quantize": {"qat": False}})
    assert recipe.quantize.qat == "off"


def test_int8_layer_graph_is_what_ort_runs_as_int8_kernels(tmp_path) -> None:
    from cascadec.prune.latency_table import int8_graph
    from cascadec.quantize.ptq import int8_kernel_count, ort_kernels

    config = layer_configs(Chain().eval(), EX)["conv2"]
    graph, x_shape = layer_onnx(config, 8, 8, batch=2)
    quantized = int8_graph(graph, x_shape)
    model = onnx.load_from_string(quantized)
    onnx.checker.check_model(model)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in model.graph.node}
    # uint8 in and out, as inside a quantized network: no float Quantize / Dequantize timed
    uint8 = onnx.TensorProto.UINT8
    assert model.graph.input[0].type.tensor_type.elem_type == uint8
    assert model.graph.output[0].type.tensor_type.elem_type == uint8
    assert [i.name for i in model.graph.input] == ["x"] and model.graph.output[0].name == "out"
    from cascadec.prune.latency_table import ort_timer

    assert ort_timer()(quantized, x_shape) > 0  # fed uint8
    path = tmp_path / "layer.int8.onnx"
    path.write_bytes(quantized)
    assert int8_kernel_count(ort_kernels(path)) >= 1  # QLinearConv, not dequantize-then-FP32


@pytest.mark.slow
def test_compress_with_an_int8_latency_target_is_judged_on_the_int8_student(
    tiny_recipe, tmp_path, cli, isolated_cache, monkeypatch
) -> None:
    """End to end: the INT8 table, the refinement timing the INT8 student against the FP32
    network, and the gate reading the quantize stage's rounds. The table's layers (quantized
    graphs, checked by the fake) and what INT8 alone gives (1.25x) are pinned, so that the tiny
    network's noisy timing can neither make the target infeasible nor need no pruning; the
    refinement and the gate time the real files."""
    import cascadec.prune.latency as latency_module
    import cascadec.prune.latency_table as table_module

    def timer(device="cpu", threads=None):
        def time_layer(graph: bytes, x_shape: tuple[int, ...]) -> float:
            model = onnx.load_from_string(graph)
            quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            return _int8_fake_ms(graph, x_shape) if quantized or not model.graph.initializer else 1.0

        return time_layer

    monkeypatch.setattr(table_module, "ort_timer", timer)
    monkeypatch.setattr(latency_module, "network_pair_ms", lambda *a, **k: (1.0, 1.25))
    out = tmp_path / "run"
    result = cli(
        "compress", "cifar_resnet8", "--recipe", tiny_recipe, "--out", out,
        "--set", "prune.target.latency_reduction=0.5", "--set", "prune.latency.precision=int8",
        "--set", "prune.latency.tolerance=null", "--set", "quantize.precision=int8",
        "--set", "quantize.flavours=[onnxruntime]", "--set", "quantize.qat=off",
        "--set", "quantize.max_float_layers=0", "--set", "quantize.max_accuracy_drop=1",
        "--set", "quantize.calibration.images=32", "--set", "quantize.selection_images=64",
        "--set", "prune.latency.refine=2",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    prediction, check = report["latency_prediction"], report["latency_target"]
    assert prediction["precision"] == "int8" and prediction["reference_ms"] == pytest.approx(
        1.25 * prediction["base_ms"]
    )
    assert check["precision"] == "int8" and check["target_speedup"] == pytest.approx(2.0)
    combined = report["quantize"]["latency"]["speedup"]["combined"][str(check["batch"])]
    assert check["measured_speedup"] == combined  # the INT8 student against the FP32 teacher
    tries = report["prune"]["latency_refine"]
    assert 1 <= len(tries) <= 2 and sum(t["chosen"] for t in tries) == 1
    assert all(t["deployed_speedup"] == pytest.approx(t["measured_speedup"] * 1.25) for t in tries)
    assert "## Latency target (onnxruntime, batch 1, INT8)" in (out / "report.md").read_text()
