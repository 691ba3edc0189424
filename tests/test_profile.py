"""The latency protocol: trtexec's rules (warm-up >= 200 ms, then min runs AND min duration),
complete statistics, and the GPU host/compute split, checked with a fake clock and a fake
device runner (the real CUDA paths need a GPU; these fakes implement the same interface)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cascadec.backends import canonical_name, get_backend
from cascadec.backends.onnx_export import export_onnx
from cascadec.errors import UserError
from cascadec.profile.engines import profile_device, profile_onnx, profile_torch
from cascadec.profile.protocol import (
    COMPUTE_FIELDS,
    FIELDS,
    HOST_FIELDS,
    MIN_WARMUP_S,
    Timing,
    compare,
    measure,
    measure_device,
    profile_interleaved,
    protocol_record,
    summarize,
)

FAST = {"timing": Timing(warmup_s=0.0, min_duration_s=0.02, min_iters=5), "progress": False}
NO_GPU = not torch.cuda.is_available()


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "net.onnx"
    export_onnx(small_net(), torch.randn(1, 3, 16, 16), path)
    return path


# ---------------------------------------------------------------- fakes: a clock, a stream, events, a runner


class FakeClock:
    """Seconds that only move when the fakes say so: every duration below is exact."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class FakeStream:
    """A GPU queue: enqueued work starts when the queue is free and the host has enqueued it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.free_at = 0.0

    def enqueue(self, seconds: float) -> None:
        self.free_at = max(self.free_at, self.clock.now) + seconds

    def synchronize(self) -> None:
        self.clock.now = max(self.clock.now, self.free_at)


class FakeEvent:
    """Like torch.cuda.Event: fires when the stream reaches it; elapsed_time in ms."""

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self, stream: FakeStream) -> None:
        self.at = max(stream.free_at, stream.clock.now)

    def synchronize(self) -> None:
        assert self.at is not None

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1e3


class FakeRunner:
    """stage/compute/fetch with fixed host costs and a per-call GPU time (cycling ``kernel_ms``)."""

    def __init__(self, clock: FakeClock, batch: int, *, h2d_ms=1.0, launch_ms=0.5, kernel_ms=(4.0,), d2h_ms=0.5):
        self.clock, self.batch = clock, batch
        self.stream = FakeStream(clock)
        self.h2d, self.launch, self.d2h = h2d_ms / 1e3, launch_ms / 1e3, d2h_ms / 1e3
        self.kernel = [k / 1e3 for k in kernel_ms]
        self.calls = {"stage": 0, "compute": 0, "fetch": 0}
        self.shapes: set[tuple[int, ...]] = set()

    def stage(self, x: np.ndarray) -> None:
        self.shapes.add(x.shape)
        self.calls["stage"] += 1
        self.clock.now += self.h2d

    def compute(self) -> None:
        self.clock.now += self.launch  # host-side enqueue cost, then the kernel queues on the stream
        self.stream.enqueue(self.kernel[self.calls["compute"] % len(self.kernel)])
        self.calls["compute"] += 1

    def fetch(self) -> np.ndarray:
        self.stream.synchronize()
        self.clock.now += self.d2h
        self.calls["fetch"] += 1
        return np.zeros((self.batch, 10), dtype=np.float32)


# ---------------------------------------------------------------- the protocol's loop


def test_measure_warms_up_200ms_then_meets_duration_and_min_iters():
    clock = FakeClock()
    calls = []

    def call():
        calls.append(clock.now)
        clock.now += 0.002  # 2 ms per call

    times = measure(call, Timing(warmup_s=0.0, min_duration_s=0.049, min_iters=3), clock=clock)
    assert np.allclose(times, 2.0)
    assert times.size == 25  # 2 ms runs until 49 ms have passed: duration dominates min_iters
    first_timed = calls[-times.size]
    assert first_timed >= MIN_WARMUP_S  # the 0 s warm-up request was raised to trtexec's 200 ms
    times = measure(call, Timing(warmup_s=0.3, min_duration_s=0.0, min_iters=7), clock=clock)
    assert times.size == 7  # min_iters dominates a zero duration
    assert measure(call, Timing(warmup_s=0.2, min_duration_s=10.0, min_iters=1, max_iters=4), clock=clock).size == 4


def test_warm_calls_replace_the_timed_warm_up_for_a_latency_tables_grid_points():
    """The latency table times each grid point with the protocol's loop, three untimed calls
    instead of 200 ms of warm-up (issue 29: one timing protocol)."""
    from cascadec.prune.latency_table import median_ms

    clock = FakeClock()
    calls = []

    def call():
        calls.append(clock.now)
        clock.now += 0.002 * (10 if len(calls) <= 3 else 1)  # three slow first calls, then 2 ms

    times = measure(call, Timing(min_duration_s=0.0, min_iters=5), clock=clock, warm_calls=3)
    assert len(calls) == 8 and times.size == 5 and np.allclose(times, 2.0)
    calls.clear()
    assert median_ms(lambda: calls.append(1), min_iters=4, min_seconds=0.0) >= 0.0
    assert len(calls) == 7  # three untimed, four timed


def test_measure_device_splits_host_latency_and_gpu_compute():
    clock = FakeClock()
    runner = FakeRunner(clock, batch=4)
    x = np.zeros((4, 3, 8, 8), dtype=np.float32)
    host, compute = measure_device(
        runner, x, Timing(warmup_s=0.2, min_duration_s=0.1, min_iters=5), clock=clock, new_event=FakeEvent
    )
    # host: 1 ms H2D + 0.5 ms launch + 4 ms kernel + 0.5 ms D2H; compute: launch + kernel between the events
    assert np.allclose(host, 6.0) and np.allclose(compute, 4.5)
    assert host.size == compute.size == 17  # first run at or past 100 ms of timed runs: ceil(100 / 6)
    warmup_runs = runner.calls["compute"] - host.size
    assert warmup_runs >= 1 + int(0.2 / 0.006)  # one untimed first call, then >= 200 ms of warm-up
    assert runner.calls["stage"] == runner.calls["compute"] == runner.calls["fetch"]
    assert runner.shapes == {(4, 3, 8, 8)}


def test_profile_device_reports_every_field_per_batch():
    clock = FakeClock()
    made: list[int] = []

    def make_runner(batch: int) -> FakeRunner:
        made.append(batch)
        return FakeRunner(clock, batch, kernel_ms=(4.0, 4.0, 4.0, 4.0, 14.0))

    prof = profile_device(
        make_runner,
        (3, 8, 8),
        batches=(1, 8),
        timing=Timing(warmup_s=0.2, min_duration_s=0.5, min_iters=10),
        progress=False,
        clock=clock,
        new_event=FakeEvent,
    )
    assert made == [1, 8] and list(prof) == [1, 8]
    for batch, stats in prof.items():
        assert set(FIELDS) | set(HOST_FIELDS) | set(COMPUTE_FIELDS) == set(stats)
        assert stats["compute_p50_ms"] == pytest.approx(4.5) and stats["compute_max_ms"] == pytest.approx(14.5)
        assert stats["p50_ms"] == stats["host_p50_ms"] == pytest.approx(6.0)
        assert stats["p99_ms"] == pytest.approx(16.0)  # one slow kernel in five: the tail shows it, p50 doesn't
        assert stats["throughput"] == pytest.approx(batch * 1e3 / stats["mean_ms"])
        assert stats["iterations"] >= 10


def test_profile_tensorrt_times_one_runner_over_every_batch(monkeypatch, tmp_path):
    import cascadec.backends.tensorrt_backend as trtb
    from cascadec.profile.engines import profile_tensorrt

    clock, opened = FakeClock(), []

    class FakeTrtRunner(FakeRunner):
        input_shape = (1, 28, 28)  # TrtRunner's shape excludes the batch axis

        def __init__(self, engine_path, device="cuda:0"):
            super().__init__(clock, batch=1)
            opened.append((engine_path, device))

    monkeypatch.setattr(trtb, "require_tensorrt", lambda gpu=False: None)
    monkeypatch.setattr(trtb, "TrtRunner", FakeTrtRunner)
    plan = tmp_path / "student.plan"
    with pytest.raises(UserError, match="export RUN --trt"):
        profile_tensorrt(plan, batches=(1,), progress=False)
    plan.write_bytes(b"PLAN")
    prof = profile_tensorrt(
        plan,
        batches=(1, 8),
        timing=Timing(warmup_s=0.2, min_duration_s=0.057, min_iters=3),
        progress=False,
        clock=clock,
        new_event=FakeEvent,
    )
    assert opened == [(plan, "cuda")]  # one engine, one execution context for every batch size
    assert prof[8]["compute_p50_ms"] == pytest.approx(4.5) and prof[8]["host_p50_ms"] == pytest.approx(6.0)
    assert prof[1]["iterations"] == prof[8]["iterations"] == 10


def test_summarize_known_values():
    times = np.arange(1, 101, dtype=np.float64)
    stats = summarize(times, batch=8)
    assert tuple(stats) == FIELDS
    assert (
        stats["p50_ms"] == 50.5 and stats["p90_ms"] == pytest.approx(90.1) and stats["p99_ms"] == pytest.approx(99.01)
    )
    assert (
        stats["mean_ms"] == 50.5 and stats["min_ms"] == 1.0 and stats["max_ms"] == 100.0 and stats["iterations"] == 100
    )
    assert stats["throughput"] == pytest.approx(8 * 1000 / 50.5)
    split = summarize(times, batch=1, compute_ms=times / 2)
    assert split["host_p50_ms"] == 50.5 and split["compute_p50_ms"] == 25.25 and split["compute_max_ms"] == 50.0


def test_protocol_record_says_when_warmup_was_raised():
    record = protocol_record(
        backend="onnxruntime", device="cpu", timing=Timing(warmup_s=0.01, min_duration_s=3.0, min_iters=10), threads=2
    )
    assert record["warmup_s"] == MIN_WARMUP_S and record["warmup_requested_s"] == 0.01 and "0.2 s" in record["note"]
    assert {"duration_s", "min_iters", "threads", "device", "cuda_graph", "timer"} <= set(record)
    gpu = protocol_record(
        backend="torch-cuda",
        device="cuda",
        timing=Timing(warmup_s=0.5, min_duration_s=3.0, min_iters=10),
        cuda_graph=True,
    )
    assert gpu["warmup_s"] == 0.5 and "note" not in gpu and gpu["cuda_graph"] is True and "CUDA events" in gpu["timer"]
    json.dumps(gpu)


# ---------------------------------------------------------------- real CPU backends


def check_stats(stats: dict, min_iters: int) -> None:
    assert tuple(stats) == FIELDS
    assert stats["iterations"] >= min_iters
    for key in FIELDS:
        if key != "std_ms":
            assert stats[key] > 0, key
    assert (
        stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    )


@pytest.mark.slow
def test_profile_onnx_fields(onnx_path):
    prof = profile_onnx(onnx_path, (3, 16, 16), batches=(1, 4), threads=1, **FAST)
    assert list(prof) == [1, 4]
    for batch, stats in prof.items():
        check_stats(stats, 5)
        assert stats["throughput"] == pytest.approx(batch * 1e3 / stats["mean_ms"])


def test_profile_onnx_infers_shape_and_shows_progress(onnx_path):
    prof = profile_onnx(onnx_path, None, batches=(2,), **{**FAST, "progress": True})
    check_stats(prof[2], 5)


def test_profile_torch_fields():
    before = torch.get_num_threads()
    prof = profile_torch(small_net(), (3, 16, 16), batches=(1, 3), threads=1, **FAST)
    assert torch.get_num_threads() == before  # thread count restored
    assert list(prof) == [1, 3]
    for stats in prof.values():
        check_stats(stats, 5)


def test_compare_speedup():
    teacher = {1: {"p50_ms": 4.0}, 8: {"p50_ms": 20.0}, 32: {"p50_ms": 60.0}}
    student = {"1": {"p50_ms": 2.0}, "8": {"p50_ms": 5.0}}  # as read back from report.json
    assert compare(teacher, student) == {1: 2.0, 8: 4.0}


def test_interleaved_rounds_alternate_and_pool_every_run():
    calls = []

    def profile_one(name, share):
        calls.append((name, share.min_duration_s, share.min_iters))
        round_no = sum(1 for c in calls if c[0] == name)
        # drift: the whole machine is twice as slow in round 2; the teacher always costs 2x the student
        scale = (2.0 if name == "teacher" else 1.0) * (2.0 if round_no == 2 else 1.0)
        return {1: summarize(np.full(4, scale), 1, keep_samples=True)}

    pooled, ratios = profile_interleaved(
        profile_one, ["teacher", "student"], rounds=3, timing=Timing(min_duration_s=3.0, min_iters=10)
    )
    assert [c[0] for c in calls] == ["teacher", "student"] * 3  # turns, not one model after the other
    assert all(c[1] == pytest.approx(1.0) and c[2] == 4 for c in calls)  # a share of the duration, runs rounded up
    assert pooled["teacher"][1]["iterations"] == 12 and "samples_ms" not in pooled["teacher"][1]
    assert pooled["teacher"][1]["p50_ms"] == 2.0 and pooled["student"][1]["max_ms"] == 2.0
    assert ratios == {"student": {1: [2.0, 2.0, 2.0]}}  # drift moved both latencies, never the ratio
    assert compare(pooled["teacher"], pooled["student"]) == {1: 2.0}


def test_interleaved_rounds_errors():
    def without_samples(name, share):
        return {1: summarize(np.ones(3), 1)}

    with pytest.raises(ValueError, match="keep_samples"):
        profile_interleaved(without_samples, ["a"], rounds=1, timing=Timing(min_duration_s=1.0, min_iters=1))
    with pytest.raises(UserError, match="rounds"):
        profile_interleaved(without_samples, ["a"], rounds=0, timing=Timing(min_duration_s=1.0, min_iters=1))


def test_keep_samples_gives_raw_runs(onnx_path):
    prof = profile_onnx(onnx_path, (3, 16, 16), batches=(2,), keep_samples=True, **FAST)
    assert len(prof[2]["samples_ms"]) == prof[2]["iterations"] and min(prof[2]["samples_ms"]) == prof[2]["min_ms"]
    assert "samples_ms" not in profile_onnx(onnx_path, (3, 16, 16), batches=(2,), **FAST)[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batches": (0,)}, "batch"),
        ({"batches": ()}, "batch"),
        ({"min_iters": 0}, "min_iters"),
        ({"warmup_s": -1}, "warmup_s"),
        ({"min_duration_s": -1}, "min_duration_s"),
    ],
)
def test_protocol_argument_errors(onnx_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        timing = {k: kwargs.pop(k) for k in list(kwargs) if k != "batches"}
        profile_onnx(onnx_path, (3, 16, 16), **{**FAST, **kwargs, **({"timing": Timing(**timing)} if timing else {})})


def test_profile_input_errors(onnx_path, tmp_path):
    with pytest.raises(UserError, match="does not match"):
        profile_onnx(onnx_path, (3, 32, 32), batches=(1,), **FAST)
    with pytest.raises(UserError, match="not found"):
        profile_onnx(tmp_path / "missing.onnx", (3, 16, 16), **FAST)
    with pytest.raises(UserError, match="input shape"):
        profile_torch(small_net(), (), **FAST)
    with pytest.raises(UserError, match="CUDA"):
        profile_torch(small_net(), (3, 16, 16), cuda_graph=True, **FAST)


# ---------------------------------------------------------------- backend names and availability


def test_backend_names():
    """One registry serves profile and verify: the same names and aliases for both."""
    assert canonical_name("ort") == "onnxruntime" and canonical_name("TRT") == "tensorrt"
    assert canonical_name("torch-cuda") == "torch-cuda" and canonical_name("onnxruntime-trt") == "onnxruntime-trt"
    assert get_backend("ort-trt").runs == "onnx" and get_backend("ort-trt").device == "tensorrt"
    with pytest.raises(UserError, match="torch-cuda"):
        canonical_name("junk")


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on machines without a GPU")
@pytest.mark.parametrize(
    ("backend", "match"),
    [
        ("onnxruntime-cuda", "CUDAExecutionProvider"),
        ("onnxruntime-trt", "TensorrtExecutionProvider"),
        ("torch-cuda", "CUDA"),
        ("tensorrt", "TensorRT"),
    ],
)
def test_gpu_backends_refused_without_gpu(backend, match, onnx_path):
    with pytest.raises(UserError, match=match):
        get_backend(backend).require(timing=True)
    if backend.startswith("onnxruntime"):
        from cascadec.backends.cuda_runners import OrtDeviceRunner

        with pytest.raises(UserError, match=match):
            OrtDeviceRunner(onnx_path, (3, 16, 16), provider="tensorrt" if backend.endswith("trt") else "cuda")
    if backend == "torch-cuda":
        from cascadec.backends.cuda_runners import TorchCudaRunner

        with pytest.raises(UserError, match=match):
            TorchCudaRunner(small_net(), (1, 3, 16, 16), device="cuda")


# ---------------------------------------------------------------- the command on a run directory


def test_cli_profile_gpu_backend_without_gpu_exits_2_and_leaves_the_run_alone(cli, copy_run):
    if not NO_GPU:
        pytest.skip("this machine has a GPU")
    run = copy_run()
    before = (run / "manifest.json").read_text()
    result = cli("profile", run, "--backend", "onnxruntime-cuda", "--batch", "1")
    assert result.code == 2 and len(result.err_lines) == 1 and "Traceback" not in result.err, result.err
    assert "CUDAExecutionProvider" in result.err
    assert (run / "manifest.json").read_text() == before  # no stage marked failed
    assert cli("profile", run, "--backend", "onnxruntime", "--cuda-graph").code == 2  # torch-cuda only
    for backend, says in (
        ("tensorrt", "TensorRT"),
        ("torch-cuda", "CUDA"),
        ("onnxruntime-trt", "TensorrtExecutionProvider"),
    ):
        result = cli("profile", run, "--backend", backend, "--batch", "1")
        assert result.code == 2 and len(result.err_lines) == 1 and says in result.err, (backend, result.err)
    result = cli("profile", run / "student.onnx", "--backend", "torch")
    assert result.code == 2 and "cannot run a .onnx file" in result.err
    assert (run / "manifest.json").read_text() == before


@pytest.mark.slow
def test_cli_profile_torch_backend_records_latency_per_backend(cli, copy_run):
    run = copy_run()
    result = cli(
        "profile",
        run,
        "--backend",
        "torch",
        "--batch",
        "1,2",
        "--duration",
        "0.02",
        "--iterations",
        "3",
        "--threads",
        "1",
    )
    assert result.code == 0, result.err
    assert "latency (torch)" in result.out and "speed-up" in result.out
    report = json.loads((run / "report.json").read_text())
    assert set(report["latency"]) == {"onnxruntime", "torch"}  # the compress stage's numbers are kept
    torch_node = report["latency"]["torch"]
    assert torch_node["student"]["2"]["iterations"] >= 3 and torch_node["student"]["2"]["p50_ms"] > 0
    assert torch_node["protocol"]["duration_s"] == 0.02 and torch_node["protocol"]["warmup_s"] >= MIN_WARMUP_S
    assert torch_node["protocol"]["threads"] == 1 and torch_node["protocol"]["device"] == "cpu"
    assert set(report["speedup"]) == {"onnxruntime", "torch"} and set(report["speedup"]["torch"]) == {"1", "2"}
    assert torch_node["protocol"]["rounds"] == 3  # the recipe default: teacher and student take turns
    assert [len(report["speedup_rounds"]["torch"][b]) for b in ("1", "2")] == [3, 3]
    assert "speedup_rounds" not in torch_node and "samples_ms" not in torch_node["student"]["1"]
    md = (run / "report.md").read_text()
    assert "### onnxruntime" in md and "### torch" in md and "Protocol: device cpu" in md
    assert "alternated in 3 rounds" in md and "x over 3 rounds)" in md
    assert "x over 3 rounds)" in result.out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["profile.torch"]["status"] == "done" and manifest["stages"]["profile"]["status"] == "done"


def test_profile_overrides_are_checked_by_the_recipe_schema():
    """--duration etc. on a run directory go through the schema, like the recipe values they replace."""
    from cascadec.recipe import load_recipe
    from cascadec.stages import profile_settings

    recipe = load_recipe("fmnist_quick")
    assert profile_settings(recipe, {"duration_s": 0.5, "threads": None}).duration_s == 0.5
    assert profile_settings(recipe, {"threads": None}) is recipe.profile  # None means "keep"
    with pytest.raises(UserError, match="duration_s"):
        profile_settings(recipe, {"duration_s": 0})
    with pytest.raises(UserError, match="min_iters"):
        profile_settings(recipe, {"min_iters": 0})


def test_profile_result_reads_a_latency_node_apart_and_writes_the_same_layout() -> None:
    """The manifest's latency.<backend> node: networks, rounds, protocol and note read apart in one
    place; speed-ups computed from the timings, whatever a stored node says."""
    from cascadec.profile.results import ProfileResult

    node = {
        "teacher": {"1": {"p50_ms": 4.0}, "8": {"p50_ms": 20.0}},
        "student": {"1": {"p50_ms": 2.0}, "8": {"p50_ms": 5.0}},
        "static": {"1": {"p50_ms": 1.0}},
        "speedup": {"1": 99.0},  # stale: recomputed
        "speedup_rounds": {"1": [1.9, 2.1]},
        "static_speedup_rounds": {"1": [4.0]},
        "protocol": {"backend": "onnxruntime", "rounds": 2},
    }
    result = ProfileResult.from_dict("onnxruntime", node)
    assert list(result.models) == ["teacher", "student", "static"]
    assert result.speedup == {"1": 2.0, "8": 4.0} and result.speedup_of("static") == {"1": 4.0}
    assert result.rounds == {"student": {"1": [1.9, 2.1]}, "static": {"1": [4.0]}}
    assert set(result.timings()) == {"teacher", "student", "static", "protocol"}
    written = result.to_dict()
    assert list(written) == [
        "teacher",
        "student",
        "static",
        "speedup",
        "speedup_rounds",
        "static_speedup_rounds",
        "protocol",
    ]
    assert written["speedup"] == {"1": 2.0, "8": 4.0}
    assert ProfileResult.from_dict("onnxruntime", written) == result
    alone = ProfileResult("tensorrt", {"student": {"1": {"p50_ms": 1.0}}}, note="student engine only")
    assert alone.speedup == {} and "speedup" not in alone.to_dict() and alone.to_dict()["note"] == "student engine only"
