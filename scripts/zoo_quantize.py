"""INT8 coverage: does every torchvision classifier that passes the zoo coverage quantize?

For each model that ``scripts/zoo_coverage.py`` recorded as passing (bench/results/zoo-coverage.json),
at the image size it used there, a fresh subprocess (its own process group, a wall-clock timeout,
an address-space limit) runs the quantize stage's own functions on the unpruned network with random
weights: ONNX export, ``quant_pre_process``, both INT8 flavours (ONNX Runtime U8S8, TensorRT S8S8)
calibrated on 16 random images, ``onnx.checker``, inference on ONNX Runtime's CPU provider, a count
of the int8 kernels ORT's optimised graph runs, and a short latency (batch 1, FP32 and INT8). A
``UserError`` is a refusal with its one line; anything else (a traceback) is a failure.

The pruned students the zoo coverage builds quantize through the same functions; the unpruned
network is used here so the sweep needs no training (an hour less on this machine).

    python scripts/zoo_quantize.py [--models a,b] [--resume] [--timeout 600]

Results: bench/results/zoo-quantize.json (after every model) and docs/zoo-quantize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "bench" / "results" / "zoo-coverage.json"
JSON_PATH = ROOT / "bench" / "results" / "zoo-quantize.json"
MD_PATH = ROOT / "docs" / "zoo-quantize.md"
MEMORY_LIMIT = 16 << 30


def child(name: str, size: int, out: Path) -> None:
    import numpy as np
    import torch

    from cascadec.backends.onnx_export import export_onnx
    from cascadec.backends.onnxruntime_backend import OrtRunner
    from cascadec.errors import UserError, first_line
    from cascadec.models import create_model
    from cascadec.profile.engines import profile_onnx
    from cascadec.profile.protocol import Timing
    from cascadec.quantize.flavours import FLAVOURS, resolve_reduce_range
    from cascadec.quantize.ptq import int8_kernel_count, ort_kernels, prepare, quantize_int8

    row: dict = {"model": name, "image_size": size}
    stage = "build"
    try:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = create_model(name).eval()
            x = torch.randn(2, 3, size, size)
            stage = "export"
            export_onnx(model, x[:1], work / "fp32.onnx", opset=18, slim=True)
            stage = "prepare"
            row["prepared"] = prepare(work / "fp32.onnx", work / "prepared.onnx")
            images = np.random.default_rng(0).standard_normal((16, 3, size, size), dtype=np.float32)
            cache = work / "calibration.json"
            fp32 = OrtRunner(work / "fp32.onnx")(x.numpy())
            for flavour in FLAVOURS.values():
                stage = f"quantize ({flavour.name})"
                graph = quantize_int8(
                    work / "prepared.onnx",
                    work / flavour.file,
                    flavour,
                    images,
                    cache=cache,
                    reduce_range=resolve_reduce_range("auto"),  # as the stage builds it on this CPU
                )
                stage = f"run ({flavour.name})"
                out_q = OrtRunner(work / flavour.file)(x.numpy())
                row[flavour.name] = {
                    "int8_layers": graph["int8_layers"],
                    "float_layers": len(graph["float_layers"]),
                    "finite": bool(np.isfinite(out_q).all()),
                    "max_abs_diff": float(np.abs(out_q - fp32).max()),
                }
            stage = "kernels"
            kernels = ort_kernels(work / FLAVOURS["onnxruntime"].file)
            row["ort_int8_kernels"] = int8_kernel_count(kernels)
            stage = "time"
            timing = Timing(warmup_s=0.2, min_duration_s=0.5, min_iters=5)
            p = {
                k: profile_onnx(work / f, batches=[1], timing=timing, progress=False)[1]["p50_ms"]
                for k, f in (("fp32", "fp32.onnx"), ("int8", FLAVOURS["onnxruntime"].file))
            }
            row.update(fp32_ms=p["fp32"], int8_ms=p["int8"], speedup=p["fp32"] / p["int8"])
            row["status"] = "pass" if all(row[f]["finite"] for f in FLAVOURS) else "failed"
            if row["status"] == "failed":
                row["reason"] = "non-finite INT8 outputs"
    except UserError as exc:
        row.update(status="refused", stage=stage, reason=first_line(exc))
    except Exception as exc:  # noqa: BLE001 - a traceback is what this sweep counts
        row.update(status="failed", stage=stage, reason=f"{type(exc).__name__}: {first_line(exc)}")
        row["traceback"] = traceback.format_exc()[-2000:]
    out.write_text(json.dumps(row))


def run_one(name: str, size: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"

        def preexec() -> None:
            os.setsid()
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

        start = time.monotonic()
        env = {**os.environ, "CASCADEC_NO_PROGRESS": "1"}
        cmd = [sys.executable, __file__, "--child", name, "--size", str(size), "--out", str(out)]
        proc = subprocess.Popen(cmd, preexec_fn=preexec, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"model": name, "image_size": size, "status": "failed", "reason": f"killed after {timeout:.0f} s"}
        if not out.is_file():
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return {
                "model": name,
                "image_size": size,
                "status": "failed",
                "reason": f"exit {proc.returncode}: {tail[0][:200]}",
            }
        row = json.loads(out.read_text())
        row["seconds"] = round(time.monotonic() - start, 1)
        return row


def markdown(data: dict) -> str:
    rows = data["results"]
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("pass", "refused", "failed")}
    lines = [
        "# INT8 coverage of the torchvision zoo",
        "",
        "Written by `python scripts/zoo_quantize.py` (its docstring has the protocol): every classifier that passes",
        "the zoo coverage ([zoo-coverage.md](zoo-coverage.md)), unpruned with random weights at that run's image",
        "size, through the quantize stage's functions: both INT8 flavours, `onnx.checker`, ONNX Runtime CPU,",
        "int8 kernels in ORT's optimised graph, batch-1 p50 (0.5 s per model: indicative only; small images).",
        "",
        f"Run: {data.get('run', '')}",
        "",
        f"**{counts['pass']} pass, {counts['refused']} refused with one line, {counts['failed']} failed** "
        f"of {len(rows)} models{' (sweep unfinished)' if data.get('unfinished') else ''}.",
        "",
        "| model | px | status | int8 layers (ORT / TRT flavour) | float layers | ORT int8 kernels | FP32 ms | INT8 ms | speed-up | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(rows.items()):
        o, t = r.get("onnxruntime") or {}, r.get("tensorrt") or {}
        lines.append(
            f"| {name} | {r.get('image_size')} | {r['status']} | {o.get('int8_layers', '')} / {t.get('int8_layers', '')} | "
            f"{o.get('float_layers', '')} | {r.get('ort_int8_kernels', '')} | "
            + (f"{r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['speedup']:.2f}x" if "speedup" in r else " | | ")
            + f" | {r.get('reason', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--size", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.out)
        return
    zoo = json.loads(ZOO.read_text())["results"]
    names = [n for n, r in zoo.items() if r.get("status") == "pass"]
    if args.models:
        names = [n for n in names if n in args.models.split(",")]
    data = json.loads(JSON_PATH.read_text()) if args.resume and JSON_PATH.is_file() else {"results": {}}
    data["run"] = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python scripts/zoo_quantize.py {' '.join(sys.argv[1:])}`"
    )
    for i, name in enumerate(names):
        if name in data["results"]:
            continue
        data["unfinished"] = True
        data["results"][name] = run_one(name, int(zoo[name]["image_size"]), args.timeout)
        print(
            f"[{i + 1}/{len(names)}] {name}: {data['results'][name]['status']} {data['results'][name].get('reason', '')}",
            flush=True,
        )
        data["unfinished"] = len(data["results"]) < len(names)
        JSON_PATH.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        MD_PATH.write_text(markdown(data))


if __name__ == "__main__":
    main()
