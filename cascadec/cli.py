"""The ``cascadec`` command: parse, call the library, print. No logic lives here.

Exit codes: 0 success, 2 bad input (one line, no traceback), 3 a parity gate failed,
130 interrupted.

The library modules that load torch and ONNX Runtime (stages, commands, preflight, the model
registry) are imported inside the command that needs them: `cascadec --help`, a typo in a flag
or `recipes list` answer in a fraction of a second instead of the five seconds those imports
take. The modules imported at the top are the light ones (recipe schema, formatting, parity
presentation, the backend table).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional  # noqa: UP035 - typer reads these annotations at runtime on Python 3.10

import typer
from rich.console import Console
from rich.table import Table

from cascadec.backends import list_backends
from cascadec.console_tables import print_inspect, print_latency, print_parity, print_summary
from cascadec.errors import EXIT_INTERRUPTED, CascadecError, GateFailed, first_line
from cascadec.formatting import fmt_accuracy, fmt_flops, fmt_ms
from cascadec.recipe import list_recipes, load_recipe, recipe_to_yaml
from cascadec.verify.present import raise_on_failure


def _flags_show_no_type() -> None:
    """Typer 0.29's help prints a value type beside every option, flags too (``--resume <bool>``,
    ``--help <bool>``), though a flag takes no value: show none for flags. Older Typer has no
    ``display_type_rich`` and shows none already."""
    option = getattr(typer.core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_cascadec", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001, ANN202 - typer's signature
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._cascadec = True
    option.display_type_rich = display_type_rich


_flags_show_no_type()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress a pretrained CNN with cascaded channel pruning and prove it on real backends.",
)
recipes_app = typer.Typer(no_args_is_help=True, help="Shipped recipes.")
models_app = typer.Typer(no_args_is_help=True, help="Models the registry knows.")
app.add_typer(recipes_app, name="recipes")
app.add_typer(models_app, name="models")
# Off a terminal (pipes, CI logs) rich assumes 80 columns; tables then truncate names.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise typer.BadParameter(f"batch sizes must be positive integers, got {text!r}")
    return batches


def _note_unusable_device(device: str) -> None:
    """A dry run plans on any machine (a laptop, for a cluster job), so an absent GPU is a note,
    not a refusal; but it says that the run itself would stop here."""
    from cascadec.backends.torch_backend import resolve_device
    from cascadec.errors import UserError

    try:
        resolve_device(device)
    except UserError as exc:
        err.print(
            f"note: {exc}: the dry run needs none, but the run itself would stop here", highlight=False, soft_wrap=True
        )


@app.command()
def compress(
    model: str = typer.Argument(..., help="Model name (cascadec models list)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe name (cascadec recipes list) or YAML path."),
    data: Optional[str] = typer.Option(None, "--data", help="Data set root (overrides data.root)."),
    weights: Optional[str] = typer.Option(
        None,
        "--weights",
        help="torchvision weights name, .pt/.pth or .safetensors; 'random' for a randomly initialised model.",
    ),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run directory (default runs/<model>-<recipe>)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a recipe key: key.sub=value (repeatable)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show widths and FLOPs/params at the target; no data, no training."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an unfinished run: finished stages are skipped, "
        "an interrupted prune stage continues from its last checkpoint.",
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Train on N local processes (one per GPU with --device cuda) "
        "through torch.distributed.run; same as torchrun --nproc-per-node N -m cascadec compress ...",
    ),
) -> None:
    """Prune MODEL with a recipe, then export, verify and profile the student."""
    from cascadec.recipe import load_recipe

    load_recipe(recipe, list(overrides), model=model)  # a bad recipe or --set: one line at once, before torch loads
    from cascadec import stages
    from cascadec.preflight import dry_run as run_dry
    from cascadec.train.distributed import launched_by_torchrun, relaunch_compress

    if dry_run:
        resolved = stages.prepare_recipe(model, recipe, data=data, weights=stages.RANDOM_WEIGHTS, overrides=overrides)
        _note_unusable_device(device)
        print_inspect(out, run_dry(model, resolved), resolved.prune.method)
        return
    if nproc > 1 and not launched_by_torchrun():
        stages.prepare_recipe(
            model, recipe, data=data, weights=weights, overrides=overrides
        )  # bad input: one line, here
        raise typer.Exit(
            relaunch_compress(
                nproc,
                model,
                recipe,
                device=device,
                data=data,
                weights=weights,
                out=out_dir,
                overrides=overrides,
                resume=resume,
            )
        )
    try:
        report = stages.compress(
            model,
            recipe,
            data=data,
            weights=weights,
            out=out_dir,
            overrides=overrides,
            device=device,
            resume=resume,
            command=sys.argv,
        )
    except KeyboardInterrupt:
        # Typer turns KeyboardInterrupt into a silent exit 130; say what happened and how to go on
        err.print("interrupted (continue with --resume)", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if report:  # ranks other than 0 of a distributed run return no report
        print_summary(out, report)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by compress."),
    trt: bool = typer.Option(False, "--trt", help="Build TensorRT engines (needs tensorrt and an NVIDIA GPU)."),
    fp16: bool = typer.Option(
        False, "--fp16", help="TensorRT FP16 engine, strongly typed from student.fp16.onnx (written if missing)."
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="TensorRT INT8 engine, strongly typed from cascadec quantize's Q/DQ student.int8.trt.onnx.",
    ),
    int8_calibrator: bool = typer.Option(
        False,
        "--int8-calibrator",
        help="TensorRT 10's implicit INT8 calibration of student.onnx instead (deprecated there, gone in 11).",
    ),
    calib_images: int = typer.Option(512, "--calib-images", help="Training images used by --int8-calibrator."),
    triton: bool = typer.Option(False, "--triton", help="Write a Triton Inference Server model repository."),
    triton_dir: Optional[Path] = typer.Option(
        None, "--triton-dir", help="Model repository directory (default RUN_DIR/triton)."
    ),
) -> None:
    """Re-export the run's ONNX models; --trt builds a TensorRT engine, --triton a Triton model repository."""
    from cascadec.commands import export_run

    for line in export_run(
        run_dir,
        trt=trt,
        fp16=fp16,
        int8=int8,
        int8_calibrator=int8_calibrator,
        calib_images=calib_images,
        triton=triton,
        triton_dir=triton_dir,
    ):
        out.print(line, highlight=False)


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Pareto plot PNG (default ./pareto.png)."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="Latency of this backend (default: onnxruntime, else the first a run has)."
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size whose p50 is compared."),
    remeasure: bool = typer.Option(
        True,
        "--remeasure/--no-remeasure",
        help="Time every run's ONNX again, side by side in interleaved rounds (default), or read the figures "
        "each run stored when it ran.",
    ),
) -> None:
    """Compare runs: a table (model, recipe, accuracy, FLOPs, p50) and an accuracy-vs-latency Pareto plot per data set and teacher."""
    from cascadec.commands import report_runs

    result = report_runs(run_dirs, out_path, backend=backend, batch=batch, remeasure=remeasure)
    several = len(result["groups"]) > 1
    columns = ["run", "model", "recipe", "accuracy", "FLOPs", f"p50 ms (bs={batch}, {result['backend']})"]
    table = Table(*columns, *(["data / teacher"] if several else []), title="runs")
    for row in [*result["teachers"], *result["students"]]:
        table.add_row(
            Path(row["dir"]).name if row.get("dir") else row["label"],
            str(row["model"]),
            str(row.get("recipe") or ""),
            fmt_accuracy(row["accuracy"]),
            fmt_flops(row["flops"]),
            fmt_ms(row["p50_ms"]),
            *([row["group"]] if several else []),
        )
    out.print(table)
    if not several and result["groups"]:
        out.print(f"data / teacher: {result['groups'][0]}", highlight=False)
    out.print(f"latencies: {result['source']}", highlight=False)
    out.print(f"wrote {result['plot']}", highlight=False)


