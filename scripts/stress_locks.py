"""Stress the run-directory and teacher-cache locks with real processes (run on demand, not in CI).

    python scripts/stress_locks.py [--rounds 50] [--procs 2 4 8] [--out bench/results/locks-stress]

Per N and round, on a fresh directory and cache:

* ``dir``: N ``cascadec compress ... --out D --resume`` on one run directory, started at random
  offsets (0-2 s); in every third round one of them is killed with SIGKILL a moment after it
  starts, and one more ``--resume`` follows the others. Pass: exactly one finished run, its
  artifacts byte-identical to a lone run's, every process exiting 0 (it ran or resumed the
  finished run) or 2 (refused while another wrote), no traceback, no exit 1, and no lock left
  behind (a final ``--resume`` is never refused).
* ``cache``: N ``compress`` processes with their own run directories and one shared teacher
  cache entry. Pass: all exit 0, the teacher trained exactly once, every run's teacher identical.

Results are appended to ``OUT.jsonl`` as each round ends (a rerun skips rounds already there)
and summarised in ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.cli import compress_command, write_recipe  # noqa: E402 - the tests' tiny recipe, one definition

ARTIFACTS = ("student.safetensors", "student.widths.json", "teacher.safetensors")


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CASCADEC_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "CASCADEC_NO_PROGRESS": "1",
        "COLUMNS": "80",
        "PYTHONPATH": str(REPO),
    }


def _start(recipe: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = compress_command(recipe, out, *extra)
    return subprocess.Popen(
        cmd, env=_env(cache), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _launch(n: int, make: callable, rng: random.Random) -> list[subprocess.Popen]:
    offsets = sorted(rng.uniform(0, 2.0) for _ in range(n))
    procs, t0 = [], time.monotonic()
    for offset in offsets:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        procs.append(make(len(procs)))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=900), p.stderr.read()) for p in procs]


def round_dir(n: int, seed: int, recipe: Path, lone: Path, work: Path) -> dict:
    rng = random.Random(seed)
    cache, out = work / "cache", work / "run"
    shutil.copytree(lone.parent / "cache", cache)  # the lone run's teacher: artifacts must match it bit for bit
    kill = seed % 3 == 0
    procs = _launch(n, lambda i: _start(recipe, out, cache, "--resume"), rng)
    killed = None
    if kill:
        time.sleep(rng.uniform(0.5, 3.0))
        killed = rng.randrange(n)
        procs[killed].send_signal(signal.SIGKILL)
    results = _finish(procs)
    after = _finish([_start(recipe, out, cache, "--resume")])[0]  # never refused: no lock left behind
    codes = [code for i, (code, _) in enumerate(results) if i != killed]
    tracebacks = sum("Traceback" in err for _, err in [*results, after])
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    same = all((out / a).is_file() and (out / a).read_bytes() == (lone / a).read_bytes() for a in ARTIFACTS)
    ok = (
        after[0] == 0
        and manifest.get("status") == "finished"
        and same
        and tracebacks == 0
        and all(c in (0, 2) for c in codes)
    )
    return {
        "kind": "dir",
        "n": n,
        "seed": seed,
        "killed": killed is not None,
        "codes": codes,
        "after": after[0],
        "refused": codes.count(2),
        "status": manifest.get("status"),
        "identical": same,
        "tracebacks": tracebacks,
        "ok": ok,
    }


def round_cache(n: int, seed: int, recipe: Path, work: Path) -> dict:
    rng = random.Random(seed)
    cache = work / "cache"
    procs = _launch(n, lambda i: _start(recipe, work / f"run{i}", cache), rng)
    results = _finish(procs)
    codes = [code for code, _ in results]
    trained = sum("teacher: no weights given; training" in err for _, err in results)
    teachers = {
        (work / f"run{i}" / "teacher.safetensors").read_bytes()
        for i in range(n)
        if (work / f"run{i}" / "teacher.safetensors").is_file()
    }
    tracebacks = sum("Traceback" in err for _, err in results)
    ok = codes == [0] * n and trained == 1 and len(teachers) == 1 and tracebacks == 0
    return {
        "kind": "cache",
        "n": n,
        "seed": seed,
        "codes": codes,
        "trained": trained,
        "distinct_teachers": len(teachers),
        "tracebacks": tracebacks,
        "ok": ok,
    }


def write_table(rows: list[dict], path: Path, rounds: int) -> None:
    lines = [
        "# Lock stress (scripts/stress_locks.py)",
        "",
        f"Command: `python scripts/stress_locks.py --rounds {rounds}`; tiny synthetic recipe "
        "(tests/helpers/cli.py), this project's 2-core CPU machine.",
        "",
        "| scenario | N | rounds done | passed | refused (exit 2) | SIGKILL rounds | tracebacks |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("dir", "cache"):
        for n in sorted({r["n"] for r in rows if r["kind"] == kind}):
            sel = [r for r in rows if r["kind"] == kind and r["n"] == n]
            lines.append(
                f"| {'one run directory' if kind == 'dir' else 'one teacher cache entry'} | {n} | "
                f"{len(sel)} of {rounds} | {sum(r['ok'] for r in sel)} | "
                f"{sum(r.get('refused', 0) for r in sel)} | {sum(r.get('killed', False) for r in sel)} | "
                f"{sum(r['tracebacks'] for r in sel)} |"
            )
    failed = [r for r in rows if not r["ok"]]
    lines += ["", f"Failed rounds: {len(failed)}" + ("" if not failed else ": " + json.dumps(failed))]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "locks-stress")
    args = parser.parse_args()
    log = args.out.with_suffix(".jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["kind"], r["n"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="cascadec-stress-") as tmp:
        tmp = Path(tmp)
        recipe = write_recipe(tmp / "tiny.yaml")
        lone = tmp / "lone" / "run"
        code = _finish([_start(recipe, lone, tmp / "lone" / "cache")])[0]
        assert code[0] == 0, code[1]
        for seed in range(args.rounds):
            for n in args.procs:
                for kind in ("dir", "cache"):
                    if (kind, n, seed) in done:
                        continue
                    work = tmp / f"{kind}-{n}-{seed}"
                    work.mkdir()
                    row = (
                        round_dir(n, seed, recipe, lone, work) if kind == "dir" else round_cache(n, seed, recipe, work)
                    )
                    shutil.rmtree(work, ignore_errors=True)
                    rows.append(row)
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
                    write_table(rows, args.out.with_suffix(".md"), args.rounds)
    write_table(rows, args.out.with_suffix(".md"), args.rounds)


if __name__ == "__main__":
    main()
