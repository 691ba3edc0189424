"""timm coverage: classification convnets and hybrids from timm through cascadec's pruning core,
with Torch-Pruning alone on the same model beside it.

For each model (``TIMM_MODELS``: 80 architectures of at most 30 M parameters, chosen to span
timm's families, including the ones known to be hard), a fresh subprocess runs, with random
weights (nothing is downloaded):

1. the smallest input size the model accepts (96, 128, 160, 224, 256 px, then timm's own);
2. the analysis ``cascadec inspect`` and ``compress`` run before training
   (:func:`cascadec.preflight.inspect_model` with ``recipes/zoo_timm.yaml``: 50 % fewer FLOPs,
   widths rounded to 8): dependency groups, the exactness trial of every group
   (``cascadec/prune/trial.py``) and the target. A ``UserError`` here is a clean *refusal*,
   found before any training; its time is the ``analysis s`` column;
3. the solve (random importance) -> shrink -> masked == shrunk with randomised BatchNorm
   statistics: the student must compute what the masked teacher computes;
4. ONNX export of the shrunk student (cascadec's exporter) and ONNX Runtime parity against it;
5. Torch-Pruning alone on a fresh copy: ``MetaPruner`` with L1 magnitude importance, a uniform
   ratio of 0.3 (about half the FLOPs), ``round_to=8``, the classifier ignored; then a forward
   pass, ONNX export and ONNX Runtime parity. Torch-Pruning has no masked reference, so for it
   "correct" means the pruned network runs and exports with parity; whether it computes the
   masked network is not checked (cascadec's step 3 is that check). It gets 180 s.

With ``--compress`` the child also runs the whole ``compress`` with the same recipe (cascade with
one TA, two training steps per phase on synthetic images, shrink, export, parity, profile) and
``verify`` on models that passed.

Results go to ``bench/results/timm-coverage.json`` (after every model; ``--resume`` continues)
and ``docs/timm-coverage.md``. Child isolation, memory and time limits are
``scripts/zoo_coverage.py``'s.

    python scripts/timm_coverage.py --jobs 2 --timeout 600 --memory-gb 8
    python scripts/timm_coverage.py --models mixnet_s,rexnet_100
    python scripts/timm_coverage.py --markdown-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_coverage as zoo  # noqa: E402 - the sibling script holds the sweep machinery

REPO = zoo.REPO
DEFAULT_JSON = REPO / "bench" / "results" / "timm-coverage.json"
DEFAULT_MD = REPO / "docs" / "timm-coverage.md"
DEFAULT_RECIPE = REPO / "recipes" / "zoo_timm.yaml"
CANDIDATE_SIZES = (96, 128, 160, 224, 256)
NUM_CLASSES = 10
PASS_GOAL = 0.90
ANALYSIS_LIMIT_S = 60.0
TP_RATIO = 0.3
TP_LIMIT_S = 180.0  # Torch-Pruning's own walk can take minutes (ecaresnet26t: 165 s); past this it counts as failed

# Families, so the sweep is not just the ones that pass: plain and SE/ECA/GC/attention ResNets,
# ResNeXt, selective kernel, Res2Net, ResNeSt, RegNets, EfficientNet/MobileNet/MixNet/NAS nets,
# GhostNets, CSP and Darknet, DenseNet, DLA, DPN, HRNet, re-parameterisable nets (RepVGG, MobileOne,
# FastViT, RepViT), VoVNet, Inception/Xception, NF-Nets, ConvNeXt(V2), MetaFormers, MobileViTs,
# LeViT, BoT/Halo/Lambda nets, MaxViT/CoAtNet, HGNet, StarNet, TinyViT, EfficientViT, ViT, MLP-Mixer.
TIMM_MODELS = (
    "resnet18 resnet50d seresnet50 ecaresnet26t skresnet18 resnext26ts seresnext26d_32x4d gcresnext26ts "
    "bat_resnext26ts res2net50_26w_4s res2next50 resnest14d regnetx_002 regnety_016 regnetz_b16 "
    "efficientnet_b0 efficientnet_lite0 tf_efficientnetv2_b0 mixnet_s mnasnet_100 fbnetv3_b mobilenetv2_100 "
    "mobilenetv3_large_100 mobilenetv3_small_100 lcnet_050 hardcorenas_a mobilenetv4_conv_small "
    "mobilenetv4_hybrid_medium ghostnet_100 ghostnetv2_100 repghostnet_100 cspresnet50 cspdarknet53 "
    "cs3darknet_s darknet17 densenet121 dla34 dla60x_c dpn48b hrnet_w18_small repvgg_a0 mobileone_s0 "
    "fastvit_t8 rexnet_100 ese_vovnet19b_dw inception_v3 xception41 nf_resnet26 nf_regnet_b0 convnext_atto "
    "convnextv2_atto efficientformer_l1 efficientformerv2_s0 edgenext_xx_small mobilevit_xxs mobilevitv2_050 "
    "levit_128s poolformer_s12 gernet_s resnetv2_50 resnetv2_50x1_bit botnet26t_256 halonet26t "
    "lambda_resnet26t haloregnetz_b maxvit_pico_rw_256 coatnet_nano_rw_224 inception_next_tiny hgnetv2_b0 "
    "repvit_m1 starnet_s1 tiny_vit_5m_224 efficientvit_b0 efficientvit_m0 vit_tiny_patch16_224 "
    "mixer_s16_224 ghostnetv3_100 mambaout_femto dla46_c gernet_m"
).split()


# ---------------------------------------------------------------- child: one model


def _error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).splitlines()[0][:240] if str(exc) else ""
    return f"{type(exc).__name__}: {message}{where}"


def _build(name: str):
    import torch

    from cascadec.models import create_model

    torch.manual_seed(0)
    return create_model(f"timm/{name}", num_classes=NUM_CLASSES).eval()


def _smallest_size(model) -> tuple[int | None, str]:
    import torch

    own = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    last = ""
    for size in dict.fromkeys((*CANDIDATE_SIZES, own)):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size, ""
        except Exception as exc:  # noqa: BLE001 - probing: any error means "not this size"
            last = _error(exc)
    return None, last


def _onnx_parity(model, size: int, path: Path) -> dict:
    """Export ``model`` with cascadec's exporter; compare ONNX Runtime with PyTorch on 4 images."""
    import torch

    from cascadec.backends.onnx_export import export_onnx
    from cascadec.backends.onnxruntime_backend import OrtRunner
    from cascadec.verify.compare import compare_outputs
    from cascadec.verify.gates import Tolerance

    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    info = export_onnx(model.eval(), x[:1], path)
    with torch.no_grad():
        reference = model(x).numpy()
    candidate = OrtRunner(path, threads=1)(x.numpy())
    result = compare_outputs(reference, candidate, tolerance=Tolerance(atol=1e-4, rtol=1e-3))
    return {
        "exporter": info.get("exporter"),
        "max_abs_diff": result["max_abs_diff"],
        "max_rel_diff": result["max_rel_diff"],
        "passed": result["mismatched_elements"] == 0 and result["top1_agreement"] == 1.0,
    }


