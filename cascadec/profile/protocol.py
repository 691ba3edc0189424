"""The latency protocol: trtexec's conventions, the same for every backend.

This module is how a number is taken (loop, statistics, the record stored next to them,
interleaved rounds, speed-ups); :mod:`cascadec.profile.engines` wires each backend to it.

Per model and batch size: warm up for at least ``MIN_WARMUP_S`` (200 ms, trtexec's
``--warmUp`` default; a shorter request is raised to it and the record says so), then time
runs until *both* ``min_iters`` runs and ``min_duration_s`` seconds (trtexec's
``--iterations`` and ``--duration``, default 3 s) have passed. Inputs are random, prepared
before timing. Percentiles, not means, drive the speed-ups, because one scheduler hiccup
moves a mean but not a p50.

On the CPU one number exists per run: the wall time of the call (``time.perf_counter``).
On a GPU a run is split as trtexec splits it (see :mod:`cascadec.backends.cuda_runners`):
*host latency* is the wall time of H2D copy + compute + D2H copy (trtexec's "Latency", what a
caller waits for) and is what ``p50_ms`` etc. hold; *compute time* is CUDA events recorded on
the runner's stream around the enqueue (trtexec's "GPU Compute Time") and lands in
``compute_*`` fields next to the same statistics under ``host_*``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from cascadec.backends.cuda_runners import DeviceRunner
from cascadec.errors import UserError
from cascadec.profile.defaults import DEFAULT_DURATION_S, DEFAULT_MIN_ITERS, MIN_WARMUP_S
from cascadec.profile.results import compare  # noqa: F401  (re-exported: the speed-up, one home)

STATS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms")
FIELDS = (*STATS, "iterations", "throughput")
HOST_FIELDS = tuple(f"host_{s}" for s in STATS)
COMPUTE_FIELDS = tuple(f"compute_{s}" for s in STATS)

Clock = Callable[[], float]


def effective_warmup(warmup_s: float) -> float:
    """The warm-up actually used: never below trtexec's 200 ms, which first-call allocation,
    kernel selection and CPU frequency ramp-up need."""
    if not isinstance(warmup_s, (int, float)) or isinstance(warmup_s, bool) or not warmup_s >= 0:
        raise UserError(f"warmup_s must be a number >= 0, got {warmup_s!r}")
    return max(float(warmup_s), MIN_WARMUP_S)


@dataclass(frozen=True)
class Timing:
    """How long and how often one batch size is timed: trtexec's ``--warmUp`` (raised to its
    200 ms minimum), ``--duration`` and ``--iterations`` (both must be met), and an optional
    cap on timed runs. Checked when made, so a bad value never reaches a timed loop."""

    warmup_s: float = MIN_WARMUP_S
    min_duration_s: float = DEFAULT_DURATION_S
    min_iters: int = DEFAULT_MIN_ITERS
    max_iters: int | None = None

    def __post_init__(self) -> None:
        effective_warmup(self.warmup_s)
        if not isinstance(self.min_duration_s, (int, float)) or not self.min_duration_s >= 0:
            raise UserError(f"min_duration_s must be a number >= 0, got {self.min_duration_s!r}")
        if not isinstance(self.min_iters, int) or isinstance(self.min_iters, bool) or self.min_iters < 1:
            raise UserError(f"min_iters must be a positive integer, got {self.min_iters!r}")

    def share(self, rounds: int) -> Timing:
        """One of ``rounds`` interleaved rounds: its share of the duration and of the runs."""
        return replace(
            self,
            min_duration_s=float(self.min_duration_s) / rounds,
            min_iters=max(1, -(-int(self.min_iters) // rounds)),
        )


def check_batches(batches: Sequence[int]) -> list[int]:
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise UserError(f"batch sizes must be positive integers, got {batches}")
    return list(dict.fromkeys(batches))


def check_shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None or not len(shape) or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"input shape without batch must be positive integers like (3, 224, 224), got {shape}")
    return tuple(shape)


def _loop(once: Callable[[], Any], timing: Timing, clock: Clock, warm_calls: int | None = None) -> list[Any]:
    """The protocol's loop: one untimed call, warm-up by time, then until min_iters AND duration.
    ``warm_calls`` replaces the first call and the timed warm-up with that many untimed calls."""
    if warm_calls is not None:
        for _ in range(warm_calls):
            once()
    else:
        once()  # first runs allocate and pick kernels; never part of the warm-up budget's average
        end = clock() + effective_warmup(timing.warmup_s)
        while clock() < end:
            once()
    samples: list[Any] = []
    started = clock()
    while len(samples) < timing.min_iters or clock() - started < timing.min_duration_s:
        samples.append(once())
        if timing.max_iters is not None and len(samples) >= timing.max_iters:
            break
    return samples


def measure(
    fn: Callable[[], object],
    timing: Timing = Timing(),
    *,
    clock: Clock = time.perf_counter,
    warm_calls: int | None = None,
) -> np.ndarray:
    """Wall time of ``fn`` per call in milliseconds, under the protocol (host-only timing).

    ``warm_calls`` is for callers that time hundreds of small graphs on a session they warmed
    once (the latency table's grid points): a few untimed calls instead of 200 ms each."""

    def once() -> float:
        t0 = clock()
        fn()
        return (clock() - t0) * 1e3

    return np.asarray(_loop(once, timing, clock, warm_calls), dtype=np.float64)


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def measure_device(
    runner: DeviceRunner,
    x: np.ndarray,
    timing: Timing = Timing(),
    *,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> tuple[np.ndarray, np.ndarray]:
    """(host latency ms, compute ms) per run of a :class:`~cascadec.backends.cuda_runners.DeviceRunner`.

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

    pairs = _loop(once, timing, clock)
    host, compute = zip(*pairs)
    return np.asarray(host, dtype=np.float64), np.asarray(compute, dtype=np.float64)


def _stats(times_ms: np.ndarray, prefix: str = "") -> dict[str, float]:
    p50, p90, p95, p99 = np.percentile(times_ms, [50, 90, 95, 99])
    values = (p50, p90, p95, p99, times_ms.mean(), times_ms.min(), times_ms.max(), times_ms.std())
    return {f"{prefix}{key}": float(v) for key, v in zip(STATS, values)}


def summarize(
    times_ms: np.ndarray, batch: int, compute_ms: np.ndarray | None = None, *, keep_samples: bool = False
) -> dict:
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
    *, backend: str, device: str, timing: Timing, threads: int | None = None, cuda_graph: bool = False, rounds: int = 1
) -> dict:
    """How the numbers were taken, stored next to them (report.json ``latency.<backend>.protocol``)."""
    warmup_s = timing.warmup_s
    used = effective_warmup(warmup_s)
    gpu = device != "cpu"
    record = {
        "backend": backend,
        "device": device,
        "warmup_s": used,
        "duration_s": float(timing.min_duration_s),
        "min_iters": int(timing.min_iters),
        "max_iters": timing.max_iters,
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


def profile_interleaved(
    profile_one: Callable[[str, Timing], Mapping[int, dict]], names: Sequence[str], *, rounds: int, timing: Timing
) -> tuple[dict[str, dict[int, dict]], dict[str, dict[int, list[float]]]]:
    """Time several models in alternation so that drift hits them alike.

    A shared or virtual CPU drifts over seconds (frequency, neighbours): timing the teacher
    for 3 s and then the student for 3 s can swing a small network's speed-up from 0.9x to
    1.5x between two identical runs. Here each model is timed ``rounds`` times, in turn, for
    ``min_duration_s / rounds`` seconds and ``ceil(min_iters / rounds)`` runs each time
    (:meth:`Timing.share`); ``profile_one(name, timing)`` must return per-batch stats made with
    ``keep_samples=True``. The statistics pool every round's runs (so ``p50_ms`` is the median
    of all timed runs, ``iterations`` their count); the per-round speed-ups of every other model
    over the first (``ratios[name][batch]``, first p50 / its p50, one value per round) show how
    far a speed-up moves between rounds.
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise UserError(f"profile.rounds must be a positive integer, got {rounds!r}")
    per_round = timing.share(rounds)
    samples: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in names}
    ratios: dict[str, dict[int, list[float]]] = {name: {} for name in names[1:]}
    for _ in range(rounds):
        this_round: dict[str, Mapping[int, dict]] = {}
        for name in names:
            this_round[name] = profile_one(name, per_round)
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
        name: {
            b: summarize(np.asarray(p["host"]), b, np.asarray(p["compute"]) if p["compute"] else None)
            for b, p in sorted(per_batch.items())
        }
        for name, per_batch in samples.items()
    }
    return result, ratios
