"""The hostile-input matrix: every command against bad values, sizes past the limits, damaged or
hostile artifacts, planted symlinks and a busy run directory (run on demand, not in CI).

    python scripts/hostile_matrix.py [--out docs/hostile-input.md]

Each case runs ``python -m cascadec ...`` in a fresh process, in a sandbox holding a finished
tiny run (tests/helpers/cli.py's recipe) and copies of it with one thing broken. Recorded per
case: exit code, the first line of stderr, whether a traceback or an "internal error" appeared,
the child's peak memory (``wait4``), and every file created or changed outside the places the
case may write (its run directories, the teacher cache and its working directory). The table is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.cli import compress_command, write_recipe  # noqa: E402 - the tests' tiny recipe, one definition

MEMORY_LIMIT_MB = 4096


@dataclass
class Case:
    name: str
    args: list[str]  # {run}, {S} and {copy} are substituted
    expect: tuple[int, ...] = (2,)
    prepare: Callable[[Path, Path], None] | None = None  # (sandbox, copy of the run) -> None
    check: Callable[[Path, Path], str | None] | None = None  # extra check -> failure text or None
    notes: str = ""
    result: dict = field(default_factory=dict)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _truncate(name: str, keep: int = 100):
    def prepare(_sandbox: Path, run: Path) -> None:
        target = run / name
        target.write_bytes(target.read_bytes()[:keep])

    return prepare


def _write(name: str, content: bytes):
    def prepare(_sandbox: Path, run: Path) -> None:
        (run / name).write_bytes(content)

    return prepare


def _nan_weights(_sandbox: Path, run: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "student.safetensors"))
    name = next(k for k in weights if k.endswith("weight") and weights[k].dim() > 1)
    weights[name].fill_(float("nan"))
    save_file(weights, str(run / "student.safetensors"))


def _symlink_out(name: str):
    def prepare(sandbox: Path, run: Path) -> None:
        outside = sandbox / "outside.txt"
        outside.write_text("must never change\n")
        (run / name).unlink()
        (run / name).symlink_to(outside)

    return prepare


def _outside_unchanged(sandbox: Path, _run: Path) -> str | None:
    return None if (sandbox / "outside.txt").read_text() == "must never change\n" else "outside.txt was written"


def _stays_finished(_sandbox: Path, run: Path) -> str | None:
    status = json.loads((run / "manifest.json").read_text())["status"]
    return None if status == "finished" else f"manifest status became {status!r}"


def _evil_pickle(sandbox: Path, _run: Path) -> None:
    (sandbox / "evil.pt").write_bytes(pickle.dumps({"w": _RunsCode()}, protocol=2))


def _locked(sandbox: Path, run: Path) -> None:
    """Hold the run's writer lock from another process for the length of the case."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time;from cascadec.run import RunDir;r=RunDir.open(sys.argv[1]);"
            "print('locked',flush=True);time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "locked"
    (sandbox / "holder.pid").write_text(str(holder.pid))