def _cascadec(name: str, size: int, recipe_path: Path, workdir: Path, result: dict, timed) -> None:
    import torch

    from cascadec.errors import UserError
    from cascadec.preflight import inspect_model
    from cascadec.prune.analysis import analyse
    from cascadec.prune.masks import masked
    from cascadec.prune.shrink import shrink
    from cascadec.prune.trial import randomise_batchnorm
    from cascadec.stages import prepare_recipe

    overrides = [f"data.image_size={size}", f"model.num_classes={NUM_CLASSES}"]
    recipe = prepare_recipe(f"timm/{name}", str(recipe_path), overrides=overrides)
    start = time.perf_counter()
    try:
        info = timed(
            "analysis", lambda: inspect_model(f"timm/{name}", image_size=size, num_classes=NUM_CLASSES, recipe=recipe)
        )
    except UserError as exc:
        result.update(status="refused", reason=str(exc)[:400], analysis_seconds=round(time.perf_counter() - start, 1))
        return
    result["analysis_seconds"] = round(time.perf_counter() - start, 1)
    result.update(
        flops=info["flops"],
        prunable_units=info["prunable_units"],
        groups=len(info["groups"]),
        frozen_groups=len(info["frozen"]),
        frozen_by_trial=sum(1 for f in info["frozen"] if f["reason"].startswith("pruning it does not give")),
        target_flops_reduction=1 - info["target"]["flops"] / info["flops"],
    )

    def exactness() -> tuple[float, Any, float]:
        model = _build(name)
        randomise_batchnorm(model)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, size, size, generator=gen)
        analysis = analyse(model, recipe, x[:1])
        keep = analysis.solver.solve(torch.rand(analysis.index.num_units, generator=gen), analysis.budget)
        student = shrink(model, analysis.index, keep, x[:1]).eval()
        with torch.no_grad(), masked(model, analysis.index, keep):
            y_masked = model(x)
        with torch.no_grad():
            y_shrunk = student(x)
        gap = float((y_masked - y_shrunk).abs().max() / y_shrunk.abs().max().clamp_min(1e-12))
        return gap, student, 1 - analysis.cost.macs(keep) / analysis.cost.base_macs

    gap, student, reduction = timed("exactness", exactness)
    result.update(masked_vs_shrunk=gap, flops_reduction=reduction)
    if not gap <= 1e-4:
        result.update(
            status="failed", error="MaskedNotShrunk", reason=f"masked != shrunk: relative max|diff| {gap:.2e}"
        )
        return
    parity = timed("onnx", lambda: _onnx_parity(student, size, workdir / f"{name}.student.onnx"))
    result.update(max_abs_diff=parity["max_abs_diff"], max_rel_diff=parity["max_rel_diff"], exporter=parity["exporter"])
    if not parity["passed"]:
        result.update(
            status="failed", error="ParityFailed", reason=f"ONNX Runtime max|diff| {parity['max_abs_diff']:.1e}"
        )
        return
    result["status"] = "pass"


