"""Check that each GPU extra resolves to one CUDA major (issue 28).

    python scripts/check_gpu_extras.py [--extras gpu-cu12 gpu-cu13]

For each extra in pyproject.toml, pip resolves cascadec's core dependencies plus the extra from
PyPI alone (``pip install --isolated --index-url https://pypi.org/simple --dry-run --report``),
with one substitution: TensorRT's ``tensorrt-cuNN`` meta package and its ``tensorrt-cuNN-libs``
are stubs on PyPI that download the real wheels from NVIDIA's index (https://pypi.nvidia.com, which
this machine cannot reach), so the check resolves ``tensorrt-cuNN-bindings`` (real wheels on PyPI,
same version numbers) in their place and then checks that PyPI lists a ``tensorrt-cuNN-libs`` stub
for the version it chose. The CUDA major of each part is read from the resolved metadata:

* torch: its ``nvidia-cuda-runtime-cuNN`` / ``nvidia-cudnn-cuNN`` requirements;
* onnxruntime-gpu: the same names under its ``cuda`` / ``cudnn`` extras;
* TensorRT: the ``cuNN`` in its package names.

Every part must name the extra's CUDA major. Results: bench/results/gpu-extras.{json,md}; the
exit status is 1 when any extra resolves to mixed majors or fails to resolve.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import tomllib  # Python 3.11+: a developer's script, not part of the package

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYPI = "https://pypi.org/simple"


def extra_requirements(extra: str) -> tuple[list[str], list[str]]:
    """(core dependencies, the extra's own requirements) from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if extra not in project["optional-dependencies"]:
        raise SystemExit(f"pyproject.toml has no extra {extra!r}")
    return list(project["dependencies"]), list(project["optional-dependencies"][extra])


def substitute_tensorrt(requirements: list[str]) -> tuple[list[str], str | None]:
    """``tensorrt-cuNN SPEC`` -> ``tensorrt-cuNN-bindings SPEC`` (real wheels on PyPI); returns the
    requirements and the TensorRT package name (None when the extra has none)."""
    out, name = [], None
    for req in requirements:
        m = re.match(r"(tensorrt-cu\d+)(.*)$", req)
        if m:
            name = m.group(1)
            out.append(f"{name}-bindings{m.group(2)}")
        else:
            out.append(req)
    return out, name


def resolve(requirements: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--isolated", "--index-url", PYPI, "--dry-run",
            "--ignore-installed", "--quiet", "--report", str(report), *requirements,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["pip failed"])[-1][:300]}
        return json.loads(report.read_text())


def cuda_majors(requires: list[str], extras: tuple[str, ...] = ()) -> set[int]:
    """CUDA majors named by ``nvidia-cuda-runtime-cuNN`` / ``nvidia-cudnn-cuNN`` requirements (those
    behind an ``extra == X`` marker only for X in ``extras``)."""
    majors = set()
    for req in requires:
        marker = re.search(r'extra\s*==\s*"([^"]+)"', req)
        if marker and marker.group(1) not in extras:
            continue
        m = re.match(r"nvidia-(?:cuda-runtime|cudnn)-cu(\d+)", req.strip())
        if m:
            majors.add(int(m.group(1)))
    return majors


def libs_listed(name: str, version: str) -> bool:
    """Whether PyPI's simple index lists ``NAME-libs`` at ``version`` (the stub that fetches the
    real libraries from NVIDIA's index)."""
    request = urllib.request.Request(f"{PYPI}/{name}-libs/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    return any(f["filename"].startswith(f"{name.replace('-', '_')}_libs-{version}.") for f in files)


def check(extra: str) -> dict:
    core, own = extra_requirements(extra)
    want = int(re.search(r"cu(\d+)$", extra).group(1))
    own, trt = substitute_tensorrt(own)
    report = resolve(core + own)
    row: dict = {"extra": extra, "cuda": want, "requirements": own}
    if "error" in report:
        return row | {"ok": False, "problems": [f"does not resolve from PyPI: {report['error']}"]}
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"] for i in report["install"]}
    parts: dict[str, dict] = {}
    if "torch" in installed:
        meta = installed["torch"]
        parts["torch"] = {"version": meta["version"], "cuda": sorted(cuda_majors(meta.get("requires_dist", [])))}
    if "onnxruntime-gpu" in installed:
        meta = installed["onnxruntime-gpu"]
        majors = cuda_majors(meta.get("requires_dist", []), ("cuda", "cudnn"))
        parts["onnxruntime-gpu"] = {"version": meta["version"], "cuda": sorted(majors)}
    if trt:
        meta = installed.get(f"{trt}-bindings")
        version = meta["version"] if meta else None
        parts["tensorrt"] = {
            "package": trt,
            "version": version,
            "cuda": [int(trt.removeprefix("tensorrt-cu"))],
            "libs_on_pypi": bool(version) and libs_listed(trt, version),
        }
    problems = [
        f"{name} {p.get('version')}: CUDA {p['cuda'] or 'unknown'}" for name, p in parts.items() if p["cuda"] != [want]
    ]
    if trt and not parts["tensorrt"]["libs_on_pypi"]:
        problems.append(f"{trt}-libs {parts['tensorrt']['version']}: not listed on PyPI")
    others = sorted({n for n in installed if re.match(r"nvidia-.*-cu(\d+)$", n) and not n.endswith(f"-cu{want}")})
    if others:
        problems.append(f"CUDA packages of another major pulled in: {', '.join(others)}")
    return row | {"ok": not problems, "parts": parts, "problems": problems}


def markdown(rows: list[dict]) -> str:
    lines = [
        "# GPU extras: one CUDA major each (issue 28)",
        "",
        "Command: `python scripts/check_gpu_extras.py` (its docstring gives the protocol). Resolved from PyPI "
        "alone, TensorRT's stub `-libs` packages replaced by the real `-bindings` wheels; installing TensorRT "
        "still needs `--extra-index-url https://pypi.nvidia.com` for the libraries.",
        "",
        "| extra | CUDA | torch | onnxruntime-gpu | TensorRT | result |",
        "|---|---|---|---|---|---|",
    ]

    def cell(parts: dict, name: str) -> str:
        part = parts.get(name)
        return f"{part['version']} (CUDA {', '.join(map(str, part['cuda'])) or '?'})" if part else ""

    for r in rows:
        p = r.get("parts", {})

        verdict = "one major" if r["ok"] else "; ".join(r["problems"])
        lines.append(
            f"| `{r['extra']}` | {r['cuda']} | {cell(p, 'torch')} | {cell(p, 'onnxruntime-gpu')} | {cell(p, 'tensorrt')} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", nargs="*", default=["gpu-cu12", "gpu-cu13"])
    args = parser.parse_args()
    rows = []
    for extra in args.extras:
        rows.append(check(extra))
        print(f"{extra}: {'one CUDA major' if rows[-1]['ok'] else '; '.join(rows[-1]['problems'])}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu-extras.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "gpu-extras.md").write_text(markdown(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
