"""Diagnosis: which known deviation a failing output matches, not only where it fails.

A caller that knows the inputs of a failing comparison predicts, for each catalogued deviation (a named,
documented bug or misconfiguration), what exact math would give with that deviation; `diagnose` measures the
implementation's distance (rel_l2) to each prediction and calls a deviation matched when that distance is at
rounding noise — no more than `DIAGNOSIS["match_noise"]` times the reference's own error against exact math at
the same dtype, and far below its distance to the correct result. Matches are ranked by residual; without one
the answer is "no known cause", with the closest deviation and its residual, never a wrong name.

Predictions come lazily from the caller (a callable), so the cost is paid only by failing records.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np

from parity.metrics import rel_l2
from parity.tolerances import DIAGNOSIS


class Prediction(NamedTuple):
    description: str   # what the deviation is: "Llama 3.1 RoPE scaling not applied"
    evidence: str      # what the prediction is: "Meta's reference with use_scaled_rope=False"
    value: np.ndarray  # the output exact math gives with the deviation, for the failing inputs


Predict = Callable[[], Mapping[str, Prediction]]


def residual(a, b) -> float:
    """rel_l2 of a against b; a prediction of another shape cannot match (inf)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return rel_l2(a, b) if a.shape == b.shape else float("inf")


def diagnose(actual, expected, predictions: Mapping[str, Prediction], noise: float, exact=None) -> dict:
    """Rank the deviations by how close `actual` is to each prediction; see the module docstring.

    noise: the reference's own rel_l2 against exact math at this dtype (floored at float32 resolution), the
    residual a faithful implementation of a deviation would leave. `expected` is the correct reference output;
    `exact`, when given, exact math's (the predictions' own no-deviation output): its residual is kept as
    'exact_residual', the evidence parity.pooled weighs each prediction's residual against.
    """
    noise = max(float(noise), DIAGNOSIS["noise_floor"])
    baseline = residual(actual, expected)
    rows = []
    for name, prediction in predictions.items():
        distance = residual(actual, prediction.value)
        matched = bool(distance <= DIAGNOSIS["match_noise"] * noise
                       and distance <= DIAGNOSIS["better_than_correct"] * baseline)
        rows.append({"name": name, "description": prediction.description, "evidence": prediction.evidence,
                     "residual": distance, "matched": matched})
    rows.sort(key=lambda row: (not row["matched"], row["residual"]))
    top = rows[0] if rows else None
    if top and top["matched"]:
        summary = (f"probable cause: {top['description']} — the output matches {top['evidence']}, rel_l2 "
                   f"{top['residual']:.1e} (rounding noise {noise:.1e})")
    elif top:
        summary = (f"no known cause (closest: {top['name']}, rel_l2 {top['residual']:.1e}, "
                   f"{top['residual'] / noise:.0f}x the rounding noise {noise:.1e})")
    else:
        summary = "no known cause (no catalogued deviation applies here)"
    out = {"cause": top["name"] if top and top["matched"] else None, "summary": summary, "noise": noise,
           "correct_residual": baseline, "hypotheses": rows}
    if exact is not None:
        out["exact_residual"] = residual(actual, exact)
    return out
