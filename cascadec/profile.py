"""The latency protocol: trtexec's conventions, the same for every backend.

Per model and batch size: warm up for at least ``MIN_WARMUP_S`` (200 ms, trtexec's
``--warmUp`` default; a shorter request is raised to it and the record says so), then time
runs until *both* ``min_iters`` runs and ``min_duration_s`` seconds (trtexec's
``--iterations`` and ``--duration``, default 3 s) have passed. Inputs are random, prepared
before timing. Percentiles, not means, drive the speed-ups, because one scheduler hiccup
moves a mean but not a p50.

On the CPU one number exists per run: the wall time of the call (``time.perf_counter``).
On a GPU a run is split as trtexec splits it (see :mod:`cascadec.device_runners`):
*host latency* is the wall time of H2D copy + compute + D2H copy (trtexec's "Latency", what a
caller waits for) and is what ``p50_ms`` etc. hold; *compute time* is CUDA events recorded on
the runner's stream around the enqueue (trtexec's "GPU Compute Time") and lands in
``compute_*`` fields next to the same statistics under ``host_*``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec.backends.onnxruntime_backend import OrtRunner
from cascadec.backends.torch_backend import resolve_device
from cascadec.device_runners import DeviceRunner
from cascadec.errors import UserError

MIN_WARMUP_S = 0.2  # trtexec --warmUp default (ms=200)
DEFAULT_DURATION_S = 3.0  # trtexec --duration default
DEFAULT_MIN_ITERS = 10  # trtexec --iterations default

STATS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms")
FIELDS = (*STATS, "iterations", "throughput")
HOST_FIELDS = tuple(f"host_{s}" for s in STATS)
COMPUTE_FIELDS = tuple(f"compute_{s}" for s in STATS)

# backend -> (what it runs, where): the profile command's vocabulary
PROFILE_BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnx", "cpu"),
    "onnxruntime-cuda": ("onnx", "cuda"),
    "onnxruntime-trt": ("onnx", "tensorrt"),
    "torch": ("torch", "cpu"),
    "torch-cuda": ("torch", "cuda"),
    "tensorrt": ("engine", "cuda"),
}

Clock = Callable[[], float]


def resolve_backend(name: str) -> str:
    """A profile backend name: the registry's canonical names (aliases such as ``trt``
    included) plus ``torch-cuda``, which the registry spells as torch + a device."""
    key = str(name).strip().lower()
    if key in PROFILE_BACKENDS:
        return key
    from cascadec.backends import canonical_name

    try:
        key = canonical_name(key)
    except UserError:
        raise UserError(f"--backend {name!r}: profile knows {', '.join(PROFILE_BACKENDS)}") from None
    if key not in PROFILE_BACKENDS:
        raise UserError(f"--backend {name!r}: profile knows {', '.join(PROFILE_BACKENDS)}")
    return key


def require_backend(name: str) -> None:
    """One line, before any work, when this machine cannot run ``name`` (no GPU, provider, TensorRT)."""
    kind, where = PROFILE_BACKENDS[resolve_backend(name)]
    from cascadec.device_runners import require_cuda, require_ort_provider

    if kind == "onnx" and where != "cpu":
        require_ort_provider(where)
        require_cuda(f"--backend {name}")
    elif kind == "torch" and where == "cuda":
        require_cuda(f"--backend {name}")
    elif kind == "engine":
        from cascadec.backends.tensorrt_backend import require_tensorrt

        require_tensorrt(gpu=True)


def effective_warmup(warmup_s: float) -> float:
    """The warm-up actually used: never below trtexec's 200 ms, which first-call allocation,
    kernel selection and CPU frequency ramp-up need."""
    if not isinstance(warmup_s, (int, float)) or isinstance(warmup_s, bool) or not warmup_s >= 0:
        raise UserError(f"warmup_s must be a number >= 0, got {warmup_s!r}")
    return max(float(warmup_s), MIN_WARMUP_S)


def _check_protocol(batches: Sequence[int], warmup_s: float, min_duration_s: float, min_iters: int) -> list[int]:
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise UserError(f"batch sizes must be positive integers, got {batches}")
    effective_warmup(warmup_s)
    if not isinstance(min_duration_s, (int, float)) or not min_duration_s >= 0:
        raise UserError(f"min_duration_s must be a number >= 0, got {min_duration_s!r}")
    if not isinstance(min_iters, int) or isinstance(min_iters, bool) or min_iters < 1:
        raise UserError(f"min_iters must be a positive integer, got {min_iters!r}")
    return list(dict.fromkeys(batches))


def _check_shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None or not len(shape) or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"input shape without batch must be positive integers like (3, 224, 224), got {shape}")
    return tuple(shape)


def _loop(once: Callable[[], Any], *, warmup_s: float, min_duration_s: float, min_iters: int,
          max_iters: int | None, clock: Clock) -> list[Any]:
    """The protocol's loop: one untimed call, warm-up by time, then until min_iters AND duration."""
    once()  # first runs allocate and pick kernels; never part of the warm-up budget's average
    end = clock() + effective_warmup(warmup_s)
    while clock() < end:
        once()
    samples: list[Any] = []
    started = clock()
    while len(samples) < min_iters or clock() - started < min_duration_s:
        samples.append(once())
        if max_iters is not None and len(samples) >= max_iters:
            break
    return samples