def _torch_pruning_alone(name: str, size: int, workdir: Path) -> dict:
    """Torch-Pruning's own pruner on the same model: the reference a user would compare with."""
    import signal

    import torch
    import torch_pruning as tp

    out: dict[str, Any] = {"status": "failed"}

    def on_alarm(signum, frame):
        raise TimeoutError(f"Torch-Pruning took longer than {TP_LIMIT_S:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(TP_LIMIT_S))
    try:
        model = _build(name)
        x = torch.randn(1, 3, size, size)
        base_macs, _ = tp.utils.count_ops_and_params(model, x)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        ignored = [m for m in ([classifier] if isinstance(classifier, torch.nn.Module) else []) if m is not None]
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=TP_RATIO,
            ignored_layers=ignored,
            round_to=8,
        )
        pruner.step()
        with torch.no_grad():
            y = model(x)
        if y.shape[-1] != NUM_CLASSES:
            raise RuntimeError(f"output has {y.shape[-1]} classes after pruning")
        macs, _ = tp.utils.count_ops_and_params(model, x)
        out["flops_reduction"] = 1 - macs / base_macs
        parity = _onnx_parity(model, size, workdir / f"{name}.tp.onnx")
        out.update(max_abs_diff=parity["max_abs_diff"])
        if parity["passed"]:
            out["status"] = "pass"
        else:
            out["reason"] = f"ONNX Runtime max|diff| {parity['max_abs_diff']:.1e}"
    except MemoryError:
        out["reason"] = "MemoryError"
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failures are data here
        out["reason"] = _error(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return out


def run_child(name: str, result_path: Path, workdir: Path, recipe: Path, max_params: int, compress: bool) -> int:
    import torch

    torch.set_num_threads(1)
    result: dict[str, Any] = {"model": name, "status": "failed", "stage": "start", "seconds": {}}
    zoo._write(result, result_path)

    def timed(stage: str, fn):
        result["stage"] = stage
        zoo._write(result, result_path)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            result["seconds"][stage] = round(time.perf_counter() - start, 1)
            zoo._write(result, result_path)

    try:
        model = timed("build", lambda: _build(name))
        result["params"] = sum(p.numel() for p in model.parameters())
        if result["params"] > max_params:
            result.update(
                status="not_run", reason=f"{result['params'] / 1e6:.0f} M parameters > {max_params / 1e6:.0f} M"
            )
            return 0
        size, why = timed("probe", lambda: _smallest_size(model))
        if size is None:
            result.update(status="failed", error="NoInputSize", reason=f"no candidate input size works: {why}")
            return 0
        result["image_size"] = size
        try:
            _cascadec(name, size, recipe, workdir, result, timed)
        except MemoryError:
            result.update(status="failed", error="MemoryError", reason=f"out of memory during {result['stage']}")
        except Exception as exc:  # noqa: BLE001 - a raw exception is exactly what this sweep looks for
            result.update(status="failed", error=type(exc).__name__, reason=_error(exc))
        result["torch_pruning"] = timed("torch_pruning", lambda: _torch_pruning_alone(name, size, workdir))
        if compress and result["status"] == "pass":
            _compress(name, size, recipe, workdir, result, timed)
        return 0
    finally:
        result.pop("stage", None) if result.get("status") in ("pass", "refused", "not_run") else None
        zoo._write(result, result_path)


def _compress(name: str, size: int, recipe: Path, workdir: Path, result: dict, timed) -> None:
    """The whole pipeline (training steps, run directory, export, verify) on a model that passed."""
    import shutil

    from cascadec.commands import verify_run
    from cascadec.errors import GateFailed, UserError
    from cascadec.stages import compress

    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.image_size={size}", f"model.num_classes={NUM_CLASSES}"]
    try:
        timed("compress", lambda: compress(f"timm/{name}", str(recipe), out=str(run_dir), overrides=overrides))
        verified = timed("verify", lambda: verify_run(run_dir))
        result["compress"] = "pass" if verified.backends["onnxruntime"].passed else "parity failed"
    except (GateFailed, UserError) as exc:
        result["compress"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    except Exception as exc:  # noqa: BLE001
        result["compress"] = _error(exc)


# ---------------------------------------------------------------- parent: the sweep


def totals(results: dict[str, dict]) -> dict[str, Any]:
    t = zoo.totals(results)
    attempted = [r for r in results.values() if r.get("status") in ("pass", "refused", "failed")]
    t["clean"] = sum(1 for r in attempted if r.get("status") in ("pass", "refused"))
    tp_pass = [r for r in attempted if r.get("torch_pruning", {}).get("status") == "pass"]
    t["tp_pass"] = len(tp_pass)
    t["tp_pass_cascadec_not"] = sorted(r["model"] for r in tp_pass if r.get("status") != "pass")
    t["slowest_analysis"] = max((r.get("analysis_seconds") or 0 for r in attempted), default=0)
    return t


COMPRESS_JSON = REPO / "bench" / "results" / "timm-coverage-compress.json"


def _compress_section(path: Path = COMPRESS_JSON) -> list[str]:
    """The ``--compress`` sample (its own JSON, so the sweep's rows keep their analysis times)."""
    if not path.is_file():
        return []
    data = zoo._load(path)
    rows = [r for r in data["results"].values() if r.get("compress")]
    if not rows:
        return []
    lines = ["## Whole pipeline on a sample (`--compress`)", ""]
    lines += [f"    {run['command']}    # {run['date']}" for run in data.get("runs", [])]
    lines += [
        "",
        "`compress` with the same recipe (cascade with one TA, two training steps per phase on",
        "synthetic images, shrink, ONNX export, parity, profile), then `verify` of the reloaded student:",
        "",
        "| model | compress + verify | compress s |",
        "|---|---|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['compress']} | {zoo._fmt(r.get('seconds', {}).get('compress'), '.0f')} |" for r in rows
    ]
    return lines + [""]


def write_markdown(data: dict, path: Path) -> None:
    results: dict[str, dict] = data["results"]
    t = totals(results)
    missing = [m for m in TIMM_MODELS if m not in results]
    attempted = t["attempted"]
    lines = [
        "# timm coverage",
        "",
        f"{len(TIMM_MODELS)} timm classification convnets and hybrids of at most 30 M parameters, chosen to span",
        "timm's families (see `TIMM_MODELS` in the script), each in its own process under a time and",
        "memory limit, with random weights: smallest accepted input -> analysis (groups, exactness trial,",
        "target: 50 % fewer FLOPs, widths rounded to 8; the same analysis `inspect` and `compress` run",
        "before training) -> solve -> shrink -> masked == shrunk -> ONNX export -> ONNX Runtime parity.",
        "Beside it, Torch-Pruning alone (`MetaPruner`, L1 magnitude, uniform ratio 0.3, `round_to=8`) on the",
        "same model: it runs, exports and matches ONNX Runtime or not. This table says whether an",
        "architecture can be pruned correctly, not how well it compresses; training is covered by",
        "`docs/zoo-coverage.md` (torchvision) and by `--compress` runs where noted.",
        "",
        "Produced by:",
        "",
    ]
    for run in data.get("runs", []):
        lines.append(
            f"    {run['command']}    # {run['date']}" + (f", commit {run['commit']}" if run.get("commit") else "")
        )
    machines = sorted({run["machine"] for run in data.get("runs", [])})
    lines += ["", "Machine: " + "; ".join(machines) + " (seconds are wall-clock, other jobs shared it)", ""]
    if data.get("runs"):
        versions = data["runs"][-1].get("versions", {})
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    rate = t["pass_rate"]
    clean = t["clean"] / attempted if attempted else None
    lines += [
        "## Totals",
        "",
        f"- Recorded: {len(results)} of {len(TIMM_MODELS)} models"
        + (f" -- **partial**, not yet run: {', '.join(missing)}" if missing else ""),
        f"- **pass**: {t['pass']}; **refused** cleanly before training: {t['refused']}; **failed**: {t['failed']}; "
        f"not run: {t['not_run']}",
        "- Pass rate: "
        + (
            f"**{rate:.1%}** (goal {PASS_GOAL:.0%}: {'met' if rate >= PASS_GOAL else 'not met'})"
            if rate is not None
            else "n/a"
        ),
        "- Pass or clean refusal: "
        + (f"**{clean:.1%}** (goal 100 %: {'met' if clean == 1 else 'not met'})" if clean is not None else "n/a"),
        f"- Slowest analysis: {t['slowest_analysis']:.0f} s (goal at most {ANALYSIS_LIMIT_S:.0f} s: "
        f"{'met' if t['slowest_analysis'] <= ANALYSIS_LIMIT_S else 'not met'})",
        f"- Torch-Pruning alone passes {t['tp_pass']} of {attempted}; models it passes and cascadec does not: "
        + (", ".join(t["tp_pass_cascadec_not"]) or "none"),
        "",
        "## Not passing",
        "",
        *[
            f"- `{name}` ({r.get('status')}): {(r.get('error') + ': ') if r.get('error') else ''}{r.get('reason', '')}"
            for name in TIMM_MODELS
            if (r := results.get(name)) is not None and r.get("status") != "pass"
        ],
        "",
        *_compress_section(),
        "## Per model",
        "",
        "Columns: *px* input size used; *analysis s* groups + exactness trial + target (refusals included);",
        "*frozen (trial)* groups frozen, of which the exactness trial froze; *FLOPs -* the reduction the",
        "solver reached (target 50 %, widths rounded to 8); *masked vs shrunk* relative max difference",
        "with randomised BatchNorm statistics; *ORT rel* ONNX Runtime vs PyTorch on the shrunk student;",
        "*TP* Torch-Pruning alone (its FLOPs reduction at ratio 0.3, or its error).",
        "",
        "| model | status | px | analysis s | groups | frozen (trial) | FLOPs - | masked vs shrunk | ORT rel | TP | TP FLOPs - | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name in TIMM_MODELS:
        r = results.get(name)
        if r is None:
            continue
        tpr = r.get("torch_pruning", {})
        note = (f"{r['error']}: " if r.get("error") else "") + (r.get("reason") or "")
        if tpr.get("status") not in (None, "pass"):
            note += f"{'; ' if note else ''}TP: {tpr.get('reason', '')}"
        if r.get("compress"):
            note += f"{'; ' if note else ''}compress: {r['compress']}"
        note = note.replace("|", "\\|").replace("\n", " ")[:420]
        frozen = "" if r.get("frozen_groups") is None else f"{r['frozen_groups']} ({r.get('frozen_by_trial', 0)})"
        lines.append(
            f"| {name} | {r.get('status')} | {zoo._fmt(r.get('image_size'), 'd')} | {zoo._fmt(r.get('analysis_seconds'), '.1f')} | "
            f"{zoo._fmt(r.get('groups'), 'd')} | {frozen} | {zoo._fmt(r.get('flops_reduction'), '.1%')} | "
            f"{zoo._fmt(r.get('masked_vs_shrunk'), '.0e')} | {zoo._fmt(r.get('max_rel_diff'), '.0e')} | "
            f"{tpr.get('status', '')} | {zoo._fmt(tpr.get('flops_reduction'), '.1%')} | {note} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset of TIMM_MODELS (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="wall-clock seconds per model (default 600)")
    parser.add_argument("--memory-gb", type=float, default=8, help="address-space limit per model (default 8 GiB)")
    parser.add_argument("--max-params", type=float, default=30, help="millions of parameters (default 30)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    parser.add_argument("--compress", action="store_true", help="also run compress + verify on passing models")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    parser.add_argument("--workdir", type=Path, help="logs and ONNX files (default: a temporary directory)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown table from the JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return run_child(args.child, args.result, args.workdir, args.recipe, int(args.max_params), args.compress)

    from cascadec.run import git_commit

    data = zoo._load(args.json)
    if args.markdown_only:
        write_markdown(data, args.markdown)
        return 0
    models = [m.strip() for m in args.models.split(",")] if args.models else list(TIMM_MODELS)
    unknown = [m for m in models if m not in TIMM_MODELS]
    if unknown:
        print(f"error: not in TIMM_MODELS: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.resume:
        models = [m for m in models if m not in data["results"]]
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="cascadec-timm-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data["runs"].append(
        {
            "command": "python scripts/timm_coverage.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "commit": git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": zoo._machine(),
            "versions": {**zoo._versions(), "timm": __import__("timm").__version__},
            "models": models,
        }
    )
    print(f"{len(models)} models; logs in {workdir}", flush=True)
    lock = threading.Lock()
    extra = ["--max-params", str(int(args.max_params * 1e6))] + (["--compress"] if args.compress else [])

    def one(name: str) -> dict:
        row = zoo.run_one(name, args, workdir, script=Path(__file__).resolve(), extra_args=extra)
        with lock:
            data["results"][name] = row
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1, default=str))
            write_markdown(data, args.markdown)
        tp_status = row.get("torch_pruning", {}).get("status", "-")
        print(
            f"{name:28s} {row['status']:8s} TP {tp_status:6s} {row['wall_seconds']:6.1f} s  {row.get('reason', '')[:150]}",
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, models))
    t = totals(data["results"])
    print(
        f"pass {t['pass']}, refused {t['refused']}, failed {t['failed']}, not run {t['not_run']}; TP passes {t['tp_pass']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
