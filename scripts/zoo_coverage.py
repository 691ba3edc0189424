"""Whole-zoo coverage: every torchvision classification model through the real pipeline.

For each model in ``torchvision.models.list_models(module=torchvision.models)``, a fresh
subprocess (so a crash, a hang or an out-of-memory kill takes down only that model) runs:

1. the smallest input size the model accepts (a forward pass at 32, 64, 96, ... px);
2. ``inspect`` (:func:`cascadec.preflight.inspect_model` with the recipe): dependency
   analysis and the target's widths, no data, no training. A ``UserError`` here is a
   clean *refusal*: the model is refused before anything is trained;
3. ``compress`` (:func:`cascadec.stages.compress`) with ``recipes/zoo_smoke.yaml``: random
   weights, synthetic images, the cascade with one TA for two steps per phase, shrink,
   ONNX export of teacher and student, ORT parity, a minimal profile;
4. ``verify`` (:func:`cascadec.commands.verify_run`): the student reloaded from the run
   directory's pickle-free artifacts, checked against its ONNX graph on ONNX Runtime.

Each child runs under a wall-clock timeout (killed with its whole process group) and an
address-space limit (``RLIMIT_AS``, set before exec: torch allocations then fail with
MemoryError instead of dragging the machine into swap or the OOM killer). Models over
``--max-params`` are not run at all and are reported as "not run here", which counts
neither as pass nor as fail.

Results go to ``bench/results/zoo-coverage.json`` (updated after every model, so
``--resume`` continues an interrupted sweep) and ``docs/zoo-coverage.md``.

    python scripts/zoo_coverage.py                       # the whole zoo
    python scripts/zoo_coverage.py --models resnet18,swin_t --timeout 600
    python scripts/zoo_coverage.py --resume              # skip models already recorded
    python scripts/zoo_coverage.py --markdown-only       # rewrite the table from the JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "zoo-coverage.json"
DEFAULT_MD = REPO / "docs" / "zoo-coverage.md"
DEFAULT_RECIPE = REPO / "recipes" / "zoo_smoke.yaml"
# Input sizes tried smallest first: the cost of analysis, training and export grows with
# the pixels; ViT/MaxViT only take the 224 px they were built for. 32 px is left out on
# purpose: most ImageNet CNNs then end in 1x1 feature maps, BatchNorm's batch statistics
# over 4 images become degenerate and two training steps already blow the running
# variance up (MNASNet: NaN loss; EfficientNet: logits of 1e11 in eval mode).
CANDIDATE_SIZES = (64, 96, 128, 160, 224, 299)
NUM_CLASSES = 10
GOAL = 0.90
STATUSES = ("pass", "refused", "failed", "not_run")


# ---------------------------------------------------------------- child: one model


def _write(result: dict, path: Path) -> None:
    """Written after every step, so a killed child still tells how far it got."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def _count_params(name: str) -> int:
    """Parameters of the ImageNet (1000-class) model, from torchvision's weights metadata:
    nothing is built (the meta device cannot build RegNets, whose widths are computed
    with tensor ops, and building the largest models for real takes GiBs)."""
    import torchvision.models as tvm

    return max(w.meta["num_params"] for w in tvm.get_model_weights(name))


def _smallest_size(name: str) -> tuple[int | None, str]:
    """The smallest candidate input size the randomly initialised model runs on."""
    import torch

    from cascadec.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    last = ""
    for size in CANDIDATE_SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, size, size))
            return size, ""
        except Exception as exc:  # noqa: BLE001 - probing: any error means "not this size"
            last = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None, last


