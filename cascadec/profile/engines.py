"""Backend wiring for the latency protocol: which runner each backend times, and how.

The registry (:mod:`cascadec.backends.registry`) says what a backend runs and where; this
module builds the runner for it (a CPU call, or a :class:`~cascadec.backends.cuda_runners.DeviceRunner`
on a GPU) and hands it to :mod:`cascadec.profile.protocol`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from cascadec import memory
from cascadec.backends import get_backend, tensorrt_backend
from cascadec.backends.cuda_runners import DeviceRunner, OrtDeviceRunner, TorchCudaRunner
from cascadec.backends.onnxruntime_backend import OrtRunner
from cascadec.backends.torch_backend import resolve_device
from cascadec.errors import UserError
from cascadec.profile.protocol import (
    Clock,
    Timing,
    _cuda_event,
    check_batches,
    check_shape,
    measure,
    measure_device,
    summarize,
)


def _run_protocol(label: str, per_batch: Callable[[int], dict], batches: list[int], progress: bool) -> dict[int, dict]:
    results: dict[int, dict] = {}
    columns = (
        TextColumn(f"latency {label}" + " bs={task.fields[batch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("profile", total=len(batches), batch=batches[0])
        for b in batches:
            bar.update(task, batch=b)
            results[b] = per_batch(b)
            bar.advance(task)
    return results


def _fits(per_image: int, batches: Sequence[int], label: str) -> None:
    """The largest batch's inputs and activations must fit before any buffer is allocated."""
    memory.require(per_image * max(batches), f"profiling {label} at batch {max(batches)}", "profile smaller batches")


def profile_device(
    make_runner: Callable[[int], DeviceRunner],
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    *,
    label: str = "device",
    timing: Timing = Timing(),
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> dict[int, dict]:
    """The GPU protocol over any runner: ``make_runner(batch)`` gives the runner for one batch
    size (static buffers are per shape). Stats carry the host/compute split."""
    batches = check_batches(batches)
    shape = check_shape(input_shape)
    rng = np.random.default_rng(seed)

    def per_batch(b: int) -> dict:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        host, compute = measure_device(make_runner(b), x, timing, clock=clock, new_event=new_event)
        return summarize(host, b, compute, keep_samples=keep_samples)

    return _run_protocol(label, per_batch, batches, progress)


def profile_onnx(
    path: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    timing: Timing = Timing(),
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
    batches = check_batches(batches)
    label = os.path.basename(os.fspath(path))
    if device in ("cuda", "tensorrt"):
        if not os.path.isfile(path):
            raise UserError(f"ONNX model not found: {path}")
        if input_shape is None:
            input_shape = OrtRunner(path).static_input_shape()  # CPU session: only to read the graph
        shape = check_shape(input_shape)
        _fits(memory.onnx_activation_bytes(path, shape), batches, label)
        runner = OrtDeviceRunner(path, shape, provider=device, threads=threads, cache_dir=cache_dir)
        return profile_device(
            runner.bind,
            shape,
            batches,
            timing=timing,
            label=label,
            progress=progress,
            seed=seed,
            keep_samples=keep_samples,
        )
    if device != "cpu":
        raise UserError(f"onnxruntime profile device {device!r}: use cpu, cuda or tensorrt")
    runner = OrtRunner(path, device="cpu", threads=threads)
    shape = check_shape(input_shape if input_shape is not None else runner.static_input_shape())
    _fits(memory.onnx_activation_bytes(path, shape), batches, label)
    rng = np.random.default_rng(seed)

    def per_batch(b: int) -> dict:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        runner.check_input(x.shape)
        session, feed, outputs = runner.session, {runner.input_name: x}, [runner.output_name]
        return summarize(measure(lambda: session.run(outputs, feed), timing), b, keep_samples=keep_samples)

    return _run_protocol(label, per_batch, batches, progress)


def profile_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str = "cpu",
    cuda_graph: bool = False,
    timing: Timing = Timing(),
    threads: int | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
) -> dict[int, dict]:
    """Latency of PyTorch, same protocol and output as :func:`profile_onnx`.

    On CUDA the model runs from static device buffers (optionally as a captured CUDA graph,
    which removes per-kernel launch overhead) with the host/compute split.
    """
    batches = check_batches(batches)
    shape = check_shape(input_shape)
    dev = resolve_device(device)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    if cuda_graph and dev.type != "cuda":
        raise UserError("CUDA graphs (cuda_graph) need a CUDA device")
    label = type(model).__name__
    _fits(memory.activation_bytes(model, shape), batches, label)
    if dev.type == "cuda":

        def make_runner(b: int) -> DeviceRunner:
            return TorchCudaRunner(model, (b, *shape), device=dev, cuda_graph=cuda_graph)

        return profile_device(
            make_runner,
            shape,
            batches,
            timing=timing,
            label=label,
            progress=progress,
            seed=seed,
            keep_samples=keep_samples,
        )
    model = model.to(dev).eval()
    gen = torch.Generator().manual_seed(seed)

    def per_batch(b: int) -> dict:
        x = torch.randn((b, *shape), generator=gen)

        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return summarize(measure(call, timing), b, keep_samples=keep_samples)

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
    timing: Timing = Timing(),
    progress: bool = True,
    keep_samples: bool = False,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    new_event: Callable[[], Any] = _cuda_event,
) -> dict[int, dict]:
    """Latency of a serialized TensorRT engine (``.plan``) through ``TrtRunner``; one runner
    (one execution context) serves every batch size, its optimisation profile permitting.
    ``clock``/``new_event`` exist for tests (a fake clock and fake CUDA events)."""
    get_backend("tensorrt").require()
    if not os.path.isfile(engine_path):
        raise UserError(f"{engine_path}: TensorRT engine not found; build it with cascadec export RUN --trt")
    runner = tensorrt_backend.TrtRunner(engine_path, device=device)
    if input_shape is None:
        input_shape = tuple(int(d) for d in runner.input_shape)  # TrtRunner's shape excludes the batch axis
    _fits(memory.image_bytes(input_shape), batches, os.path.basename(os.fspath(engine_path)))  # host buffers
    return profile_device(
        lambda b: runner,
        input_shape,
        batches,
        label=os.path.basename(os.fspath(engine_path)),
        timing=timing,
        progress=progress,
        seed=seed,
        clock=clock,
        new_event=new_event,
        keep_samples=keep_samples,
    )


