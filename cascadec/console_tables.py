"""The tables and lines the CLI prints (inspect, parity, latency, the run summary), kept apart
from ``cli.py`` so the command file only parses, calls the library and hands results here.
Each function prints to the Console it is given."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cascadec.formatting import fmt_flops, fmt_params, speedup_range
from cascadec.report_render import summary_table
from cascadec.verify.present import PARITY_COLUMNS, float64_verdict, parity_rows
from cascadec.verify.results import ParityResult


def print_inspect(out: Console, r: dict, method: str | None = None) -> None:
    out.print(
        f"[bold]{r['model']}[/] input {'x'.join(map(str, r['input_shape']))}: {fmt_flops(r['flops'])}, "
        f"{fmt_params(r['params'])} params, {r['prunable_units']} prunable channels in {len(r['groups'])} groups"
    )
    target = r.get("target")
    table = Table("group root", "layers", "channels", *(["kept"] if target else []), title="prunable groups")
    for g in r["groups"]:
        table.add_row(g["root"], str(g["layers"]), str(g["channels"]), *([str(g.get("kept", "-"))] if target else []))
    out.print(table)
    if r["frozen"]:
        frozen = Table("group root", "channels", "why it is not pruned", title="frozen groups")
        for f in r["frozen"]:
            frozen.add_row(f["root"], str(f["channels"]), f["reason"])
        out.print(frozen)
    lat = r.get("latency")
    if lat:
        measured = f"; whole network measured {lat['network_ms']:.3g} ms" if lat.get("network_ms") else ""
        origin = "loaded from the cache" if lat["cached"] else f"built in {lat['build_seconds']:.0f} s"
        out.print(
            f"latency table ({lat['backend']}, batch {lat['batch']}): {lat['layers']} layers in "
            f"{lat['configurations']} configurations, {lat['grid_points']} widths timed, {origin}{measured}",
            highlight=False,
        )
        block = lat.get("channel_block", 1)
        out.print(
            (
                f"channel block: latency steps every {block} channels on this backend; "
                if block > 1
                else "channel block: latency smooth in width on this backend; "
            )
            + f"widths timed, and a latency target's widths, at multiples of {lat.get('multiple', 8)}"
            + (f" and {lat['narrow']} below them" if lat.get("narrow") else ""),
            highlight=False,
        )
        if lat.get("time_per_flop"):
            where = Table(
                "layers", "input", "count", "share of time", "share of FLOPs", "time per FLOP",
                title="where the time goes at full width (time per FLOP against the network's)",
            )  # fmt: skip
            for row in lat["time_per_flop"]:
                ratio = row["time_per_flop"]
                where.add_row(
                    row["kind"], row["input"], str(row["layers"]), f"{row['time_share']:.1%}",
                    f"{row['flops_share']:.1%}", f"{ratio:.2f}x" if ratio is not None else "-",
                )  # fmt: skip
            out.print(where)
    if method is not None and isinstance(r.get(method), dict):  # what the recipe's method says before a run
        from cascadec.prune.method import get_method

        for line in get_method(method).preview_lines(r[method], r):
            out.print(line)
    if target:
        predicted = (
            f", predicted {target['latency_ms']:.3g} ms ({lat['predicted_ms'] / target['latency_ms']:.2f}x faster)"
            if lat and "latency_ms" in target
            else ""
        )
        out.print(
            f"target {target['description']}: {fmt_flops(target['flops'])} ({target['flops'] / r['flops']:.1%} of FLOPs), "
            f"{fmt_params(target['params'])} params ({target['params'] / r['params']:.1%}){predicted}; {target['note']}"
        )


def print_parity(out: Console, result: ParityResult) -> None:
    table = Table(*PARITY_COLUMNS, title="parity vs PyTorch")
    for row in parity_rows(result):
        passed = row[-1]
        table.add_row(*row[:-1], "[green]yes[/]" if passed == "yes" else "[red]NO[/]")
    out.print(table)
    for name, b in result.backends.items():
        verdict = float64_verdict(name, b.float64_judgement)
        if verdict and b.passed:  # (a failed gate prints it under the failure table)
            out.print(verdict, highlight=False)
    if result.torch_accuracy is not None:
        out.print(f"PyTorch student accuracy on these samples: {result.torch_accuracy:.4f}", highlight=False)


def print_latency(out: Console, result: dict) -> None:
    from cascadec.profile.results import ProfileResult

    protocol = result.get("protocol") or {}
    models = ProfileResult.from_dict(protocol.get("backend", ""), result).models
    split = any("compute_p50_ms" in s for per_batch in models.values() for s in per_batch.values())
    columns = ["model", "batch", "p50 ms", "p90 ms", "p99 ms", "runs", "images/s"] + (
        ["GPU compute p50 ms"] if split else []
    )
    table = Table(*columns, title=f"latency ({protocol.get('backend', 'onnxruntime')})")
    for name, per_batch in models.items():
        for b, s in per_batch.items():
            row = [
                name,
                str(b),
                f"{s['p50_ms']:.3f}",
                f"{s['p90_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
                str(s["iterations"]),
                f"{s['throughput']:.0f}",
            ]
            table.add_row(*row, *([f"{s['compute_p50_ms']:.3f}"] if split else []))
    out.print(table)
    if result.get("speedup"):
        rounds = result.get("speedup_rounds") or {}
        shown = [f"batch {b}: {s:.2f}x {speedup_range(rounds.get(b))}".strip() for b, s in result["speedup"].items()]
        out.print("speed-up (teacher p50 / student p50): " + ", ".join(shown), highlight=False)
    if result.get("note"):
        out.print(result["note"], highlight=False)
    if protocol.get("note"):
        out.print(protocol["note"], highlight=False)


def print_summary(out: Console, report: dict) -> None:
    out.print(summary_table(report))
    out.print(f"artifacts and report.md in {report['run']['dir']}")