def _masked_vs_shrunk(name: str, size: int) -> float:
    """Relative max |masked - shrunk| for a random mask at 30 % fewer FLOPs.

    Parity of the ONNX graph against the shrunk student cannot see a wrong pruning (both
    would be wrong the same way); this can: masking a channel where the pipeline trains
    must compute exactly what removing it does. BatchNorm statistics are randomised so a
    misplaced mask would show, as in tests/test_zoo.py.
    """
    import torch

    from cascadec.models import create_model
    from cascadec.prune.cost import CostModel
    from cascadec.prune.groups import build_groups
    from cascadec.prune.masks import masked
    from cascadec.prune.shrink import shrink
    from cascadec.prune.targets import Budget, MaskSolver
    from cascadec.prune.trial import randomise_batchnorm

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = randomise_batchnorm(create_model(name, num_classes=NUM_CLASSES).eval())
    x = torch.randn(2, 3, size, size, generator=gen)
    index = build_groups(model, x[:1])
    if not index.groups:
        return 0.0
    cost = CostModel.build(model, index, x[:1])
    keep = MaskSolver(index, cost).solve(
        torch.rand(index.num_units, generator=gen), Budget.from_target(cost, flops_reduction=0.3)
    )
    student = shrink(model, index, keep, x[:1]).eval()
    with torch.no_grad():
        with masked(model, index, keep):
            y_masked = model(x)
        y_shrunk = student(x)
    return float((y_masked - y_shrunk).abs().max() / y_shrunk.abs().max().clamp_min(1e-12))


def _gate_reason(exc: Exception) -> str:
    """The failure's headline plus the failed metrics and the conditioning verdict, on one line."""
    lines = str(exc).splitlines()
    metrics = [f["metric"] for f in getattr(exc, "failures", [])]
    keep = [lines[0].rstrip(":") + (f" ({', '.join(dict.fromkeys(metrics))})" if metrics else "")]
    keep += [ln for ln in lines if ln.startswith("conditioning")]
    return "; ".join(keep)[:400]


def run_child(name: str, result_path: Path, workdir: Path, recipe: Path, max_params: int) -> int:
    """One model through size probe -> inspect -> compress -> verify; the result is a JSON file."""
    import torch

    torch.set_num_threads(1)
    from cascadec.errors import GateFailed, UserError

    result: dict[str, Any] = {"model": name, "status": "failed", "stage": "start", "seconds": {}}
    _write(result, result_path)

    def timed(stage: str, fn):
        result["stage"] = stage
        _write(result, result_path)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            result["seconds"][stage] = round(time.perf_counter() - start, 1)
            _write(result, result_path)

    try:
        params = timed("params", lambda: _count_params(name))
        result["params"] = params
        if params > max_params:
            result.update(
                status="not_run",
                reason=(
                    f"too large for this machine: {params / 1e6:.0f} M parameters > --max-params {max_params / 1e6:.0f} M "
                    "(teacher, TA/student, gradients and optimizer state would not fit the memory bound)"
                ),
            )
            return 0
        size, why = timed("probe", lambda: _smallest_size(name))
        if size is None:
            result.update(status="failed", error="NoInputSize", reason=f"no candidate input size works: {why}")
            return 0
        result["image_size"] = size

        from cascadec.preflight import inspect_model
        from cascadec.stages import prepare_recipe

        overrides = [f"data.image_size={size}", f"model.num_classes={NUM_CLASSES}"]
        recipe_obj = prepare_recipe(name, str(recipe), overrides=overrides)
        try:
            info = timed(
                "inspect", lambda: inspect_model(name, image_size=size, num_classes=NUM_CLASSES, recipe=recipe_obj)
            )
        except UserError as exc:
            result.update(status="refused", reason=str(exc))
            return 0
        result.update(
            flops=info["flops"],
            prunable_units=info["prunable_units"],
            groups=len(info["groups"]),
            frozen_groups=len(info["frozen"]),
        )

        exact = timed("exactness", lambda: _masked_vs_shrunk(name, size))
        result["masked_vs_shrunk"] = exact
        if not exact <= 1e-4:
            result.update(
                status="failed", error="MaskedNotShrunk", reason=f"masked != shrunk: relative max|diff| {exact:.2e}"
            )
            return 0

        from cascadec.commands import verify_run
        from cascadec.stages import compress

        run_dir = workdir / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a half-finished one
        try:
            report = timed("compress", lambda: compress(name, str(recipe), out=str(run_dir), overrides=overrides))
        except GateFailed as exc:
            result.update(status="failed", error="GateFailed", reason=_gate_reason(exc))
            return 0
        except UserError as exc:
            if not run_dir.exists():  # refused by compress's own analysis, before any training
                result.update(status="refused", reason=str(exc))
            else:  # a run had started: a refusal this late is a failure
                result.update(status="failed", error="UserError", reason=f"late refusal: {exc}")
            return 0
        student = report.get("student", {})
        result["flops_reduction"] = student.get("flops_reduction")
        result["params_reduction"] = student.get("params_reduction")
        try:
            verified = timed("verify", lambda: verify_run(run_dir))
        except (GateFailed, UserError) as exc:
            result.update(status="failed", error=type(exc).__name__, reason=_gate_reason(exc))
            return 0
        ort = verified.backends["onnxruntime"].to_dict()  # a ParityResult
        result["max_abs_diff"] = ort.get("max_abs_diff")
        result["max_rel_diff"] = ort.get("max_rel_diff")
        result["top1_agreement"] = ort.get("top1_agreement")
        result["status"] = "pass" if ort.get("passed") else "failed"
        if not ort.get("passed"):
            result.update(error="ParityFailed", reason=f"max|diff| {ort.get('max_abs_diff')}")
        return 0
    except MemoryError:
        result.update(status="failed", error="MemoryError", reason=f"out of memory during {result['stage']}")
        return 0
    except Exception as exc:  # noqa: BLE001 - the runner records every failure instead of dying
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        message = str(exc).splitlines()[0] if str(exc) else ""
        if "can't allocate memory" in message or "not enough memory" in message.lower() or "bad_alloc" in message:
            result.update(status="failed", error="MemoryError", reason=f"out of memory during {result['stage']}")
        else:
            result.update(status="failed", error=type(exc).__name__, reason=f"{message[:300]} ({where})")
        return 0
    finally:
        _write(result, result_path)