@app.command()
def verify(
    run_dir: Path = typer.Argument(..., help="A run directory written by compress."),
    backend: List[str] = typer.Option(
        ["onnxruntime"],
        "--backend",
        help=f"Backend to check against PyTorch (repeatable): {', '.join(list_backends())}.",
    ),
    samples: Optional[int] = typer.Option(
        None, "--samples", min=1, help="Validation images to compare (default: recipe)."
    ),
    overrides: List[str] = typer.Option(
        [], "--set", help="Override a recipe key for this check: verify.tolerances.fp16.atol=0.05 (repeatable)."
    ),
) -> None:
    """Check backends against the PyTorch student on real validation images (exit 3 on failure)."""
    from cascadec.commands import verify_run

    result = verify_run(run_dir, backends=backend, samples=samples, overrides=overrides)
    print_parity(out, result)
    raise_on_failure(result)


@app.command()
def quantize(
    run_dir: Path = typer.Argument(..., help="A run directory written by compress."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="int8 (Q/DQ per flavour, plus FP16) or fp16 (default: the recipe's, else int8)."
    ),
    calib_images: Optional[int] = typer.Option(
        None, "--calib-images", min=1, help="Training images to calibrate INT8 on (default: the recipe's, 512)."
    ),
    overrides: List[str] = typer.Option(
        [], "--set", help="Override a quantize key: quantize.calibration.method=entropy (repeatable)."
    ),
    no_profile: bool = typer.Option(False, "--no-profile", help="Skip timing teacher, student and INT8 student."),
) -> None:
    """Reduced-precision students (INT8 Q/DQ for ONNX Runtime and TensorRT, FP16), verified and timed (exit 3 on failure)."""
    from cascadec.commands import quantize_run
    from cascadec.quantize.present import quantize_summary_rows
    from cascadec.quantize.stage import raise_on_quantize_failure

    try:
        result = quantize_run(
            run_dir, precision=precision, calib_images=calib_images, overrides=overrides, profile=not no_profile
        )
    except KeyboardInterrupt:
        # QAT saved its checkpoint on the way out: the same command picks it up
        err.print(f"interrupted (run cascadec quantize {run_dir} again to resume)", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    table = Table("", "Teacher", "Student", "Change", title="cascadec quantize")
    for row in quantize_summary_rows(result):
        table.add_row(*row)
    out.print(table)
    for name, artifact in result["artifacts"].items():
        floats = artifact["graph"].get("float_layers") or []
        out.print(
            f"{name}: {run_dir / artifact['file']} ({artifact['consumer']}; selection accuracy "
            f"{fmt_accuracy(artifact['selection_accuracy'])}"
            + (f"; kept in float: {', '.join(floats)}" if floats else "")
            + ")",
            highlight=False,
        )
    raise_on_quantize_failure(result)
    if result.get("latency_target") and not result["latency_target"]["passed"]:
        raise GateFailed(result["latency_target"]["message"])


@app.command()
def profile(
    target: Path = typer.Argument(
        ..., help="A run directory (teacher and student), an .onnx file or a TensorRT .plan."
    ),
    backend: str = typer.Option("onnxruntime", "--backend", help=f"One of {', '.join(list_backends())}."),
    batch: str = typer.Option("1,8,32", "--batch", help="Comma-separated batch sizes."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="torch-cuda: replay a captured CUDA graph."),
    warmup: Optional[float] = typer.Option(
        None, "--warmup", min=0.0, help="Warm-up seconds (at least 0.2, trtexec's)."
    ),
    duration: Optional[float] = typer.Option(
        None, "--duration", min=0.0, help="Timed seconds per batch at least (default: recipe; 3 for a file)."
    ),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Timed runs per batch at least."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU backends: intra-op threads (default: recipe)."
    ),
) -> None:
    """Latency per batch size (trtexec's protocol): warm-up, then p50/p90/p95/p99, mean and throughput;
    on GPUs host latency and GPU compute time separately."""
    from cascadec.commands import profile_path

    result = profile_path(
        target,
        backend=backend,
        batches=_parse_batches(batch),
        cuda_graph=cuda_graph,
        warmup_s=warmup,
        duration_s=duration,
        min_iters=iterations,
        threads=threads,
    )
    print_latency(out, result)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model name."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Show what this recipe's target means."),
    in_channels: int = typer.Option(3, "--in-channels", min=1),
    image_size: int = typer.Option(224, "--image-size", min=8),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    latency: bool = typer.Option(
        False, "--latency", help="Build (or load from the cache) the latency table and summarise it."
    ),
    backend: str = typer.Option("onnxruntime", "--backend", help="Backend the latency table is measured on."),
) -> None:
    """Pre-flight: prunable groups, layers that cannot be pruned and why, FLOPs/params."""
    resolved = load_recipe(recipe, model=model) if recipe else None
    from cascadec.preflight import inspect_model

    result = inspect_model(
        model,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        recipe=resolved,
        latency_backend=backend if latency else None,
    )
    if as_json:
        out.print_json(json.dumps(result))
    else:
        print_inspect(out, result, resolved.prune.method if resolved else None)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Check the GPU stack: driver, torch's CUDA, onnxruntime(-gpu), TensorRT; one line per mismatch (exit 3)."""
    from cascadec.doctor import doctor as run_doctor

    result = run_doctor()
    if as_json:
        out.print_json(json.dumps(result))
    else:
        colour = {"ok": "green", "unavailable": "yellow", "mismatch": "red"}
        table = Table("piece", "status", "detail", title="cascadec doctor")
        for c in result["checks"]:
            table.add_row(c["name"], f"[{colour[c['status']]}]{c['status']}[/]", c["detail"])
        out.print(table)
    if not result["passed"]:
        bad = [f"{c['name']}: {c['detail']}" for c in result["checks"] if c["status"] == "mismatch"]
        raise GateFailed("doctor: " + " | ".join(bad))


