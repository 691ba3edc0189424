"""Parity results in words: the failure table a failed gate prints, the diagnosis lines
under it, and the rows of the parity table the CLI shows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cascadec.errors import GateFailed
from cascadec.verify.gates import fmt_tolerance
from cascadec.verify.results import ParityResult


def _num(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parity_rows(result: ParityResult) -> list[list[str]]:
    """backend, precision, samples, max |diff|, max rel, atol / rtol, top-1, top-5, accuracy, passed."""
    rows = []
    for name, b in result.backends.items():
        m = b.metrics
        rows.append(
            [
                name,
                b.precision,
                str(result.samples),
                _num(m.get("max_abs_diff"), ".2e"),
                _num(m.get("max_rel_diff"), ".2e"),
                f"{_num(m.get('atol'), 'g')} / {_num(m.get('rtol'), 'g')}",
                _num(m.get("top1_agreement"), ".4f"),
                _num(m.get("top5_agreement"), ".4f"),
                _num(m.get("accuracy"), ".4f"),
                "yes" if b.passed else "NO",
            ]
        )
    return rows


PARITY_COLUMNS = (
    "backend",
    "precision",
    "samples",
    "max |diff|",
    "max rel",
    "atol / rtol",
    "top-1 agree",
    "top-5 agree",
    "accuracy",
    "passed",
)


def conditioning_verdict(backend: str, found: Mapping | None) -> str | None:
    """Whether the failure is the network's float32 arithmetic or the backend, in words."""
    if not isinstance(found, Mapping):
        return None
    if found.get("error"):
        return f"not checked: {found['error']}"
    torch_error, candidate_error = found.get("torch_fp32_vs_fp64"), found.get("candidate_vs_fp64")
    head = (
        f"on {found.get('samples')} samples PyTorch float32 is {torch_error:.3g} from "
        f"PyTorch float64 and {backend} is {candidate_error:.3g}"
    )
    if found.get("ill_conditioned"):
        return (
            head
            + ": the network amplifies float32 rounding beyond the tolerance (ill-conditioned), the backend is not the cause"
        )
    return head + f": {backend} itself departs from the exact result"


def float64_verdict(backend: str, judged: Mapping | None) -> str | None:
    """How an ill-conditioned network's backend fared against PyTorch float64, in words."""
    if not isinstance(judged, Mapping):
        return None
    if judged.get("error"):
        return f"{backend} not judged against float64: {judged['error']}"
    t, c = judged.get("torch_fp32") or {}, judged.get("candidate") or {}
    head = (
        f"{backend} judged against PyTorch float64 on all {judged.get('samples')} samples (verify.ill_conditioned: "
        f"float64): max |diff| {_num(c.get('max_abs_diff'), '.3g')} vs PyTorch float32's own "
        f"{_num(t.get('max_abs_diff'), '.3g')}, top-1 agreement {_num(c.get('top1_agreement'), '.4f')} vs "
        f"{_num(t.get('top1_agreement'), '.4f')}"
    )
    if judged.get("failures"):
        return head + ": still fails " + ", ".join(f["metric"] for f in judged["failures"])
    excused = ", ".join(judged.get("excused") or []) or "nothing"
    return head + f": passes, no worse than PyTorch float32 (excused: {excused})"


def describe_conditioning(backend: str, found: Mapping | None) -> str | None:
    """The verdict as a line under the failure table."""
    verdict = conditioning_verdict(backend, found)
    return None if verdict is None else f"conditioning ({backend}): {verdict}"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    table = [tuple(header), *[tuple(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]


def describe_divergence(backend: str, found: Mapping | None) -> str | None:
    """One line naming the first divergent layer, or why none was named."""
    if not isinstance(found, Mapping):
        return None
    if not found.get("node"):
        return f"first divergent layer ({backend}): not found: {found.get('error', 'unknown')}"
    module = found.get("torch_module")
    where = f", torch module {module}" if module else ""
    tol = found.get("tolerance") or {}
    if found.get("nonfinite"):
        return (
            f"first divergent layer ({backend}): ONNX node {found['node']!r} ({found.get('op_type')}{where}) "
            f"output {found.get('output')!r} is the first to hold NaN/inf"
        )
    return (
        f"first divergent layer ({backend}): ONNX node {found['node']!r} ({found.get('op_type')}{where}) "
        f"output {found.get('output')!r}: max|diff| {found.get('max_abs_diff', float('nan')):.3g} vs "
        f"{found.get('reference')} on {found.get('device')}, tolerance atol {fmt_tolerance(tol.get('atol'))} rtol {fmt_tolerance(tol.get('rtol'))}"
    )


def raise_on_failure(result: ParityResult | Mapping) -> None:
    """Raise :class:`GateFailed` with a plain-text table (backend, precision, metric, value,
    required) and the diagnosis of each failed backend, when any gate failed. ``result`` may
    be the manifest's dict form (a resumed run)."""
    if not isinstance(result, ParityResult):
        result = ParityResult.from_dict(result)
    rows = result.failure_rows()
    if not rows:
        return
    header = ("backend", "precision", "metric", "value", "required")
    cells = [
        (
            r["backend"],
            r["precision"],
            r["metric"],
            r.get("shown") or ("missing" if r["value"] is None else f"{r['value']:.6g}"),
            r.get("required") or f"{r['op']} {r['threshold']:g}",
        )
        for r in rows
    ]
    lines = _text_table(header, cells)
    if result.nonfinite_weights:
        lines.append(
            f"the PyTorch model's weights hold NaN/inf ({', '.join(result.nonfinite_weights)}): every backend computes "
            "what it was given; the weights, not the export, are at fault"
        )
    for name in result.failed:
        b = result.backends[name]
        for line in (
            describe_divergence(name, b.first_divergence),
            describe_conditioning(name, b.conditioning),
            float64_verdict(name, b.float64_judgement),
        ):
            if line:
                lines.append(line)
    raise GateFailed(f"parity gate failed for {', '.join(result.failed)}:\n" + "\n".join(lines), failures=rows)