def cases() -> list[Case]:
    tiny = ["--recipe", "{S}/tiny.yaml"]
    c = "compress cifar_resnet8".split()
    return [
        # compress: values
        Case("unknown model", ["compress", "nosuchnet", *tiny, "--dry-run"]),
        Case("unknown recipe", [*c, "--recipe", "nosuchrecipe", "--dry-run"]),
        Case("recipe name escapes runs/", [*c, *tiny, "--set", "name=x/../../../esc"]),
        Case("recipe name with a leading dot", [*c, *tiny, "--set", "name=.hidden"]),
        Case("data.options.seed collides", [*c, *tiny, "--set", "data.options.seed=3", "--dry-run"]),
        Case("image size 100000 (dry run)", [*c, *tiny, "--set", "data.image_size=100000", "--dry-run"]),
        Case("image size 100000 (compress)", [*c, *tiny, "--set", "data.image_size=100000", "--out", "{S}/new"]),
        Case(
            "batch size 10^9 (capped at the data set's size)",
            [*c, *tiny, "--set", "data.batch_size=1000000000", "--out", "{S}/new"],
            expect=(0,),
        ),
        Case(
            "synthetic data too big to build",
            [*c, *tiny, "--set", "data.image_size=4096", "--set", "data.options.train_size=100000", "--out", "{S}/new"],
        ),
        Case("image size 0", [*c, *tiny, "--set", "data.image_size=0", "--dry-run"]),
        Case("learning rate NaN", [*c, *tiny, "--set", "train.lr=.nan", "--dry-run"]),
        Case("negative epochs", [*c, *tiny, "--set", "train.joint_epochs=-1", "--dry-run"]),
        Case("infeasible target 0.999", [*c, *tiny, "--set", "prune.target.flops_reduction=0.999", "--out", "{S}/new"]),
        Case("target above 1", [*c, *tiny, "--set", "prune.target.flops_reduction=1.5", "--dry-run"]),
        Case(
            "two targets in one recipe",
            [*c, "--recipe", "{S}/two.yaml", "--dry-run"],
            prepare=lambda s, r: (s / "two.yaml").write_text(
                "name: two\nmodel: {name: cifar_resnet8}\nprune: {target: {flops_reduction: 0.5, keep_ratio: 0.5}}\n"
            ),
        ),
        Case("--set into a dunder", [*c, *tiny, "--set", "__class__.__init__=1", "--dry-run"]),
        Case("--set with an empty key part", [*c, *tiny, "--set", "a..b=1", "--dry-run"]),
        Case("--set without =", [*c, *tiny, "--set", "train.lr", "--dry-run"]),
        Case("--device cuda without a GPU", [*c, *tiny, "--device", "cuda", "--out", "{S}/new"]),
        Case("--device tpu", [*c, *tiny, "--device", "tpu", "--out", "{S}/new"]),
        Case("--nproc 0", [*c, *tiny, "--nproc", "0"]),
        Case("--weights missing", [*c, *tiny, "--weights", "{S}/missing.pt", "--out", "{S}/new"]),
        Case(
            "--weights a pickle that runs code",
            [*c, *tiny, "--weights", "{S}/evil.pt", "--out", "{S}/new"],
            prepare=_evil_pickle,
        ),
        Case(
            "--weights random bytes",
            [*c, *tiny, "--weights", "{S}/junk.safetensors", "--out", "{S}/new"],
            prepare=lambda s, r: (s / "junk.safetensors").write_bytes(os.urandom(256)),
        ),
        Case("--data missing", [*c, *tiny, "--data", "{S}/nodata", "--out", "{S}/new"]),
        Case("--out is a file", [*c, *tiny, "--out", "{S}/tiny.yaml"]),
        Case(
            "--out holds other files",
            [*c, *tiny, "--out", "{S}/foreign"],
            prepare=lambda s, r: ((s / "foreign").mkdir(), (s / "foreign" / "notes.txt").write_text("mine")),
        ),
        Case("--out a finished run without --resume", [*c, *tiny, "--out", "{copy}"], check=_stays_finished),
        Case(
            "--resume with another recipe",
            [*c, *tiny, "--out", "{copy}", "--resume", "--set", "train.seed=5"],
            check=_stays_finished,
        ),
        Case(
            "--resume a finished run, teacher truncated",
            [*c, *tiny, "--out", "{copy}", "--resume"],
            prepare=_truncate("teacher.safetensors"),
            check=_stays_finished,
        ),
        Case(
            "recipe with a python tag",
            [*c, "--recipe", "{S}/tag.yaml", "--dry-run"],
            prepare=lambda s, r: (s / "tag.yaml").write_text(
                "name: x\nmodel: !!python/object/apply:os.system [true]\n"
            ),
        ),
        Case(
            "recipe of random bytes",
            [*c, "--recipe", "{S}/junk.yaml", "--dry-run"],
            prepare=lambda s, r: (s / "junk.yaml").write_bytes(os.urandom(300)),
        ),
        Case(
            "recipe nested 5000 deep",
            [*c, "--recipe", "{S}/deep.yaml", "--dry-run"],
            prepare=lambda s, r: (s / "deep.yaml").write_text("name: x\ndata: " + "[" * 5000 + "]" * 5000 + "\n"),
        ),
        # export
        Case("export a missing directory", ["export", "{S}/nothing"]),
        Case("export a file", ["export", "{S}/tiny.yaml"]),
        Case("export --fp16 without --trt", ["export", "{copy}", "--fp16"]),
        Case("export --trt without TensorRT", ["export", "{copy}", "--trt"]),
        Case("export --calib-images 0", ["export", "{copy}", "--trt", "--int8", "--calib-images", "0"]),
        Case("export --triton-dir without --triton", ["export", "{copy}", "--triton-dir", "{S}/t"]),
        Case("export, student weights truncated", ["export", "{copy}"], prepare=_truncate("student.safetensors")),
        Case("export, width spec garbage", ["export", "{copy}"], prepare=_write("student.widths.json", b"{]")),
        # verify
        Case("verify --backend junk", ["verify", "{copy}", "--backend", "junk"]),
        Case("verify --backend onnxruntime-cuda, no GPU", ["verify", "{copy}", "--backend", "onnxruntime-cuda"]),
        Case("verify --backend tensorrt, no TensorRT", ["verify", "{copy}", "--backend", "tensorrt"]),
        Case("verify --samples 0", ["verify", "{copy}", "--samples", "0"]),
        Case("verify --set model.name", ["verify", "{copy}", "--set", "model.name=resnet50"]),
        Case("verify NaN weights", ["verify", "{copy}"], expect=(3,), prepare=_nan_weights),
        Case("verify, student.onnx truncated", ["verify", "{copy}"], prepare=_truncate("student.onnx")),
        Case("verify, manifest garbage", ["verify", "{copy}"], prepare=_write("manifest.json", b"\xff\xfe{")),
        Case(
            "verify, recipe.yaml python tag",
            ["verify", "{copy}"],
            prepare=_write("recipe.yaml", b"name: x\nmodel: !!python/name:os.system\n"),
        ),
        Case("verify while another process writes the run", ["verify", "{copy}"], prepare=_locked),
        Case(
            "verify, report.json a symlink out",
            ["verify", "{copy}"],
            expect=(0,),
            prepare=_symlink_out("report.json"),
            check=_outside_unchanged,
        ),
        Case(
            "verify, manifest.json a symlink out",
            ["verify", "{copy}"],
            expect=(0, 2),
            prepare=_symlink_out("manifest.json"),
            check=_outside_unchanged,
        ),
        # profile
        Case("profile --batch 10^9", ["profile", "{copy}", "--batch", "1000000000"], check=_stays_finished),
        Case("profile an .onnx at --batch 100000", ["profile", "{copy}/student.onnx", "--batch", "100000"]),
        Case("profile --backend torch-cuda, no GPU", ["profile", "{copy}", "--backend", "torch-cuda"]),
        Case("profile --backend tensorrt, no TensorRT", ["profile", "{copy}", "--backend", "tensorrt"]),
        Case("profile --duration 0", ["profile", "{copy}", "--duration", "0"], check=_stays_finished),
        Case("profile --cuda-graph on onnxruntime", ["profile", "{copy}", "--cuda-graph"]),
        Case(
            "profile random bytes as .onnx",
            ["profile", "{S}/junk.onnx"],
            prepare=lambda s, r: (s / "junk.onnx").write_bytes(os.urandom(512)),
        ),
        Case("profile an .onnx with --backend tensorrt", ["profile", "{copy}/student.onnx", "--backend", "tensorrt"]),
        Case("profile --batch 0", ["profile", "{copy}", "--batch", "0"]),
        # report, inspect, recipes, models
        Case("report a missing directory", ["report", "{S}/nothing"]),
        Case("report --out x.txt", ["report", "{copy}", "--out", "{S}/x.txt"]),
        Case(
            "report, report.json garbage",
            ["report", "{copy}", "--out", "{S}/p.png"],
            prepare=_write("report.json", b"{not json"),
        ),
        Case("report --backend junk", ["report", "{copy}", "--backend", "junk", "--out", "{S}/p.png"]),
        Case("inspect --image-size 100000", ["inspect", "resnet18", "--image-size", "100000"]),
        Case("inspect an unknown model", ["inspect", "nosuchnet"]),
        Case("inspect --in-channels 0", ["inspect", "cifar_resnet8", "--in-channels", "0"]),
        Case("inspect --recipe junk", ["inspect", "cifar_resnet8", "--recipe", "junk"]),
        Case("recipes show junk", ["recipes", "show", "junk"]),
        Case("recipes show ../../etc/passwd", ["recipes", "show", "../../etc/passwd"]),
        Case("a command that does not exist", ["compres"]),
    ]