def measure(
    fn: Callable[[], object],
    *,
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    clock: Clock = time.perf_counter,
) -> np.ndarray:
    """Wall time of ``fn`` per call in milliseconds, under the protocol (host-only timing)."""

    def once() -> float:
        t0 = clock()
        fn()
        return (clock() - t0) * 1e3

    return np.asarray(_loop(once, warmup_s=warmup_s, min_duration_s=min_duration_s, min_iters=min_iters,
                            max_iters=max_iters, clock=clock), dtype=np.float64)


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def measure_device(
    runner: DeviceRunner,
    x: np.ndarray,
    *,
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> tuple[np.ndarray, np.ndarray]:
    """(host latency ms, compute ms) per run of a :class:`~cascadec.device_runners.DeviceRunner`.

    Host latency is the wall time of stage + compute + fetch; compute is the CUDA-event time on
    ``runner.stream`` around ``compute()``. Reading the events happens after the host clock
    stops, so it never inflates the host latency."""
    start, end = new_event(), new_event()

    def once() -> tuple[float, float]:
        t0 = clock()
        runner.stage(x)
        start.record(runner.stream)
        runner.compute()
        end.record(runner.stream)
        runner.fetch()
        host_ms = (clock() - t0) * 1e3
        end.synchronize()
        return host_ms, float(start.elapsed_time(end))

    pairs = _loop(once, warmup_s=warmup_s, min_duration_s=min_duration_s, min_iters=min_iters, max_iters=max_iters,
                  clock=clock)
    host, compute = zip(*pairs)
    return np.asarray(host, dtype=np.float64), np.asarray(compute, dtype=np.float64)


def _stats(times_ms: np.ndarray, prefix: str = "") -> dict[str, float]:
    p50, p90, p95, p99 = np.percentile(times_ms, [50, 90, 95, 99])
    values = (p50, p90, p95, p99, times_ms.mean(), times_ms.min(), times_ms.max(), times_ms.std())
    return {f"{prefix}{key}": float(v) for key, v in zip(STATS, values)}


def summarize(times_ms: np.ndarray, batch: int, compute_ms: np.ndarray | None = None, *,
              keep_samples: bool = False) -> dict:
    """Per-batch statistics in the report's format.

    ``p50_ms`` ... ``std_ms`` are the latency a caller sees (host latency on a GPU);
    ``throughput`` is inferences per second, batch * 1000 / mean. With ``compute_ms`` the GPU
    split is added: ``host_*`` (the same numbers, named as trtexec names them) and ``compute_*``.
    """
    times_ms = np.asarray(times_ms, dtype=np.float64)
    stats: dict[str, Any] = _stats(times_ms)
    mean = stats["mean_ms"]
    stats["iterations"] = int(times_ms.size)
    stats["throughput"] = float(batch * 1e3 / mean) if mean > 0 else float("inf")
    if compute_ms is not None:
        stats.update(_stats(times_ms, "host_"))
        stats.update(_stats(np.asarray(compute_ms, dtype=np.float64), "compute_"))
    if keep_samples:  # raw runs, for pooling rounds (see profile_interleaved); never written to reports
        stats["samples_ms"] = times_ms.tolist()
        if compute_ms is not None:
            stats["compute_samples_ms"] = np.asarray(compute_ms, dtype=np.float64).tolist()
    return stats


def protocol_record(
    *,
    backend: str,
    device: str,
    warmup_s: float,
    min_duration_s: float,
    min_iters: int,
    max_iters: int | None = None,
    threads: int | None = None,
    cuda_graph: bool = False,
    rounds: int = 1,
) -> dict:
    """How the numbers were taken, stored next to them (report.json ``latency.<backend>.protocol``)."""
    used = effective_warmup(warmup_s)
    gpu = device != "cpu"
    record = {
        "backend": backend,
        "device": device,
        "warmup_s": used,
        "duration_s": float(min_duration_s),
        "min_iters": int(min_iters),
        "max_iters": max_iters,
        "threads": threads,
        "cuda_graph": bool(cuda_graph),
        "timer": "perf_counter (host latency) + CUDA events (compute)" if gpu else "perf_counter",
        "inputs": "random normal float32, prepared before timing",
        "rounds": int(rounds),
    }
    if used != warmup_s:
        record["warmup_requested_s"] = float(warmup_s)
        record["note"] = f"warm-up raised from {warmup_s:g} s to trtexec's minimum {MIN_WARMUP_S:g} s"
    return record


def _run_protocol(label: str, per_batch: Callable[[int], dict], batches: list[int], progress: bool) -> dict[int, dict]:
    results: dict[int, dict] = {}
    columns = (TextColumn(f"latency {label}" + " bs={task.fields[batch]}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("profile", total=len(batches), batch=batches[0])
        for b in batches:
            bar.update(task, batch=b)
            results[b] = per_batch(b)
            bar.advance(task)
    return results


def profile_device(
    make_runner: Callable[[int], DeviceRunner],
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    *,
    label: str = "device",
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> dict[int, dict]:
    """The GPU protocol over any runner: ``make_runner(batch)`` gives the runner for one batch
    size (static buffers are per shape). Stats carry the host/compute split."""
    batches = _check_protocol(batches, warmup_s, min_duration_s, min_iters)
    shape = _check_shape(input_shape)
    rng = np.random.default_rng(seed)

    def per_batch(b: int) -> dict:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        host, compute = measure_device(make_runner(b), x, warmup_s=warmup_s, min_duration_s=min_duration_s,
                                       min_iters=min_iters, max_iters=max_iters, clock=clock, new_event=new_event)
        return summarize(host, b, compute, keep_samples=keep_samples)

    return _run_protocol(label, per_batch, batches, progress)


def profile_onnx(
    path: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[int, dict]:
    """Latency of an ONNX file under ONNX Runtime, per batch size.

    ``device`` is ``cpu`` (``session.run`` with the feed prepared beforehand, what a CPU
    serving loop pays per request), ``cuda`` or ``tensorrt`` (the CUDA / TensorRT execution
    provider through IOBinding, timed with the host/compute split; ``cache_dir`` keeps
    TensorRT EP engines). ``input_shape`` excludes the batch axis; ``None`` reads it from the
    graph when the graph fixes it.
    """
    batches = _check_protocol(batches, warmup_s, min_duration_s, min_iters)
    label = os.path.basename(os.fspath(path))
    common = {"warmup_s": warmup_s, "min_duration_s": min_duration_s, "min_iters": min_iters, "max_iters": max_iters}
    if device in ("cuda", "tensorrt"):
        from cascadec.device_runners import OrtDeviceRunner

        if not os.path.isfile(path):
            raise UserError(f"ONNX model not found: {path}")
        if input_shape is None:
            input_shape = OrtRunner(path).static_input_shape()  # CPU session: only to read the graph
        shape = _check_shape(input_shape)
        runner = OrtDeviceRunner(path, shape, provider=device, threads=threads, cache_dir=cache_dir)
        return profile_device(runner.bind, shape, batches, label=label, progress=progress, seed=seed,
                              keep_samples=keep_samples, **common)
    if device != "cpu":
        raise UserError(f"onnxruntime profile device {device!r}: use cpu, cuda or tensorrt")
    runner = OrtRunner(path, device="cpu", threads=threads)
    shape = _check_shape(input_shape if input_shape is not None else runner.static_input_shape())
    rng = np.random.default_rng(seed)

    def per_batch(b: int) -> dict:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        runner.check_input(x.shape)
        session, feed, outputs = runner.session, {runner.input_name: x}, [runner.output_name]
        return summarize(measure(lambda: session.run(outputs, feed), **common), b, keep_samples=keep_samples)

    return _run_protocol(label, per_batch, batches, progress)


def profile_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    cuda_graph: bool = False,
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
) -> dict[int, dict]:
    """Latency of PyTorch, same protocol and output as :func:`profile_onnx`.

    On CUDA the model runs from static device buffers (optionally as a captured CUDA graph,
    which removes per-kernel launch overhead) with the host/compute split.
    """
    batches = _check_protocol(batches, warmup_s, min_duration_s, min_iters)
    shape = _check_shape(input_shape)
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    if cuda_graph and dev.type != "cuda":
        raise UserError("--cuda-graph needs a CUDA device")
    common = {"warmup_s": warmup_s, "min_duration_s": min_duration_s, "min_iters": min_iters, "max_iters": max_iters}
    label = type(model).__name__
    if dev.type == "cuda":
        from cascadec.device_runners import TorchCudaRunner

        def make_runner(b: int) -> DeviceRunner:
            return TorchCudaRunner(model, (b, *shape), device=dev, cuda_graph=cuda_graph)

        return profile_device(make_runner, shape, batches, label=label, progress=progress, seed=seed,
                              keep_samples=keep_samples, **common)
    model = model.to(dev).eval()
    gen = torch.Generator().manual_seed(seed)

    def per_batch(b: int) -> dict:
        x = torch.randn((b, *shape), generator=gen)

        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return summarize(measure(call, **common), b, keep_samples=keep_samples)

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_protocol(label, per_batch, batches, progress)
    finally:
        torch.set_num_threads(previous)


def profile_tensorrt(
    engine_path: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cuda",
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    max_iters: int | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> dict[int, dict]:
    """Latency of a serialized TensorRT engine (``.plan``) through ``TrtRunner``; one runner
    (one execution context) serves every batch size, its optimisation profile permitting.
    ``clock``/``new_event`` exist for tests (a fake clock and fake CUDA events)."""
    from cascadec.backends.tensorrt_backend import require_tensorrt

    require_tensorrt(gpu=True)
    if not os.path.isfile(engine_path):
        raise UserError(f"{engine_path}: TensorRT engine not found; build it with cascadec export RUN --trt")
    from cascadec.backends.tensorrt_backend import TrtRunner

    runner = TrtRunner(engine_path, device=device)
    if input_shape is None:
        input_shape = tuple(int(d) for d in runner.input_shape)  # TrtRunner's shape excludes the batch axis
    return profile_device(lambda b: runner, input_shape, batches, label=os.path.basename(os.fspath(engine_path)),
                          warmup_s=warmup_s, min_duration_s=min_duration_s, min_iters=min_iters, max_iters=max_iters,
                          progress=progress, seed=seed, clock=clock, new_event=new_event, keep_samples=keep_samples)


def profile_backend(
    backend: str,
    *,
    input_shape: Sequence[int] | None,
    batches: Sequence[int],
    onnx_path: str | os.PathLike[str] | None = None,
    model: nn.Module | None = None,
    engine_path: str | os.PathLike[str] | None = None,
    warmup_s: float = MIN_WARMUP_S,
    min_duration_s: float = DEFAULT_DURATION_S,
    min_iters: int = DEFAULT_MIN_ITERS,
    threads: int | None = None,
    cuda_graph: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_samples: bool = False,
) -> dict[int, dict]:
    """One model on one profile backend; the backend says which of onnx_path/model/engine_path it reads."""
    backend = resolve_backend(backend)
    kind, where = PROFILE_BACKENDS[backend]
    if cuda_graph and backend != "torch-cuda":
        raise UserError(f"CUDA graphs apply to the torch-cuda backend, not {backend}")
    common = {"warmup_s": warmup_s, "min_duration_s": min_duration_s, "min_iters": min_iters, "progress": progress,
              "keep_samples": keep_samples}
    if kind == "onnx":
        if onnx_path is None:
            raise UserError(f"the {backend} backend needs an ONNX file")
        return profile_onnx(onnx_path, input_shape, batches, device=where, threads=threads if where == "cpu" else None,
                            cache_dir=cache_dir, **common)
    if kind == "torch":
        if model is None:
            raise UserError(f"the {backend} backend needs a PyTorch model")
        return profile_torch(model, input_shape, batches, device=where, cuda_graph=cuda_graph,
                             threads=threads if where == "cpu" else None, **common)
    if engine_path is None:
        raise UserError("the tensorrt backend needs an engine (build one with cascadec export RUN --trt)")
    return profile_tensorrt(engine_path, input_shape, batches, **common)


def compare(teacher_prof: Mapping, student_prof: Mapping) -> dict[int, float]:
    """Per-batch speed-up, teacher p50 / student p50, over the batches both profiles have.

    Keys may be ints (fresh profiles) or strings (profiles read back from report.json).
    """
    teacher = {int(k): v for k, v in teacher_prof.items() if str(k).isdigit()}
    student = {int(k): v for k, v in student_prof.items() if str(k).isdigit()}
    speedups: dict[int, float] = {}
    for b in sorted(teacher.keys() & student.keys()):
        t, s = teacher[b].get("p50_ms"), student[b].get("p50_ms")
        if t is not None and s:
            speedups[b] = float(t) / float(s)
    return speedups


def profile_interleaved(
    profile_one: Callable[[str, float, int], Mapping[int, dict]],
    names: Sequence[str],
    *,
    rounds: int,
    min_duration_s: float,
    min_iters: int,
) -> tuple[dict[str, dict[int, dict]], dict[str, dict[int, list[float]]]]:
    """Time several models in alternation so that drift hits them alike.

    A shared or virtual CPU drifts over seconds (frequency, neighbours): timing the teacher
    for 3 s and then the student for 3 s can swing a small network's speed-up from 0.9x to
    1.5x between two identical runs. Here each model is timed ``rounds`` times, in turn, for
    ``min_duration_s / rounds`` seconds and ``ceil(min_iters / rounds)`` runs each time;
    ``profile_one(name, duration_s, min_iters)`` must return per-batch stats made with
    ``keep_samples=True``. The statistics pool every round's runs (so ``p50_ms`` is the median
    of all timed runs, ``iterations`` their count); the per-round speed-ups of every other model
    over the first (``ratios[name][batch]``, first p50 / its p50, one value per round) show how
    far a speed-up moves between rounds.
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise UserError(f"profile.rounds must be a positive integer, got {rounds!r}")
    per_round_duration = float(min_duration_s) / rounds
    per_round_iters = max(1, -(-int(min_iters) // rounds))
    samples: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in names}
    ratios: dict[str, dict[int, list[float]]] = {name: {} for name in names[1:]}
    for _ in range(rounds):
        this_round: dict[str, Mapping[int, dict]] = {}
        for name in names:
            this_round[name] = profile_one(name, per_round_duration, per_round_iters)
            for b, stats in this_round[name].items():
                if "samples_ms" not in stats:
                    raise ValueError("profile_interleaved needs per-batch stats made with keep_samples=True")
                pooled = samples[name].setdefault(int(b), {"host": [], "compute": []})
                pooled["host"] += stats["samples_ms"]
                pooled["compute"] += stats.get("compute_samples_ms", [])
        for name in names[1:]:
            for b, s in compare(this_round[names[0]], this_round[name]).items():
                ratios[name].setdefault(b, []).append(s)
    result = {
        name: {b: summarize(np.asarray(p["host"]), b, np.asarray(p["compute"]) if p["compute"] else None)
               for b, p in sorted(per_batch.items())}
        for name, per_batch in samples.items()
    }
    return result, ratios
