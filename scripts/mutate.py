"""Do the tests catch one-token slips in the core numeric modules? Sampled mutation testing (issue 31).

    python scripts/mutate.py                       # every module below, 20 sampled mutants each
    python scripts/mutate.py --modules cascadec/prune/compensate.py --sample 0   # all of one module
    python scripts/mutate.py --resume              # continue, keeping the mutants already judged

Each mutant changes one operator or constant of one module (``+`` to ``-``, ``<`` to ``<=``,
``and`` to ``or``, ``not x`` to ``x``, a number n to n + 1, ``True`` to ``False``: the slips an
audit found the suite blind to), applied to a copy of the package; the module's tests (below)
then run against the copy. A mutant is *killed* when they fail or run past three times the
unmutated run's time; it *survives* when they pass. The module is rewritten with ``ast.unparse``
for every mutant and for the unmutated baseline alike, so formatting never differs between them.
Mutants are drawn at random (``--seed``) from every candidate site, so the score is an estimate
of the module's score with the sample's uncertainty (the report gives the count of candidates).

Results: ``bench/results/mutation.{json,md}``, rewritten after every mutant (``--resume`` keeps
what was judged): per module the candidates, mutants run, killed, survived, and each survivor
with its line, so it can be killed by a new test or explained as equivalent.
The TensorRT builder has its own hand-written mutants: ``scripts/mutate_tensorrt.py``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.mutants import package_copy  # noqa: E402 - the mutants' copy of the package, one definition

RESULTS = REPO / "bench" / "results"

# module -> the tests that are meant to catch its mistakes (pytest arguments)
MODULES: dict[str, list[str]] = {
    "cascadec/prune/compensate.py": ["tests/test_prune_compensate.py", "tests/test_audit.py", "-k", "compens or cap"],
    "cascadec/prune/cap.py": ["tests/test_prune_compensate.py", "tests/test_audit.py", "-k", "cap"],
    "cascadec/distill/losses.py": ["tests/test_distill.py", "tests/test_audit.py", "-k", "kd or distill or hsakd"],
    "cascadec/distill/hints.py": ["tests/test_distill_hints.py", "-m", "not slow"],
    "cascadec/prune/targets.py": ["tests/test_prune_targets.py", "-m", "not slow"],
    "cascadec/memory.py": ["tests/test_audit.py", "tests/test_zoo_refusals.py", "-k", "memory or activation or refus"],
    "cascadec/prune/fbs.py": ["tests/test_prune_fbs.py", "tests/test_audit.py", "-k", "fbs", "-m", "not slow"],
    "cascadec/prune/cost.py": ["tests/test_prune_targets.py", "tests/test_prune_latency.py", "-m", "not slow"],
    "cascadec/prune/latency.py": ["tests/test_prune_latency.py", "-m", "not slow"],
    "cascadec/prune/latency_refine.py": [
        "tests/test_prune_latency.py",
        "tests/test_audit.py",
        "-k",
        "latency or refine or speedup",
        "-m",
        "not slow",
    ],
    "cascadec/verify/compare.py": ["tests/test_verify.py", "-m", "not slow"],
    "cascadec/verify/gates.py": ["tests/test_verify.py", "tests/test_divergence.py", "-m", "not slow"],
    "cascadec/prune/shrink.py": [
        "tests/test_prune_masks.py",
        "tests/test_prune_groups.py",
        "tests/test_prune_shrunk_phase.py",
        "tests/test_prune_trial.py",
        "-m",
        "not slow",
    ],
    "cascadec/train/grad_sync.py": ["tests/test_grad_sync.py"],
}
# survivors read by hand: "equivalent: ..." (no test can tell them apart) or what kills them now;
# keyed by the mutated line's text, not its number, so edits elsewhere in a module keep them
EXPLAINED: dict[tuple[str, str, str], str] = {
    (
        "cascadec/prune/compensate.py",
        "2 -> 3",
        "return (cov + cov.T) / 2",
    ): "equivalent: the ridge is relative to the covariance's mean variance (_regularised) and CaP's errors to the output variance, so a global scale cancels",
    (
        "cascadec/prune/compensate.py",
        "Div -> Mult",
        "return (cov + cov.T) / 2",
    ): "equivalent: as above (a global scale of the covariance)",
    (
        "cascadec/prune/compensate.py",
        "256 -> 257",
        "_UNFOLD_BYTES = 256 * 2**20  # unfold a batch in chunks of images below this size",
    ): "equivalent: the unfold chunk size changes memory, not results",
    (
        "cascadec/prune/cap.py",
        "Is -> IsNot",
        "if stats is None:",
    ): "equivalent: every caller passes the statistics, and recomputing them from the same images and seed gives the same ones",
    (
        "cascadec/prune/cap.py",
        "USub dropped",
        "position = torch.full((w.shape[1],), -1, dtype=torch.long)",
    ): "equivalent: positions of removed dims are never read (only kept units' dims are looked up)",
    (
        "cascadec/prune/cap.py",
        "Sub -> Add",
        'report["seconds"] = time.perf_counter() - start',
    ): "killed since by tests/test_prune_compensate.py::test_prune_model_with_compensation[oneshot-compensated] (the record's seconds within the call's; checked by hand)",
    (
        "cascadec/prune/cap.py",
        "Add -> Sub",
        "trial[offset + int(kept[0])] = 0.0",
    ): "killed since by tests/test_prune_compensate.py::test_marginal_costs_are_what_removing_one_more_unit_of_the_group_saves (checked by hand)",
    (
        "cascadec/distill/hints.py",
        "1.0 -> 2.0",
        'DEFAULT_WEIGHTS = {"stages": 1.0, "paper": 0.001}  # paper: lambda_H (docs/paper.md, Losses)',
    ): "killed since by tests/test_distill_hints.py::test_hint_weights_default_to_one_for_stages_and_the_papers_lambda_h (checked by hand)",
    (
        "cascadec/prune/targets.py",
        "GtE -> Gt",
        "candidate = torch.where(scores >= best[self.segment_of_unit], position, len(scores))",
    ): "killed since by tests/test_prune_targets.py::test_every_segment_of_a_split_group_ranks_its_best_unit_first (checked by hand)",
    (
        "cascadec/prune/targets.py",
        "LtE -> Lt",
        "rounded = torch.where((self.narrow > 0) & (kept <= self.narrow), self.narrow, rounded)",
    ): "killed since by tests/test_prune_targets.py::test_the_narrow_width_is_kept_at_its_boundary_and_rounded_above_it (checked by hand)",
    (
        "cascadec/memory.py",
        "Mult -> Div",
        "return FALLBACK_ACTIVATIONS * image_bytes(shape)",
    ): "killed since by tests/test_audit.py::test_onnx_activation_bytes_count_every_float_tensor_at_batch_one (checked by hand)",
    (
        "cascadec/memory.py",
        "4 -> 5",
        "total += math.prod(sizes) * (4 if tensor.elem_type == onnx.TensorProto.FLOAT else 2)",
    ): "killed since by the same test (checked by hand)",
    (
        "cascadec/memory.py",
        "1 -> 2",
        "for dim, size in zip(dims, (1, *shape)):",
    ): "killed since by the same test (checked by hand)",
    (
        "cascadec/prune/fbs.py",
        "And -> Or",
        'if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), BATCHNORMS):',
    ): "killed since by tests/test_prune_fbs.py::test_only_a_conv_whose_one_reader_is_a_batchnorm_is_gated (checked by hand)",
    (
        "cascadec/prune/fbs.py",
        "0.01 -> 1.01",
        "gated.gate.fc.bias.copy_(1.0 + 0.01 * _gamma_rank(norm, conv.out_channels).to(gated.gate.fc.bias))",
    ): "killed since by tests/test_prune_fbs.py::test_fresh_gates_start_near_the_identity_and_break_ties_by_gamma (checked by hand)",
    (
        "cascadec/prune/cost.py",
        "0 -> 1",
        "kernel = m.weight[0, 0].numel() if conv else 1",
    ): "killed since by tests/test_prune_targets.py::test_a_conv_with_one_output_channel_is_costed_like_any_other (checked by hand, either index)",
    (
        "cascadec/prune/latency.py",
        "1 -> 2",
        "width = max(max(len(t.in_grid), len(t.out_grid)) for t in tables) if tables else 1",
    ): "equivalent: the width of padded grids with no layer rows (a network without timed layers) is never read",
    (
        "cascadec/prune/latency.py",
        "LtE -> Lt",
        "below = x <= grid[:, 0]",
    ): "equivalent: at x equal to the first grid point searchsorted already gives lo = hi = 0 and a weight of 0",
    (
        "cascadec/prune/latency.py",
        "1e-12 -> 1.000000000001",
        "ms_share = costs / costs.mean().clamp_min(1e-12)",
    ): "equivalent: a floor on the mean that scales every unit's ms share alike, and the weights are divided by their median",
    (
        "cascadec/prune/latency.py",
        "0.0 -> 1.0",
        "slopes_in.append(max(0.0, d_in) if full_in else 0.0)",
    ): "equivalent: the `else` of `if full_in`: a layer has at least one input channel (checked by hand: the other 0.0, max(1.0, d_in), is killed)",
    (
        "cascadec/prune/latency.py",
        "0.0 -> 1.0",
        'return sorted(out, key=lambda r: (r["time_per_flop"] is not None, r["time_per_flop"] or 0.0), reverse=True)',
    ): "equivalent: rows without a time per FLOP sort last by the key's first element whatever the second; only a group timed at exactly 0 ms would move",
    (
        "cascadec/prune/latency_refine.py",
        "4 -> 5",
        "SOLVES_PER_MEASUREMENT = 4",
    ): "killed since by tests/test_prune_latency.py::test_a_coarse_network_bounds_the_solves_not_only_the_measurements (checked by hand)",
    (
        "cascadec/prune/latency_refine.py",
        "1.0 -> 2.0",
        "seconds: float = 1.0,",
    ): "equivalent in outcome: the meter's timing duration per network (twice as long, the same measurement)",
    (
        "cascadec/prune/latency_refine.py",
        "1 -> 2",
        "self.calls += 1",
    ): "equivalent: the count only names the student's ONNX files (student-2.onnx, student-4.onnx, ...), unique either way",
    (
        "cascadec/prune/latency_refine.py",
        "False -> True",
        "progress=False,",
    ): "equivalent: progress bars while timing (output, not results)",
    (
        "cascadec/prune/latency_refine.py",
        "1.0 -> 2.0",
        "return min(1.0, max(0.0, f0 + (goal - y0) * (f1 - f0) / (y1 - y0)))",
    ): "equivalent: the interpolation is a convex combination of two budget fractions (the target lies between their measurements), so the clamp at 1 is never reached",
    (
        "cascadec/verify/compare.py",
        "1 -> 2",
        "return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)",
    ): "killed since by tests/test_verify.py::test_one_image_of_logits_compares_as_one_row (checked by hand, either 1)",
    (
        "cascadec/verify/compare.py",
        "Is -> IsNot",
        "bound = np.maximum(0.0 if tie.atol is None else tie.atol, (0.0 if tie.rtol is None else tie.rtol) * np.abs(best))",
    ): "killed since by tests/test_verify.py::test_a_tie_is_judged_by_atol_alone_or_rtol_alone (checked by hand)",
    (
        "cascadec/verify/gates.py",
        "Not dropped",
        'if not v >= limits["min_top5_agreement"]:',
    ): "killed since by tests/test_verify.py::test_a_top5_gate_fails_below_its_minimum_and_passes_at_it (checked by hand)",
    (
        "cascadec/verify/gates.py",
        "In -> NotIn",
        'if limits["min_top5_agreement"] is not None and "top5_agreement" in result:',
    ): "killed since by tests/test_verify.py::test_a_top5_gate_fails_below_its_minimum_and_passes_at_it (checked by hand)",
    (
        "cascadec/verify/gates.py",
        "0.0 -> 1.0",
        "rtol = 0.0 if tol.rtol is None else tol.rtol",
    ): "killed since by tests/test_verify.py::test_a_result_compared_under_other_tolerances_is_judged_by_its_max_differences (checked by hand)",
    (
        "cascadec/verify/gates.py",
        "And -> Or",
        'if "mismatched_elements" in result and result.get("atol") == tol.atol and result.get("rtol") == tol.rtol:',
    ): "killed since by the same test (checked by hand)",
    (
        "cascadec/prune/shrink.py",
        "Not dropped",
        "or not torch.equal(pos, pos.round())",
    ): "killed since by tests/test_prune_shrunk_phase.py (checked by hand; that file and tests/test_prune_trial.py joined the module's tests after the sampled run)",
    (
        "cascadec/prune/shrink.py",
        "And -> Or",
        "or (pos.numel() and (pos.min() < 0 or pos.max() >= full[name]))",
    ): "killed since by tests/test_prune_shrunk_phase.py (checked by hand)",
    (
        "cascadec/prune/shrink.py",
        "Is -> IsNot",
        "if target is None:",
    ): "killed since by tests/test_prune_shrunk_phase.py (checked by hand)",
    (
        "cascadec/prune/shrink.py",
        "USub dropped",
        "flat[positions[name].to(flat.device)] = t.detach().reshape(-1).to(flat.device, flat.dtype)",
    ): "killed since by tests/test_prune_shrunk_phase.py (checked by hand)",
    (
        "cascadec/prune/shrink.py",
        "Is -> IsNot",
        "if weight is None:",
    ): "killed since by tests/test_prune_trial.py (its weight-standardised NF-Net layers; checked by hand)",
    (
        "cascadec/train/grad_sync.py",
        "1 -> 2",
        "self.first_bucket_bytes = max(int(first_bucket_mb * MB), 1)",
    ): "equivalent in outcome: bucket sizes only group the all-reduce; the averaged gradients are the same however tensors are packed (the tests compare them bit for bit with after-backward averaging)",
    (
        "cascadec/train/grad_sync.py",
        "0 -> 1",
        "size, cap = 0, self.first_bucket_bytes",
    ): "equivalent in outcome: a bucket's byte count off by one moves a bucket boundary at most (as above)",
    (
        "cascadec/memory.py",
        "And -> Or",
        "if tensor.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and sizes and all(sizes):",
    ): "killed since by tests/test_audit.py::test_onnx_activation_bytes_count_float_tensors_only (checked by hand)",
    (
        "cascadec/prune/shrink.py",
        "NotEq -> Eq",
        "if param.shape[0] != width:  # a Torch-Pruning version that already sliced it",
    ): "killed since by tests/test_prune_trial.py::test_a_conv_subclass_own_per_channel_parameter_is_sliced_with_its_weight (checked by hand; no test had a conv subclass with its own per-channel parameter that folding leaves in place: the NF-Net test's ``gain`` is folded away before Torch-Pruning runs)",
    (
        "cascadec/memory.py",
        "3 -> 4",
        "TRAINING_FACTOR = 3  # forward activations kept for backward, their gradients, and the optimiser's step",
    ): "killed since by tests/test_audit.py::test_the_training_estimate_bounds_a_measured_step_without_refusing_far_too_early (checked by hand; the estimate against a measured peak, so 1 fails it too)",
    (
        "cascadec/memory.py",
        "0 -> 1",
        "return int(total * (height * width) / (probe[0] * probe[1])) + image_bytes(shape)",
    ): "equivalent: the probe image is square (PROBE_SIZE x PROBE_SIZE)",
}
BINOPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult,
}
CMPOPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}


@dataclass
class Site:
    """One mutant: the ``number``-th candidate node in ``ast.walk`` order and what it becomes."""

    number: int
    line: int
    what: str


def _docstring_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _annotation_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
            args = node.args
            annotations += [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs]
        for a in annotations:
            if a is not None:
                out.update(id(n) for n in ast.walk(a))
    return out


def _mutation(node: ast.AST, skip: set[int]) -> str | None:
    """What mutating ``node`` would do, or None when it is not a candidate."""
    if id(node) in skip:
        return None
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        return f"{type(node.op).__name__} -> {BINOPS[type(node.op)].__name__}"
    if isinstance(node, ast.AugAssign) and type(node.op) in BINOPS:
        return f"{type(node.op).__name__}= -> {BINOPS[type(node.op)].__name__}="
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMPOPS:
        return f"{type(node.ops[0]).__name__} -> {CMPOPS[type(node.ops[0])].__name__}"
    if isinstance(node, ast.BoolOp):
        return "And -> Or" if isinstance(node.op, ast.And) else "Or -> And"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return f"{type(node.op).__name__} dropped"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return f"{node.value} -> {not node.value}"
        if isinstance(node.value, (int, float)):
            return f"{node.value!r} -> {node.value + 1!r}"
    return None


def _apply(node: ast.AST) -> ast.AST:
    """Mutate ``node`` in place (or return its replacement)."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = BINOPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops = [CMPOPS[type(node.ops[0])]()]
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        return node.operand
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    return node