# ---------------------------------------------------------------- parent: the sweep


MEMORY_SIGNS = ("memory allocation of", "can't allocate memory", "MemoryError", "std::bad_alloc")


def _limit_memory(limit_bytes: int):
    def preexec() -> None:
        os.setsid()  # its own process group: a timeout kills the child and anything it spawned
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return preexec


def run_one(
    name: str,
    args: argparse.Namespace,
    workdir: Path,
    *,
    script: Path | None = None,
    extra_args: list[str] | None = None,
) -> dict:
    """Run the child for ``name`` and turn whatever happened into one result row.

    ``script`` and ``extra_args``: another sweep (scripts/timm_coverage.py) reusing this machinery."""
    result_path = workdir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(script or Path(__file__).resolve()),
        "--child",
        name,
        "--result",
        str(result_path),
        "--workdir",
        str(workdir),
        "--recipe",
        str(args.recipe),
        *(extra_args if extra_args is not None else ["--max-params", str(int(args.max_params * 1e6))]),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CASCADEC_CACHE=str(workdir / "cache"),
    )
    log_path = workdir / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            preexec_fn=_limit_memory(int(args.memory_gb * 2**30)),
        )
        timed_out = False
        while True:  # wait4, not Popen.wait: its rusage is this child's own peak RSS
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - start > args.timeout and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
    seconds = time.monotonic() - start
    row: dict[str, Any] = {"model": name}
    if result_path.is_file():
        row.update(json.loads(result_path.read_text()))
    row["wall_seconds"] = round(seconds, 1)
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    row["exit_code"] = proc.returncode
    if timed_out:
        row.update(
            status="failed", error="Timeout", reason=f"killed after {args.timeout:.0f} s during {row.get('stage', '?')}"
        )
    elif proc.returncode != 0 and row.get("status") not in ("failed",):
        row.update(
            status="failed",
            error=f"exit {proc.returncode}",
            reason=f"child died during {row.get('stage', '?')} (see {log_path.name})",
        )
    elif proc.returncode != 0 and not row.get("error"):
        row.update(error=f"exit {proc.returncode}", reason=f"child died during {row.get('stage', '?')}")
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if proc.returncode != 0 and not timed_out and any(sign in log_text for sign in MEMORY_SIGNS):
        # a native library (safetensors, onnx, ORT) aborting on a failed allocation, or a
        # MemoryError raised again while the child was recording the first one: the RLIMIT_AS
        # bound was hit (it counts address space, which exceeds the resident peak)
        row.update(
            error="MemoryBound",
            reason=f"exceeded the {args.memory_gb:.0f} GiB address-space bound during {row.get('stage', '?')}",
        )
    if proc.returncode in (-9, 137) and not timed_out:
        row.update(error="Killed", reason=f"killed (SIGKILL, likely out of memory) during {row.get('stage', '?')}")
    return row


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": [], "results": {}}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "torch_pruning", "onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is there
            out[mod] = "missing"
    return out


