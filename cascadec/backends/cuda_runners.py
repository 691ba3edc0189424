"""GPU runners for the latency protocol: static device buffers, one CUDA stream each.

Every runner splits one inference into the three steps trtexec times separately:

    stage(x)   host -> device copy into the runner's input buffer (synchronous)
    compute()  enqueue the network on ``runner.stream``; no host copies, no synchronisation
    fetch()    synchronise the stream, copy the output device -> host

so that :func:`cascadec.profile.protocol.measure_device` can take the host latency (the wall time of
all three, what a caller waits for) and the compute time (CUDA events recorded on
``runner.stream`` around ``compute()``, trtexec's "GPU Compute Time") from the same run.
``cascadec.backends.tensorrt_backend.TrtRunner`` implements the same interface for engines.

None of this can run without an NVIDIA GPU; it is written against the PyTorch CUDA semantics
docs (streams, CUDA graphs) and the ONNX Runtime IOBinding / CUDA EP docs, and its logic is
tested on the CPU through fakes of the same interface (tests/test_profile.py).
The execution providers each ONNX Runtime device asks for are the ones
:data:`cascadec.backends.onnxruntime_backend.PROVIDERS` lists, for verification and timing alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cascadec.backends.onnxruntime_backend import PROVIDER_OPTIONS, PROVIDERS, require_providers
from cascadec.backends.runner import BaseRunner
from cascadec.backends.torch_backend import first_output, resolve_device
from cascadec.errors import UserError, first_line


class DeviceRunner(Protocol):
    """What :func:`cascadec.profile.protocol.measure_device` times (see the module docstring)."""

    stream: Any  # torch.cuda.Stream; anything with the same role in tests

    def stage(self, x: np.ndarray) -> None: ...

    def compute(self) -> None: ...

    def fetch(self) -> np.ndarray: ...


def require_cuda(what: str) -> torch.device:
    """CUDA device 0 through torch, or one line saying why not: events and streams come from torch."""
    if not torch.cuda.is_available():
        raise UserError(
            f"{what} needs an NVIDIA GPU, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        )
    return torch.device("cuda", torch.cuda.current_device())


class TorchCudaRunner(BaseRunner):
    """Eager PyTorch (or a captured CUDA graph of it) on one batch shape.

    The input lives in a fixed device buffer so a CUDA graph, which replays fixed addresses,
    reads each new batch; the pinned host buffer makes the H2D copy a DMA, as a server would.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_shape: Sequence[int],
        *,
        device: str | torch.device = "cuda",
        cuda_graph: bool = False,
        graph_warmup_calls: int = 3,
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type != "cuda":
            raise UserError(f"TorchCudaRunner runs on a CUDA device, not {str(self.device)!r}")
        self.model = model.to(self.device).eval()
        self.batch_shape = tuple(int(d) for d in batch_shape)
        self.stream = torch.cuda.Stream(device=self.device)
        self.host_input = torch.zeros(self.batch_shape, dtype=torch.float32).pin_memory()
        self.device_input = torch.zeros(self.batch_shape, dtype=torch.float32, device=self.device)
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self._capture(graph_warmup_calls)

    def _capture(self, warmup_calls: int) -> None:
        """Capture the forward pass as the PyTorch docs prescribe ("CUDA Graphs", whole-network
        capture): warm up on a side stream first (lazy cuDNN/cuBLAS initialisation must not
        happen during capture), then capture; replay() later reuses the same buffers."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup_calls):
                self.model(self.device_input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self.output = first_output(self.model(self.device_input))
        self.graph = graph

    def stage(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.batch_shape:
            raise UserError(f"input shape {x.shape} does not match the runner's buffer {self.batch_shape}")
        self.host_input.numpy()[...] = x
        with torch.cuda.stream(self.stream):
            self.device_input.copy_(self.host_input, non_blocking=True)
        self.stream.synchronize()

    def compute(self) -> None:
        with torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()  # launches on the current stream, i.e. self.stream
            else:
                with torch.inference_mode():
                    self.output = first_output(self.model(self.device_input))

    def fetch(self) -> np.ndarray:
        self.stream.synchronize()
        if self.output is None:
            raise RuntimeError("fetch() before compute()")
        return self.output.detach().to("cpu", torch.float32).numpy()

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.stage(x)
        self.compute()
        return self.fetch()


class OrtDeviceRunner(BaseRunner):
    """ONNX Runtime on the CUDA (or TensorRT) execution provider through IOBinding.

    Input and output are bound to device memory, so ``run_with_iobinding`` does no host copies;
    the session runs on ``self.stream`` (provider option ``user_compute_stream``, a non-default
    torch stream: ORT treats stream 0 as "none"), and the run option
    ``disable_synchronize_execution_providers`` stops ORT from waiting for the GPU at the end
    of a run, so CUDA events on that stream time the kernels and nothing else.
    ``bind(batch)`` (re)allocates the device buffers for one batch size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_shape: Sequence[int],
        *,
        provider: str = "cuda",
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if provider not in ("cuda", "tensorrt"):
            raise UserError(f"unknown onnxruntime GPU provider {provider!r}; use cuda or tensorrt")
        require_providers(provider)
        device = require_cuda(f"onnxruntime {provider}")
        self.device_id = int(device.index or 0)
        self.stream = torch.cuda.Stream(device=device)
        stream_options = {
            "device_id": str(self.device_id),
            "has_user_compute_stream": "1",
            "user_compute_stream": str(self.stream.cuda_stream),
        }
        providers: list[Any] = []
        for name in PROVIDERS[provider]:
            if name == "CPUExecutionProvider":
                providers.append(name)
            elif name == "TensorrtExecutionProvider":
                trt_options = dict(stream_options)
                if cache_dir is not None:  # engines are built per input shape; keep them between runs
                    trt_options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir))
                providers.append((name, trt_options))
            else:  # the CUDA provider: TF32 off (PROVIDER_OPTIONS), as for every fp32 session
                providers.append((name, {**stream_options, **PROVIDER_OPTIONS.get(name, {})}))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load {path} on {provider}: {first_line(exc)}") from exc
        wanted = PROVIDERS[provider][0]
        if wanted not in self.session.get_providers():
            raise UserError(
                f"onnxruntime could not initialise {wanted} for {path} (CUDA/cuDNN/TensorRT libraries missing?)"
            )
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]
        self.output_name, self.output_dims, self.output_type = output.name, list(output.shape), output.type
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.io: Any = None
        self.device_input: Any = None

    def bind(self, batch: int) -> OrtDeviceRunner:
        self.device_input = ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, *self.sample_shape), np.float32, "cuda", self.device_id
        )
        self.io = self.session.io_binding()
        self.io.bind_ortvalue_input(self.input_name, self.device_input)
        rest = self.output_dims[1:]
        if self.output_type == "tensor(float)" and all(isinstance(d, int) for d in rest):
            self.device_output = ort.OrtValue.ortvalue_from_shape_and_type(
                (batch, *rest), np.float32, "cuda", self.device_id
            )
            self.io.bind_ortvalue_output(self.output_name, self.device_output)
        else:  # shape or type not static: ORT allocates the output on the device each run
            self.io.bind_output(self.output_name, "cuda", self.device_id)
        return self

    def stage(self, x: np.ndarray) -> None:
        if self.io is None:
            self.bind(int(x.shape[0]))
        self.device_input.update_inplace(np.ascontiguousarray(x, dtype=np.float32))
        # update_inplace copies with cudaMemcpy on the legacy default stream, which returns once a
        # pageable source is staged, not once it has landed; the session computes on self.stream,
        # which does not wait for stream 0: wait here, so compute never reads a half-copied input
        torch.cuda.default_stream(self.stream.device).synchronize()

    def compute(self) -> None:
        self.session.run_with_iobinding(self.io, self.run_options)

    def fetch(self) -> np.ndarray:
        self.stream.synchronize()
        return self.io.copy_outputs_to_cpu()[0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.device_input is None or tuple(self.device_input.shape()) != tuple(x.shape):
            self.bind(int(x.shape[0]))
        self.stage(x)
        self.compute()
        return self.fetch()
