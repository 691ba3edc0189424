"""The latency protocol: trtexec-style timing, the same for every backend.

Every model is timed the same way (warm-up for a fixed time, then at least
``min_iters`` runs and at least ``min_duration_s`` seconds, one synchronous call
per sample, ``time.perf_counter`` around the call only) so that teacher/student
speed-ups compare like with like. Percentiles, not means, are reported because
a single scheduler hiccup moves a mean but not a p50.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec.backends.onnxruntime_backend import OrtRunner
from cascadec.backends.torch_backend import resolve_device
from cascadec.errors import UserError

FIELDS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "iterations", "throughput")


def _check_protocol(batches: Sequence[int], warmup_s: float, min_duration_s: float, min_iters: int) -> list[int]:
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise UserError(f"batch sizes must be positive integers, got {batches}")
    if warmup_s < 0 or min_duration_s < 0:
        raise UserError("warmup_s and min_duration_s must be >= 0")
    if not isinstance(min_iters, int) or min_iters < 1:
        raise UserError(f"min_iters must be a positive integer, got {min_iters!r}")
    return list(dict.fromkeys(batches))


def _check_shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None or not len(shape) or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"input shape without batch must be positive integers like (3, 224, 224), got {shape}")
    return tuple(shape)


def measure(
    fn: Callable[[], object],
    *,
    warmup_s: float = 0.2,
    min_duration_s: float = 1.0,
    min_iters: int = 10,
    max_iters: int | None = None,
) -> np.ndarray:
    """Time ``fn`` per call in milliseconds after a time-based warm-up."""
    fn()  # at least one warm-up call: first runs allocate and pick kernels
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - started < min_duration_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if max_iters is not None and len(times) >= max_iters:
            break
    return np.asarray(times, dtype=np.float64)


def summarize(times_ms: np.ndarray, batch: int) -> dict:
    """Per-batch statistics in the fixed report format."""
    p50, p90, p95, p99 = np.percentile(times_ms, [50, 90, 95, 99])
    mean = float(times_ms.mean())
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "min_ms": float(times_ms.min()),
        "max_ms": float(times_ms.max()),
        "std_ms": float(times_ms.std()),
        "iterations": int(times_ms.size),
        "throughput": float(batch * 1e3 / mean) if mean > 0 else float("inf"),
    }


def _run_protocol(
    label: str,
    make_fn: Callable[[int], Callable[[], object]],
    batches: list[int],
    *,
    warmup_s: float,
    min_duration_s: float,
    min_iters: int,
    max_iters: int | None,
    progress: bool,
) -> dict[int, dict]:
    results: dict[int, dict] = {}
    columns = (TextColumn(f"latency {label}" + " bs={task.fields[batch]}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("profile", total=len(batches), batch=batches[0])
        for b in batches:
            bar.update(task, batch=b)
            times = measure(make_fn(b), warmup_s=warmup_s, min_duration_s=min_duration_s, min_iters=min_iters,
                            max_iters=max_iters)
            results[b] = summarize(times, b)
            bar.advance(task)
    return results


def profile_onnx(
    path: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    warmup_s: float = 0.2,
    min_duration_s: float = 1.0,
    min_iters: int = 10,
    max_iters: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[int, dict]:
    """Latency of an ONNX file under ONNX Runtime, per batch size.

    ``input_shape`` excludes the batch axis; ``None`` reads it from the graph
    when the graph fixes it. Times cover ``session.run`` only, with the feed
    prepared beforehand, which is what a serving loop pays per request.
    """
    batches = _check_protocol(batches, warmup_s, min_duration_s, min_iters)
    runner = OrtRunner(path, device=device, threads=threads)
    shape = _check_shape(input_shape if input_shape is not None else runner.static_input_shape())
    rng = np.random.default_rng(seed)

    def make_fn(b: int) -> Callable[[], object]:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        runner.check_input(x.shape)
        session, feed, outputs = runner.session, {runner.input_name: x}, [runner.output_name]
        return lambda: session.run(outputs, feed)

    return _run_protocol(os.path.basename(os.fspath(path)), make_fn, batches, warmup_s=warmup_s, min_duration_s=min_duration_s,
                         min_iters=min_iters, max_iters=max_iters, progress=progress)


def profile_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    warmup_s: float = 0.2,
    min_duration_s: float = 1.0,
    min_iters: int = 10,
    max_iters: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[int, dict]:
    """Latency of eager PyTorch, same protocol and output as :func:`profile_onnx`.

    On CUDA each call synchronises, so the time is the kernel time the caller waits for.
    """
    batches = _check_protocol(batches, warmup_s, min_duration_s, min_iters)
    shape = _check_shape(input_shape)
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    model = model.to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def make_fn(b: int) -> Callable[[], object]:
        x = torch.randn((b, *shape), generator=gen).to(dev)

        def call() -> object:
            with torch.inference_mode():
                out = model(x)
            sync()
            return out

        return call

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_protocol(type(model).__name__, make_fn, batches, warmup_s=warmup_s,
                             min_duration_s=min_duration_s, min_iters=min_iters, max_iters=max_iters,
                             progress=progress)
    finally:
        torch.set_num_threads(previous)


def compare(teacher_prof: Mapping, student_prof: Mapping) -> dict[int, float]:
    """Per-batch speed-up, teacher p50 / student p50, over the batches both profiles have.

    Keys may be ints (fresh profiles) or strings (profiles read back from report.json).
    """
    teacher = {int(k): v for k, v in teacher_prof.items()}
    student = {int(k): v for k, v in student_prof.items()}
    speedups: dict[int, float] = {}
    for b in sorted(teacher.keys() & student.keys()):
        t, s = teacher[b].get("p50_ms"), student[b].get("p50_ms")
        if t is not None and s:
            speedups[b] = float(t) / float(s)
    return speedups