@recipes_app.command("list")
def recipes_list() -> None:
    """Shipped recipes with their model, data and target."""
    table = Table("recipe", "model", "data", "target", "method", "description")
    for column in table.columns[:2]:
        column.no_wrap = True
    for name in list_recipes():
        r = load_recipe(name)
        table.add_row(name, r.model.name, r.data.name, r.prune.target.describe(), r.prune.method, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name or path.")) -> None:
    """Print a recipe with every default filled in."""
    sys.stdout.write(recipe_to_yaml(load_recipe(name)))  # raw: the output must stay valid YAML


@models_app.command("list")
def models_list(
    contains: Optional[str] = typer.Argument(None, help="Only names containing this."),
    source: bool = typer.Option(False, "--source", help="Show where each name comes from."),
    timm: bool = typer.Option(False, "--timm", help="Also list timm/NAME models (needs timm installed)."),
) -> None:
    """Every model name create_model accepts. Any timm model is timm/NAME, and your own code is
    path/to/file.py:builder or package.module:builder."""
    from cascadec.models.registry import model_sources

    for name, origin in model_sources(include_timm=timm):
        if not contains or contains in name:
            out.print(f"{name}\t{origin}" if source else name, highlight=False)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: maps cascadec's errors to exit codes and one line."""
    try:
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):
            return result
    except CascadecError as exc:
        if isinstance(exc, GateFailed):
            err.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        else:
            err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        # Typer bundles its own copy of click, so match on the class names, not on click's types
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "Abort" in names:
            err.print("interrupted")
            return EXIT_INTERRUPTED
        if "ClickException" in names and hasattr(exc, "format_message"):
            # a bad flag or value: one line like every other user error (click's usage block
            # would be three), naming the command so the user knows which --help to read
            context = getattr(exc, "ctx", None)
            where = f"{context.command_path}: " if context is not None else ""
            message = " ".join(str(exc.format_message()).split())
            err.print(f"error: {where}{message}", highlight=False, markup=False, soft_wrap=True)
            return int(getattr(exc, "exit_code", 2) or 2)
        if os.environ.get("CASCADEC_DEBUG"):
            raise
        err.print(
            f"internal error: {type(exc).__name__}: {first_line(exc)} "
            "(set CASCADEC_DEBUG=1 for a traceback and please report it)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