def profile_backend(
    backend: str,
    *,
    input_shape: Sequence[int] | None,
    batches: Sequence[int],
    onnx_path: str | os.PathLike[str] | None = None,
    model: nn.Module | None = None,
    engine_path: str | os.PathLike[str] | None = None,
    timing: Timing = Timing(),
    threads: int | None = None,
    cuda_graph: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_samples: bool = False,
) -> dict[int, dict]:
    """One model on one profile backend; the backend says which of onnx_path/model/engine_path it reads."""
    spec = get_backend(backend)
    backend, kind, where = spec.name, spec.runs, spec.device
    if cuda_graph and backend != "torch-cuda":
        raise UserError(f"CUDA graphs apply to the torch-cuda backend, not {backend}")
    common = {"timing": timing, "progress": progress, "keep_samples": keep_samples}
    if kind == "onnx":
        if onnx_path is None:
            raise UserError(f"the {backend} backend needs an ONNX file")
        return profile_onnx(
            onnx_path,
            input_shape,
            batches,
            device=where,
            threads=threads if where == "cpu" else None,
            cache_dir=cache_dir,
            **common,
        )
    if kind == "torch":
        if model is None:
            raise UserError(f"the {backend} backend needs a PyTorch model")
        return profile_torch(
            model,
            input_shape,
            batches,
            device=where,
            cuda_graph=cuda_graph,
            threads=threads if where == "cpu" else None,
            **common,
        )
    if engine_path is None:
        raise UserError("the tensorrt backend needs an engine (build one with cascadec export RUN --trt)")
    return profile_tensorrt(engine_path, input_shape, batches, **common)