def _snapshot(root: Path) -> dict[str, float]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns
            except OSError:
                pass
    return out


def run_case(case: Case, sandbox: Path, base_run: Path) -> dict:
    work = sandbox / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    copy = sandbox / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base_run, copy, symlinks=True)
    for stale in ("new", "foreign", "outside.txt", "holder.pid"):
        target = sandbox / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    if case.prepare:
        case.prepare(sandbox, copy)
    args = [a.replace("{S}", str(sandbox)).replace("{copy}", str(copy)) for a in case.args]
    allowed = {"cache", "work", "copy", "new"}  # the case's run directories, the teacher cache, its cwd
    before = _snapshot(sandbox)
    out, err = work / ".stdout", work / ".stderr"
    env = {
        **os.environ,
        "CASCADEC_CACHE": str(sandbox / "cache"),
        "CASCADEC_NO_PROGRESS": "1",
        "COLUMNS": "100",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    start = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "cascadec", *args], cwd=work, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    holder = sandbox / "holder.pid"
    if holder.exists():
        os.kill(int(holder.read_text()), 9)
    after = _snapshot(sandbox)
    changed = sorted(
        p for p in set(after) | set(before) if after.get(p) != before.get(p) and p.split(os.sep)[0] not in allowed
    )
    stderr = err.read_text(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    extra = case.check(sandbox, copy) if case.check else None
    peak_mb = usage.ru_maxrss / 1024
    ok = (
        code in case.expect
        and "Traceback" not in stderr
        and "internal error" not in stderr
        and not changed
        and extra is None
        and peak_mb <= MEMORY_LIMIT_MB
    )
    return {
        "case": case.name,
        "command": " ".join(["cascadec", *case.args]),
        "exit": code,
        "expected": list(case.expect),
        "message": (lines[-1] if lines else "")[:220],
        "traceback": "Traceback" in stderr,
        "internal_error": "internal error" in stderr,
        "outside_writes": changed[:5],
        "peak_mb": round(peak_mb),
        "seconds": round(seconds, 1),
        "check": extra,
        "ok": ok,
    }


def write_table(rows: list[dict], path: Path) -> None:
    passed = sum(r["ok"] for r in rows)
    lines = [
        "# Hostile input: every command, bad values, damaged and hostile artifacts",
        "",
        f"Produced by `python scripts/hostile_matrix.py` ({len(rows)} cases, each `python -m cascadec ...` in a fresh "
        "process, in a sandbox holding a finished tiny run and a copy with one thing broken), on this project's "
        "2-core CPU machine without a GPU or TensorRT.",
        "",
        f"**{passed} of {len(rows)} cases pass**: the expected exit code, no traceback, no exit-1 internal error, "
        f"no file created or changed outside the case's run directory and the teacher cache, peak memory "
        f"under {MEMORY_LIMIT_MB} MB; {sum(r['traceback'] for r in rows)} tracebacks, "
        f"{sum(r['internal_error'] for r in rows)} internal errors, "
        f"{sum(bool(r['outside_writes']) for r in rows)} cases with outside writes, "
        f"largest peak {max(r['peak_mb'] for r in rows)} MB.",
        "",
        "Not covered here: a full disk and a read-only directory (root, which runs this, bypasses permissions; "
        "both are tested with injected `ENOSPC`/`EROFS` in `tests/test_faults.py` and `tests/test_run.py`), "
        "interrupted writes (`tests/test_resume.py` kills runs with SIGKILL mid-training).",
        "",
        "| # | case | exit | ok | peak MB | message (last stderr line) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        message = r["message"].replace("|", "\\|")
        note = (
            ""
            if r["ok"]
            else f" **({r['check'] or ('outside: ' + ', '.join(r['outside_writes']) if r['outside_writes'] else 'unexpected')})**"
        )
        lines.append(
            f"| {i} | {r['case']} | {r['exit']} | {'yes' if r['ok'] else 'NO'}{note} | {r['peak_mb']} | `{message}` |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "hostile-input.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cascadec-hostile-") as tmp:
        sandbox = Path(tmp)
        write_recipe(sandbox / "tiny.yaml")
        env = {
            **os.environ,
            "CASCADEC_CACHE": str(sandbox / "cache"),
            "CASCADEC_NO_PROGRESS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        base = sandbox / "base"
        subprocess.run(
            compress_command(sandbox / "tiny.yaml", base),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rows = []
        for case in cases():
            row = run_case(case, sandbox, base)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text("")
    write_table(rows, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
