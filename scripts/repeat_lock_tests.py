"""Run the two concurrency tests of tests/test_locks.py many times in a row (issue 31, item 3).

    python scripts/repeat_lock_tests.py --rounds 50 --beside "bench/quality.py --jobs 1"
    python scripts/repeat_lock_tests.py --rounds 10 --without-lock     # the lock made a no-op

``test_two_compress_processes_on_one_directory`` and
``test_two_processes_need_one_teacher_cache_entry`` hold their first process at a barrier
(``locks.hold_point``) instead of racing start-up times, so they should pass every time however
loaded the machine is, and fail every time when the lock does nothing. ``--without-lock`` runs
them against a copy of the package whose ``locks._try_lock`` always succeeds (the processes the
tests start import the copy through ``PYTHONPATH``). ``--beside`` only records what the caller
ran beside the rounds (the script starts nothing else); each round records the load average.

Results: ``OUT.jsonl`` (a line per test and round, appended as each ends; a rerun continues) and
``OUT.md`` (passes and failures per test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.mutants import package_copy  # noqa: E402 - the mutants' copy of the package, one definition

TESTS = (
    "tests/test_locks.py::test_two_compress_processes_on_one_directory",
    "tests/test_locks.py::test_two_processes_need_one_teacher_cache_entry",
)
NO_LOCK = (
    "def _try_lock(fd: int) -> bool:\n    return True  # repeat_lock_tests.py --without-lock\n\n\n"
    "def _unused_try_lock(fd: int) -> bool:"
)


def _lockless_copy(root: Path) -> None:
    package_copy(root)
    locks = root / "cascadec" / "locks.py"
    source = locks.read_text()
    if "def _try_lock(fd: int) -> bool:" not in source:
        raise SystemExit("cascadec/locks.py has no _try_lock(fd) to disable; update this script")
    locks.write_text(source.replace("def _try_lock(fd: int) -> bool:", NO_LOCK, 1))


def run_one(root: Path, test: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "CASCADEC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "0", test]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode not in (0, 1):  # 2-5: a collection error, not a verdict on the lock
        raise SystemExit(f"{test}: pytest exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return {"passed": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1), "summary": tail}


def write_md(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# The lock tests, many times in a row (scripts/repeat_lock_tests.py)",
        "",
        "Commands: "
        + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "") for r in rows) if c)
        + ". Each round runs the two tests once, one after the other, against the checkout (lock on) or a "
        "copy whose `locks._try_lock` always succeeds (lock removed); `beside` is what ran on the machine "
        "meanwhile (2 cores).",
        "",
        "| test | lock | beside | rounds | passed | failed | median s | load average (1 min) min-max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for test, lock in dict.fromkeys((r["test"], r["lock"]) for r in rows):
        rs = [r for r in rows if r["test"] == test and r["lock"] == lock]
        lines.append(
            f"| `{test.split('::')[1]}` | {lock} | **all rounds** | {len(rs)} | {sum(r['passed'] for r in rs)} | "
            f"{sum(not r['passed'] for r in rs)} | {sorted(r['seconds'] for r in rs)[len(rs) // 2]} | "
            f"{min(r['load1'] for r in rs):.2f}-{max(r['load1'] for r in rs):.2f} |"
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["test"], r["lock"], r["beside"]), []).append(r)
    for (test, lock, beside), rs in groups.items():
        secs = sorted(r["seconds"] for r in rs)
        loads = [r["load1"] for r in rs]
        lines.append(
            f"| `{test.split('::')[1]}` | {lock} | {beside or 'nothing'} | {len(rs)} | "
            f"{sum(r['passed'] for r in rs)} | {sum(not r['passed'] for r in rs)} | {secs[len(secs) // 2]} | "
            f"{min(loads):.2f}-{max(loads):.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--without-lock", action="store_true")
    p.add_argument("--beside", default="", help="what ran beside the rounds (recorded, not started)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "locks-repeat")
    args = p.parse_args(argv)
    out = args.out.with_suffix("")
    lock = "removed" if args.without_lock else "on"
    command = "python scripts/repeat_lock_tests.py " + " ".join(
        f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:])
    )
    rows = (
        [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
        if out.with_suffix(".jsonl").is_file()
        else []
    )
    done = {(r["test"], r["round"]) for r in rows if r["lock"] == lock}  # (each row keeps its own "beside")
    with tempfile.TemporaryDirectory(prefix="cascadec-locks-") as tmp:
        root = REPO
        if args.without_lock:
            root = Path(tmp)
            _lockless_copy(root)
        for round_ in range(args.rounds):
            for test in TESTS:
                if (test, round_) in done:
                    continue
                row = {"test": test, "round": round_, "lock": lock, "beside": args.beside, "command": command}
                row.update(run_one(root, test))
                row["load1"] = os.getloadavg()[0]
                rows.append(row)
                with out.with_suffix(".jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                write_md(out, rows, args)
                print(
                    f"round {round_} {test.split('::')[1]}: {'pass' if row['passed'] else 'FAIL'} "
                    f"({row['seconds']} s, load {row['load1']:.2f})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
