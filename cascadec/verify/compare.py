"""Comparison numbers: how far a candidate's logits are from the reference's.

Metrics follow Polygraphy's vocabulary and semantics (``polygraphy/comparator/compare.py``)
so numbers can be compared with what TensorRT users already know:

* an element *mismatches* when ``|cand - ref| > atol`` **and** ``|cand - ref| / |ref| > rtol``
  (Polygraphy's default ``elemwise`` check): it passes when either tolerance covers it,
  i.e. ``|cand - ref| <= max(atol, rtol * |ref|)``;
* relative error divides by the reference (PyTorch) with exact zeros nudged by the float64
  machine epsilon, as Polygraphy does;
* the *minimum required tolerance* is reported as Polygraphy prints it, ``abs=max|diff|``
  OR ``rel=max rel`` (each alone would pass), plus the smaller atol (rtol) that passes
  together with the configured rtol (atol).

Numpy only: no torch, no backends, no policy (thresholds live in :mod:`cascadec.verify.gates`).
"""

from __future__ import annotations

import numpy as np

from cascadec.errors import UserError
from cascadec.verify.gates import Tolerance

_REL_EPS = float(np.finfo(np.float64).eps)  # Polygraphy adds 2.22e-16 to exact zeros of the reference


def as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)


def _top5_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of rows whose top-5 class *sets* match; order inside the top-5 is ignored."""
    ref_top = np.sort(np.argpartition(-ref, 4, axis=1)[:, :5], axis=1)
    cand_top = np.sort(np.argpartition(-cand, 4, axis=1)[:, :5], axis=1)
    return float(np.mean(np.all(ref_top == cand_top, axis=1)))


def tensor_errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise absolute and relative (to the reference) error, Polygraphy's way, in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    with np.errstate(all="ignore"):  # inf - inf and x / 0 are answered by NaN/inf, never by a warning
        absdiff = np.abs(cand - ref)
        denom = np.abs(ref)
        denom = np.where(denom == 0, _REL_EPS, denom)
        reldiff = absdiff / denom
    return absdiff, reldiff


def mismatches(absdiff: np.ndarray, reldiff: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """Polygraphy ``elemwise``: an element fails when it exceeds *both* tolerances (NaN always fails)."""
    atol = 0.0 if tolerance.atol is None else tolerance.atol
    rtol = 0.0 if tolerance.rtol is None else tolerance.rtol
    return ((absdiff > atol) | np.isnan(absdiff)) & ((reldiff > rtol) | np.isnan(reldiff))


def top1_disagreements(ref: np.ndarray, cand: np.ndarray, tie: Tolerance | None = None) -> tuple[np.ndarray, int]:
    """Rows whose top-1 class differs, and how many differing rows were reference ties.

    With ``tie``, a row counts as disagreeing only when the reference's own top-1 margin over
    the candidate's class exceeds the tolerance (``max(atol, rtol * |best|)``): two classes the
    reference scores within that margin are a tie it cannot decide either. Random-weight
    networks and quantized logits tie often; ``timm/resmlp_12_224`` "disagreed" on 1 sample in
    8 at a max |diff| of 5e-8 when ties counted."""
    ref_top1, cand_top1 = ref.argmax(axis=1), cand.argmax(axis=1)
    differ = ref_top1 != cand_top1
    if tie is None or not tie.checks_tensors or not differ.any():
        return differ, 0
    rows = np.arange(ref.shape[0])
    best = ref[rows, ref_top1]
    margin = best - ref[rows, cand_top1]
    bound = np.maximum(0.0 if tie.atol is None else tie.atol, (0.0 if tie.rtol is None else tie.rtol) * np.abs(best))
    decided = differ & ~(margin <= bound)  # NaN margins stay disagreements
    return decided, int(np.count_nonzero(differ) - np.count_nonzero(decided))


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None = None,
    tolerance: Tolerance | None = None,
    *,
    tie_tolerance: Tolerance | None = None,
) -> dict:
    """Summarise how far ``candidate`` logits are from ``reference`` logits.

    With ``tolerance`` the result also counts mismatched elements and gives the minimum atol
    (rtol) that would pass with the configured rtol (atol). Non-finite values make every
    error metric infinite, so a NaN-producing engine can never pass a gate through NaN
    comparisons evaluating to False. ``tie_tolerance`` makes top-1 agreement forgive rows
    where the reference itself ties (:func:`top1_disagreements`); ``top1_ties`` counts them.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise UserError(f"output shapes differ: reference {ref.shape} vs candidate {cand.shape}")
    if ref.size == 0:
        raise UserError("no outputs to compare (0 samples)")
    ref2, cand2 = as_2d(ref), as_2d(cand)
    nonfinite = int(np.count_nonzero(~np.isfinite(ref2)) + np.count_nonzero(~np.isfinite(cand2)))
    absdiff, reldiff = tensor_errors(ref2, cand2)
    if nonfinite:
        max_abs = mean_abs = max_rel = float("inf")
    else:
        max_abs = float(absdiff.max())
        mean_abs = float(absdiff.mean())
        max_rel = float(reldiff.max())
    ref_top1, cand_top1 = ref2.argmax(axis=1), cand2.argmax(axis=1)
    result: dict = {
        "samples": int(ref2.shape[0]),
        "num_classes": int(ref2.shape[1]),
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "max_rel_diff": max_rel,
        # Polygraphy's "Minimum Required Tolerance: [abs=..] OR [rel=..]": each alone would pass.
        "min_atol_to_pass": max_abs,
        "min_rtol_to_pass": max_rel,
        "nonfinite": nonfinite,
    }
    differ, ties = top1_disagreements(ref2, cand2, tie_tolerance)
    result["top1_agreement"] = float(1.0 - np.mean(differ))
    if tie_tolerance is not None:
        result["top1_ties"] = ties
    if tolerance is not None and tolerance.checks_tensors:
        bad = mismatches(absdiff, reldiff, tolerance)
        atol = 0.0 if tolerance.atol is None else tolerance.atol
        rtol = 0.0 if tolerance.rtol is None else tolerance.rtol
        # with rtol fixed, the elements rtol does not cover need atol >= their |diff| (and vice versa)
        outside_rtol = (reldiff > rtol) | np.isnan(reldiff)
        outside_atol = (absdiff > atol) | np.isnan(absdiff)
        result.update(
            atol=tolerance.atol,
            rtol=tolerance.rtol,
            mismatched_elements=int(np.count_nonzero(bad)),
            total_elements=int(bad.size),
            min_atol_at_rtol=float("inf") if nonfinite else float(absdiff[outside_rtol].max(initial=0.0)),
            min_rtol_at_atol=float("inf") if nonfinite else float(reldiff[outside_atol].max(initial=0.0)),
        )
    if ref2.shape[1] >= 5:
        result["top5_agreement"] = _top5_agreement(ref2, cand2)
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != ref2.shape[0]:
            raise UserError(f"{y.shape[0]} labels for {ref2.shape[0]} outputs")
        result["accuracy"] = float(np.mean(cand_top1 == y))
        result["reference_accuracy"] = float(np.mean(ref_top1 == y))
    return result
