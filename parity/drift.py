"""Error against position: does the implementation's error grow with position faster than the reference's own?

Per start position p the profile holds the implementation's and the reference's rel_l2 to the float64 oracle.
Their log ratio (each floored at float32's unit roundoff: at bfloat16's, as parity.metrics.noise_ratio floors,
a bfloat16 RoPE's error, 3e-3, would read as no error at all) is the
implementation's excess error in units of the reference's; a faithful implementation keeps it level, a fault that
grows with position makes it climb even while every point stays within its own bound. Two statistics:
`drift_slope`, the least-squares slope of the excess per doubling of position (log2(p + window)), and
`drift_rise`, the largest rise of the excess over its lowest value at any earlier position: a step at a band edge,
or growth confined to the far end that a slope over the whole range averages away.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from parity.check import RECORD_KEY, dtype_name, failure_message, format_value, mesh_name, passes, record_context
from parity.metrics import dtype_resolution
from parity.tolerances import bounds_for

DRIFT_METRICS = ("drift_slope", "drift_rise")


def excess(actual_errors: Sequence[float], reference_errors: Sequence[float]) -> np.ndarray:
    """ln(implementation error / reference error) per position, both floored at float32's unit roundoff."""
    floor = dtype_resolution("float32")
    a = np.maximum(np.asarray(actual_errors, np.float64), floor)
    r = np.maximum(np.asarray(reference_errors, np.float64), floor)
    return np.log(a / r)


def drift(positions: Sequence[int], actual_errors: Sequence[float], reference_errors: Sequence[float],
          window: int) -> dict[str, float]:
    """{'drift_slope', 'drift_rise'} of one profile (positions ascending, at least two); see the module docstring.
    `window`: the tokens each position's case covers, so that position 0 sits at log2(window)."""
    order = np.argsort(positions)
    x = np.log2(np.asarray(positions, np.float64)[order] + window)
    y = excess(actual_errors, reference_errors)[order]
    if len(x) < 2:
        raise ValueError(f"drift needs at least two positions, got {len(x)}")
    slope = float(np.polyfit(x, y, 1)[0])
    rise = y[1:] - np.minimum.accumulate(y)[:-1]
    return {"drift_slope": slope, "drift_rise": float(max(0.0, np.max(rise)))}


def record_drift(request: Any, *, quantity: str, positions: Sequence[int], actual_errors: Sequence[float],
                 reference_errors: Sequence[float], reference: str, dtype: str, mesh: str, window: int
                 ) -> dict[str, Any]:
    """Record the drift of one quantity's profile as a parity record of component 'position_drift' (bounds from
    the tolerance table), with the profile itself under 'profile'; AssertionError when a bound is missed."""
    __tracebackhide__ = True
    nodeid, profile_name, properties = record_context(request)
    dtype_text, mesh_text = dtype_name(dtype), mesh_name(mesh)
    name = f"{quantity} drift"
    values = drift(positions, actual_errors, reference_errors, window)
    bounds = bounds_for("position_drift", dtype_text, profile_name, reference=reference, mesh=mesh_text, name=name,
                        test=nodeid)
    failed = [m for m in DRIFT_METRICS if m in bounds and not passes(m, values[m], bounds[m])]
    record = {"test": nodeid, "component": "position_drift", "name": name, "layer": None, "reference": reference,
              "dtype": dtype_text, "mesh": mesh_text, "metrics": values,
              "bounds": {m: float(b) for m, b in bounds.items()},
              "passed": not failed, "failed_metrics": failed, "worst_index": [], "worst": None, "error": None,
              "profile": {"positions": [int(p) for p in positions],
                          "actual": [float(e) for e in actual_errors],
                          "reference": [float(e) for e in reference_errors]}}
    if failed:
        ratios = excess(actual_errors, reference_errors)
        worst = int(np.argmax(ratios))
        record["error"] = (f"the error grows with position faster than the reference's: at position "
                           f"{positions[worst]} it is {actual_errors[worst]:.3e} against the reference's "
                           f"{reference_errors[worst]:.3e} ({math.exp(ratios[worst]):.3g}x); slope "
                           f"{format_value('drift_slope', values['drift_slope'])} per doubling of position")
    properties.append((RECORD_KEY, record))
    if failed:
        raise AssertionError(failure_message(record, profile_name))
    return record