def totals(results: dict[str, dict]) -> dict[str, Any]:
    counts = {s: sum(1 for r in results.values() if r.get("status") == s) for s in STATUSES}
    attempted = counts["pass"] + counts["refused"] + counts["failed"]
    counts["attempted"] = attempted
    counts["pass_rate"] = counts["pass"] / attempted if attempted else None
    return counts


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_markdown(data: dict, path: Path, all_models: list[str]) -> None:
    results: dict[str, dict] = data["results"]
    t = totals(results)
    missing = [m for m in all_models if m not in results]
    lines = [
        "# Whole-zoo coverage",
        "",
        "Every torchvision classification model (`torchvision.models.list_models(module=torchvision.models)`,",
        f"{len(all_models)} models) through the real pipeline with random weights and synthetic images:",
        "smallest accepted input size -> `inspect` (analysis, no training) -> `compress` with",
        "[`recipes/zoo_smoke.yaml`](../recipes/zoo_smoke.yaml) (cascade with 1 TA, 30 % fewer FLOPs, 2 steps per",
        "phase, shrink, ONNX export, ORT parity, profile) -> `verify` (student reloaded from its pickle-free",
        "files, checked against ONNX Runtime). Each model runs in its own process under a wall-clock",
        "timeout and an address-space limit. Accuracy is meaningless here (random weights, 2 steps);",
        "this table says whether an architecture *works*, not how well it compresses.",
        "",
        "Produced by:",
        "",
    ]
    for run in data.get("runs", []):
        lines.append(
            f"    {run['command']}    # {run['date']}" + (f", commit {run['commit']}" if run.get("commit") else "")
        )
    machines = sorted({run["machine"] for run in data.get("runs", [])})
    lines += [
        "",
        "Machine: " + "; ".join(machines) + " (shared with other jobs while it ran: the seconds",
        "are wall-clock and only indicative)",
        "",
    ]
    if data.get("runs"):
        versions = data["runs"][-1].get("versions", {})
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    rate = t["pass_rate"]
    lines += [
        "## Totals",
        "",
        f"- Recorded: {len(results)} of {len(all_models)} models"
        + (f" (not yet run: {', '.join(missing)})" if missing else ""),
        f"- **pass**: {t['pass']}; **refused** cleanly: {t['refused']}; **failed**: {t['failed']}; "
        f"**not run here** (too large for this machine): {t['not_run']}",
        f"- Pass rate over the models attempted ({t['attempted']}; not-run ones count neither way): "
        + (
            f"**{rate:.1%}**, goal {GOAL:.0%}: **{'met' if rate >= GOAL else 'not met'}**"
            if rate is not None
            else "n/a"
        )
        + (f" -- **partial**: {len(missing)} models not run yet, so this is not the zoo's rate" if missing else ""),
        "",
        "Status: *pass* = compress + export + verify succeeded and ORT parity passed; *refused* =",
        "refused at analysis, before any training, with a one-line error; *failed* = anything else",
        "(error class given); *not run* = over the parameter limit, never started.",
        "",
        "## Not passing",
        "",
        *[
            f"- `{name}` ({r.get('status')}): {(r.get('error') + ': ') if r.get('error') else ''}{r.get('reason', '')}"
            for name in all_models
            if (r := results.get(name)) is not None and r.get("status") != "pass"
        ],
        "",
        "## Per model",
        "",
        "Columns: *px* the input size used (the smallest of 64, 96, 128, 160, 224, 299 px the model",
        "accepts); *FLOPs reduction* achieved by the student (target 30 %); *masked vs shrunk* the",
        "relative max difference between the masked network and its physically shrunk copy for a",
        "random 30 % mask (BatchNorm statistics randomised); *ORT max|diff|* / *rel* the `verify`",
        "parity of the reloaded student against ONNX Runtime. With random weights and two training",
        "steps some families end with logits of 1e6 and more (BatchNorm running statistics of 4-image",
        "batches), so the absolute difference is large there while the relative one is ~1e-7; the",
        "gate (atol 1e-4, rtol 1e-3, top-1 agreement) is what decides *pass*.",
        "",
        "| model | status | px | FLOPs reduction | masked vs shrunk | ORT max\\|diff\\| | ORT rel | prunable ch. | frozen groups | seconds | peak RSS (MB) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in all_models:
        r = results.get(name)
        if r is None:
            continue
        note = r.get("reason", "") or ""
        if r.get("error"):
            note = f"{r['error']}: {note}"
        note = note.replace("|", "\\|").replace("\n", " ")[:400]
        lines.append(
            f"| {name} | {r.get('status')} | {_fmt(r.get('image_size'), 'd')} | {_fmt(r.get('flops_reduction'), '.1%')} | "
            f"{_fmt(r.get('masked_vs_shrunk'), '.0e')} | {_fmt(r.get('max_abs_diff'), '.1e')} | {_fmt(r.get('max_rel_diff'), '.0e')} | "
            f"{_fmt(r.get('prunable_units'), 'd')} | {_fmt(r.get('frozen_groups'), 'd')} | "
            f"{_fmt(r.get('wall_seconds'), '.0f')} | {_fmt(r.get('peak_rss_mb'), 'd')} | {note} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (default: every torchvision classifier)")
    parser.add_argument("--timeout", type=float, default=900, help="wall-clock seconds per model (default 900)")
    parser.add_argument("--memory-gb", type=float, default=10, help="address-space limit per model (default 10 GiB)")
    parser.add_argument(
        "--max-params",
        type=float,
        default=250,
        help="millions of parameters above which a model is not run here (default 250)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    parser.add_argument("--workdir", type=Path, help="run directories and logs (default: a temporary directory)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown table from the JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return run_child(args.child, args.result, args.workdir, args.recipe, int(args.max_params))

    import torchvision.models as tvm

    from cascadec.run import git_commit

    all_models = tvm.list_models(module=tvm)
    data = _load(args.json)
    if args.markdown_only:
        write_markdown(data, args.markdown, all_models)
        return 0
    models = [m.strip() for m in args.models.split(",")] if args.models else all_models
    unknown = [m for m in models if m not in all_models]
    if unknown:
        print(f"error: not torchvision classification models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.resume:
        models = [m for m in models if m not in data["results"]]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cascadec-zoo-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    argv_shown = sys.argv[1:] if argv is None else argv
    data["runs"].append(
        {
            "command": "python scripts/zoo_coverage.py " + shlex.join(argv_shown),
            "commit": git_commit(),  # the code the rows measured
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(),
            "versions": _versions(),
            "models": models,
            "timeout_s": args.timeout,
            "memory_gb": args.memory_gb,
            "max_params_m": args.max_params,
        }
    )
    print(f"{len(models)} models; run directories and logs in {workdir}", flush=True)

    lock = threading.Lock()  # --jobs > 1: one writer at a time

    def one(name: str) -> dict:
        row = run_one(name, args, workdir)
        with lock:
            data["results"][name] = row
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1, default=str))
            write_markdown(data, args.markdown, all_models)
        detail = (
            row.get("reason", "")
            if row["status"] != "pass"
            else f"FLOPs -{row.get('flops_reduction') or 0:.1%}, max|diff| {row.get('max_abs_diff')}"
        )
        print(
            f"{name:22s} {row['status']:8s} {row['wall_seconds']:7.1f} s {row['peak_rss_mb']:6d} MB  {detail}",
            flush=True,
        )
        return row

    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, models))
    else:
        for name in models:
            one(name)
    t = totals(data["results"])
    print(
        f"pass {t['pass']}, refused {t['refused']}, failed {t['failed']}, not run {t['not_run']}; "
        f"pass rate {t['pass_rate'] if t['pass_rate'] is None else format(t['pass_rate'], '.1%')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
