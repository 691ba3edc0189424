"""Do the TensorRT tests catch mistakes in the TensorRT code? (the table on demand; CI replays the same
mutations through tests/test_mutants_tensorrt.py)

    python scripts/mutate_tensorrt.py [--out bench/results/tensorrt-mutations.md]

TensorRT cannot run on a machine without an NVIDIA GPU, so ``cascadec/backends/tensorrt_backend.py``
is tested against fakes (tests/test_tensorrt.py, tests/helpers/strict_tensorrt.py). A fake that
accepts any call proves nothing; this script measures what the tests catch. Each mutation below
is a plausible slip (a swapped argument, a misspelled method, an ignored failure), applied to a
copy of the package; ``tests/test_tensorrt.py`` then runs against the copy. A mutation is caught
when the tests fail. The table lists each mutation and whether it was caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.mutants import package_copy  # noqa: E402 - the mutants' copy of the package, one definition

TARGET = Path("cascadec/backends/tensorrt_backend.py")

MUTATIONS: list[tuple[str, str, str]] = [
    (
        "set_memory_pool_limit arguments swapped",
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)",
        "config.set_memory_pool_limit(WORKSPACE_BYTES, trt.MemoryPoolType.WORKSPACE)",
    ),
    ("calibrator base class that does not exist", "trt.IInt8EntropyCalibrator2", "trt.IInt8EntropyCalibrator3"),
    ("set_calibration_profile misspelled", "config.set_calibration_profile(", "config.set_calibration_profil("),
    (
        "get_batch returns a tensor, not pointers",
        "return [int(self.device_batch.data_ptr())]",
        "return [self.device_batch]",
    ),
    (
        "create_timing_cache() without its blob",
        "if config.set_timing_cache(config.create_timing_cache(stored), False):",
        "if config.set_timing_cache(config.create_timing_cache(), False):",
    ),
    (
        "a parse failure ignored",
        "if not parser.parse(onnx_path.read_bytes()):",
        "if not parser.parse(onnx_path.read_bytes()) and False:",
    ),
    ("a failed build unchecked", "if serialized is None:", "if serialized is None and False:"),
    (
        "input shape reversed",
        "chw = [int(d) for d in tuple(inp.shape)[1:]]",
        "chw = [int(d) for d in tuple(inp.shape)[1:]][::-1]",
    ),
    ("INT8 flag never set", "config.set_flag(trt.BuilderFlag.INT8)", "pass"),
    (
        "optimisation profile min and max swapped",
        'profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])',
        'profile.set_shape(inp.name, shapes["max"], shapes["opt"], shapes["min"])',
    ),
    (
        "TF32 left on for an fp32 engine",
        "config.clear_flag(trt.BuilderFlag.TF32)",
        "config.set_flag(trt.BuilderFlag.TF32)",
    ),
    ("calibration cache never written", "write_bytes_atomic(cache_path, bytes(cache))", "pass"),
    (
        "timing cache accepts other GPUs' entries",
        "if config.set_timing_cache(config.create_timing_cache(stored), False):",
        "if config.set_timing_cache(config.create_timing_cache(stored), True):",
    ),
    (
        "calibration batch not capped by the profile",
        "cal_batch = max(1, min(CALIBRATION_BATCH, bmax, len(calibration_images)))",
        "cal_batch = CALIBRATION_BATCH",
    ),
    (
        "calibration reads a stale cache whatever the images",
        'calib_path = cache_root / f"{engine_path.stem}.calib-{calib_key}.cache"',
        'calib_path = cache_root / f"{engine_path.stem}.calib.cache"',
    ),
    (
        "engine written before the build is checked",
        "    if serialized is None:\n",
        "    write_bytes_atomic(engine_path, b'') if serialized is None else None\n    if serialized is None:\n",
    ),
    # the strongly typed path (issue 28 item 1): a graph that names its precision, on TensorRT 10 and 11
    (
        "a Q/DQ or FP16 graph built weakly typed",
        'network = builder.create_network(_network_flags(trt, strongly_typed=typed != "fp32"))',
        "network = builder.create_network(_network_flags(trt, strongly_typed=False))",
    ),
    (
        "STRONGLY_TYPED passed as a value, not a bit",
        'return 1 << int(flag.value if hasattr(flag, "value") else flag)',
        'return int(flag.value if hasattr(flag, "value") else flag)',
    ),
    (
        "--int8 accepted on a graph that is already INT8",
        'if typed != "fp32" and (fp16 or int8):',
        'if typed != "fp32" and fp16:',
    ),
    (
        "TensorRT 11's missing FP16/INT8 flags not checked",
        "if wanted and not hasattr(trt.BuilderFlag, flag):",
        "if False:",
    ),
    (
        "metadata says strongly typed for every engine",
        '"strongly_typed": typed != "fp32" or _major(trt) >= 11,',
        '"strongly_typed": True,',
    ),
    (
        "a rejected timing cache taken as set",
        "if config.set_timing_cache(config.create_timing_cache(stored), False):\n        return",
        "config.set_timing_cache(config.create_timing_cache(stored), False)\n    if True:\n        return",
    ),
]


def run_tests(package_root: Path) -> bool:
    """True when tests/test_tensorrt.py passes against the package in ``package_root``."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # run from the copy: `python -m` puts the working directory first on sys.path
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_tensorrt.py"],
        cwd=package_root,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tensorrt-mutations.md")
    args = parser.parse_args()
    source = (REPO / TARGET).read_text()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cascadec-mutants-") as tmp:
        root = package_copy(Path(tmp))
        assert run_tests(root), "the tests fail on the unmutated copy: fix them first"
        for name, old, new in MUTATIONS:
            assert old in source, f"mutation {name!r} no longer applies: {old!r} is not in {TARGET}"
            (root / TARGET).write_text(source.replace(old, new))
            shutil.rmtree(root / TARGET.parent / "__pycache__", ignore_errors=True)  # same-size edits: no stale .pyc
            caught = not run_tests(root)
            rows.append((name, caught))
            print(f"{'caught' if caught else 'MISSED'}: {name}", flush=True)
        (root / TARGET).write_text(source)
    caught = sum(c for _, c in rows)
    lines = [
        "# TensorRT mutations (scripts/mutate_tensorrt.py)",
        "",
        f"`python scripts/mutate_tensorrt.py`: {caught} of {len(rows)} mutations of "
        f"`{TARGET}` make `tests/test_tensorrt.py` fail ({100 * caught / len(rows):.0f} %), on a CPU machine "
        "(the tests run against fakes of the TensorRT 10 and 11 APIs; no GPU is involved).",
        "",
        "| mutation | caught |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'yes' if c else '**no**'} |" for name, c in rows]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