def sites(source: str) -> list[Site]:
    tree = ast.parse(source)
    skip = _docstring_ids(tree) | _annotation_ids(tree)
    out = []
    for number, node in enumerate(ast.walk(tree)):
        what = _mutation(node, skip)
        if what is not None:
            out.append(Site(number, getattr(node, "lineno", 0), what))
    return out


def mutant(source: str, site: Site) -> str:
    """The module's text with ``site`` mutated (through ``ast.unparse``)."""
    tree = ast.parse(source)
    nodes = list(ast.walk(tree))
    target = nodes[site.number]
    replacement = _apply(target)
    if replacement is not target:  # an operand replaces its UnaryOp: swap it in the parent
        for parent in nodes:
            for field, value in ast.iter_fields(parent):
                if value is target:
                    setattr(parent, field, replacement)
                elif isinstance(value, list):
                    for i, item in enumerate(value):
                        if item is target:
                            value[i] = replacement
    return ast.unparse(tree)


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """'pass', 'fail' or 'timeout', and the seconds, of the module's tests against ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "CASCADEC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 5:  # no test selected: a broken selection, not a verdict
        raise SystemExit(f"no tests selected by {tests}")
    return ("pass" if proc.returncode == 0 else "fail"), seconds


def write(doc: dict, out: Path) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    lines = [
        "# Mutation testing of the core numeric modules (scripts/mutate.py)",
        "",
        f"{', '.join(f'`{c}`' for c in dict.fromkeys(m.get('command', doc['command']) for m in doc['modules'].values()))} "
        f"({doc['status']}). A mutant is killed when the module's tests fail (or run past 3x "
        "the unmutated run's time); the score is killed / run. Mutants are a random sample of the candidate sites "
        "(`--seed`), so each score estimates the module's.",
        "",
        "| module | tests | candidates | run | killed | survived | of them equivalent | score | without the equivalent | with the tests added since |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in doc["modules"].items():
        judged = [r for r in m["mutants"] if r["verdict"] in ("fail", "timeout", "pass")]
        killed = sum(r["verdict"] != "pass" for r in judged)
        notes = [EXPLAINED.get((name, r["what"], r["text"]), "") for r in judged if r["verdict"] == "pass"]
        equivalent = sum(n.startswith("equivalent") for n in notes)
        since = sum(n.startswith("killed since") for n in notes)
        real = len(judged) - equivalent

        def pct(k: int, n: int) -> str:
            return f"{100 * k / n:.0f} %" if n else "-"

        lines.append(
            f"| `{name}` | `{' '.join(m['tests'])}` | {m['candidates']} | {len(judged)} | {killed} | "
            f"{len(judged) - killed} | {equivalent} | {pct(killed, len(judged))} | {pct(killed, real)} | "
            f"{pct(killed + since, real)} |"
        )
    lines += ["", "## Survivors", ""]
    for name, m in doc["modules"].items():
        for r in m["mutants"]:
            if r["verdict"] == "pass":
                explained = EXPLAINED.get((name, r["what"], r["text"]))
                note = f" - {explained}" if explained else " - not killed yet"
                lines.append(f"- `{name}` line {r['line']}: {r['what']}: `{r['text']}`{note}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", default=list(MODULES), help="modules (keys of MODULES)")
    p.add_argument("--sample", type=int, default=20, help="mutants per module (0: every candidate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "mutation")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    out = args.out.with_suffix("")
    doc = {"command": "python scripts/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:]), "modules": {}}
    if args.resume and out.with_suffix(".json").is_file():
        doc["modules"] = json.loads(out.with_suffix(".json").read_text())["modules"]
    doc["status"] = "running"
    with tempfile.TemporaryDirectory(prefix="cascadec-mutants-") as tmp:
        root = package_copy(Path(tmp))
        for name in args.modules:
            tests = MODULES[name]
            source = (REPO / name).read_text()
            candidates = sites(source)
            chosen = list(candidates)
            random.Random(args.seed).shuffle(chosen)
            if args.sample:
                chosen = chosen[: args.sample]
            entry = doc["modules"].setdefault(name, {"tests": tests, "mutants": []})
            entry["candidates"] = len(candidates)
            entry["command"] = doc["command"]
            judged = {(r["number"], r["what"]) for r in entry["mutants"]}
            (root / name).write_text(ast.unparse(ast.parse(source)))
            verdict, base = run_tests(root, tests, timeout=1800)
            if verdict != "pass":
                raise SystemExit(f"{name}: the tests fail on the unmutated (unparsed) copy; fix them first")
            entry["baseline_seconds"] = round(base, 1)
            print(f"{name}: {len(candidates)} candidates, {len(chosen)} to run, baseline {base:.0f} s", flush=True)
            for site in chosen:
                if (site.number, site.what) in judged:
                    continue
                text = mutant(source, site)
                (root / name).write_text(text)
                shutil.rmtree((root / name).parent / "__pycache__", ignore_errors=True)
                verdict, seconds = run_tests(root, tests, timeout=max(60.0, 3 * base))
                line = source.splitlines()[site.line - 1].strip() if site.line else ""
                entry["mutants"].append(
                    {
                        "number": site.number,
                        "line": site.line,
                        "what": site.what,
                        "text": line,
                        "verdict": verdict,
                        "seconds": round(seconds, 1),
                    }
                )
                print(f"  line {site.line}: {site.what}: {verdict} ({seconds:.0f} s)", flush=True)
                write(doc, out)
            (root / name).write_text(source)
    doc["status"] = "finished"
    write(doc, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
