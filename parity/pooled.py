"""Pooled diagnosis: the failing records of a run, together, point to a catalogued deviation none names alone.

At bfloat16 a deviation can be as small as the rounding: each failing record sits within its own threshold of the
deviation's prediction (rel_l2 <= DIAGNOSIS["match_noise"] x its rounding noise) yet not far enough from the
correct output to be named (parity.diagnosis). Across records the evidence adds up. Per record and hypothesis the
evidence is ln(exact_residual / residual): how much closer the output is to the deviation's prediction than to
exact math's, both from the same float64 oracle on the record's own inputs (positive: closer to the deviation).
A hypothesis is named when, over the failing records that have a prediction for it,
- at least POOLED["min_records"] sit within their own match threshold and closer to it than to exact math,
- that is at least POOLED["min_support"] of them (a deviation explains its records consistently), and
- the summed evidence reaches POOLED["min_evidence"], ln(1 / better_than_correct): what one record alone needs.
Records diagnosed without an exact output (no 'exact_residual') take no part.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping

from parity.tolerances import DIAGNOSIS, POOLED


def _evidence(record: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """{hypothesis: (residual in units of the record's noise, ln(exact_residual / residual))} of one diagnosis."""
    diagnosis = record.get("diagnosis") or {}
    exact, noise = diagnosis.get("exact_residual"), diagnosis.get("noise")
    if exact is None or not noise:
        return {}
    out = {}
    for row in diagnosis.get("hypotheses") or []:
        residual = float(row["residual"])
        if not math.isfinite(residual):
            continue
        ratio = math.log(max(float(exact), 1e-300) / max(residual, 1e-300))
        out[row["name"]] = (residual / float(noise), ratio)
    return out


def pooled_diagnosis(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The hypotheses the failing records name together (see the module docstring), strongest evidence first;
    empty when none qualifies."""
    per_hypothesis: dict[str, list[tuple[Mapping[str, Any], float, float]]] = {}
    descriptions: dict[str, str] = {}
    for record in records:
        if record.get("passed", True):
            continue
        for name, (multiple, evidence) in _evidence(record).items():
            per_hypothesis.setdefault(name, []).append((record, multiple, evidence))
        for row in (record.get("diagnosis") or {}).get("hypotheses") or []:
            descriptions.setdefault(row["name"], row.get("description") or "")
    named = []
    for name, rows in per_hypothesis.items():
        supporting = [(r, m, e) for r, m, e in rows if m <= DIAGNOSIS["match_noise"] and e > 0]
        evidence = sum(e for _, m, e in rows if m <= DIAGNOSIS["match_noise"])
        if (len(supporting) < POOLED["min_records"] or len(supporting) < POOLED["min_support"] * len(rows)
                or evidence < POOLED["min_evidence"]):
            continue
        multiples = [m for _, m, _ in supporting]
        tests = {r.get("test") for r, _, _ in supporting}
        typical, worst = statistics.median(multiples), max(multiples)
        summary = (f"{name}: {len(supporting)} records, each at {typical:.1f}x noise (worst {worst:.1f}x); pooled: "
                   f"{len(supporting)} of {len(rows)} closer to it than to exact math, evidence {evidence:.1f} "
                   f"(one record alone needs {POOLED['min_evidence']:.1f})")
        named.append({"cause": name, "description": descriptions.get(name, ""), "records": len(rows),
                      "tests": len(tests), "supporting": len(supporting), "noise_multiple": typical,
                      "worst_noise_multiple": worst, "evidence": evidence, "summary": summary})
    return sorted(named, key=lambda row: -row["evidence"])
