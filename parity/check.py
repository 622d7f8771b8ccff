"""The assertion helpers every conformance test calls: compute metrics, look bounds up, record, judge.

Tests never compute metrics or hold tolerances themselves (docs/architecture.md#layering): they name a component and
`parity.tolerances` decides. Every call leaves a record in the test's user_properties as
("parity_record", record), which pytest-xdist carries to the controller with the test report.
"""
from __future__ import annotations

import math
import re
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from parity import diagnosis
from parity import metrics as pm
from parity.tolerances import LOWER, NOISE_SCALED, NOISE_SCALED_COMPONENTS, UPPER, bounds_for, direction, noise_scaled

RECORD_KEY = "parity_record"
NOT_CHECKED_KEY = "parity_not_checked"  # kept apart from records: neither passed nor failed
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?=\.|$)")


def layer_of(name: str | None) -> int | None:
    """The layer number in a name like 'layers.3.attention_out', None when it names no layer."""
    match = _LAYER.search(name or "")
    return int(match.group(1)) if match else None


def mesh_name(mesh: Any) -> str | None:
    """'DxM' for a mesh given as a string, a (D, M) tuple or a jax.sharding.Mesh."""
    if mesh is None or isinstance(mesh, str):
        return mesh
    shape = getattr(mesh, "shape", mesh)
    sizes = shape.values() if isinstance(shape, Mapping) else shape
    return "x".join(str(int(s)) for s in sizes)


def dtype_name(dtype: Any) -> str:
    """'float32' / 'bfloat16' for a dtype given by name, numpy dtype or scalar type (jnp.bfloat16)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def passes(metric: str, value: float, bound: float) -> bool:
    """Whether one value meets its bound in the metric's direction; NaN never passes."""
    if direction(metric) == UPPER:
        return value <= bound
    if direction(metric) == LOWER:
        return value >= bound
    return True


def budget_used(metric: str, value: float, bound: float) -> float:
    """Share of the allowed error a value uses: 1.0 sits at the bound, above 1.0 fails.

    Upper bounds: value / bound. Lower bounds (all of them similarities <= 1): (1 - value) / (1 - bound),
    i.e. the distance from perfect agreement over the allowed distance. A zero allowance gives 0 or inf.
    """
    if math.isnan(value):
        return math.inf
    used, allowed = (value, bound) if direction(metric) == UPPER else (1.0 - value, 1.0 - bound)
    if allowed <= 0.0:
        return 0.0 if used <= 0.0 else math.inf
    return max(used, 0.0) / allowed


def format_value(metric: str, value: float) -> str:
    """Errors in scientific notation; similarities with enough digits to see how far from 1 they are; whole
    values of metrics the table does not bound (counts: token ids, config fields, NaN/Inf) as integers."""
    if direction(metric) is None and float(value).is_integer():
        return str(int(value))
    return f"{value:.3e}" if direction(metric) != LOWER else f"{value:.7g}"


def _failing(values: Mapping[str, float], bounds: Mapping[str, float]) -> list[str]:
    """Metrics that have both a value and a bound and miss it, in the bounds' order."""
    return [m for m, b in bounds.items()
            if m in values and direction(m) in (UPPER, LOWER) and not passes(m, values[m], b)]


def _failure_lines(record: Mapping[str, Any]) -> list[str]:
    """The error if any (NaN/Inf, shapes), then one line per failing metric ('rel_l2 = 3.200e-03 > 1.000e-05')."""
    lines = [record["error"]] if record.get("error") else []
    for m in record["failed_metrics"]:
        value, bound = record["metrics"][m], record["bounds"][m]
        sign, kind = (">", "upper") if direction(m) == UPPER else ("<", "lower")
        table = record.get("table_bounds", {}).get(m, bound)
        scaled = f", widened from {format_value(m, table)} by the reference's own noise" if table != bound else ""
        lines.append(f"{m} = {format_value(m, value)} {sign} {format_value(m, bound)} ({kind} bound{scaled})")
    return lines


def _worst_line(record: Mapping[str, Any]) -> str | None:
    """Where |actual - expected| is largest, with both values there."""
    worst = record.get("worst")
    if not worst:
        return None
    return (f"worst |actual - expected| = {worst['abs_diff']:.3e} at index {tuple(record['worst_index'])}: "
            f"actual = {worst['actual']:.6g}, expected = {worst['expected']:.6g}")


def _scope_text(record: Mapping[str, Any], profile: str) -> str:
    return (f"reference={record['reference']} dtype={record['dtype']} mesh={record['mesh']} "
            f"profile={profile}")


def _worst(a: np.ndarray, b: np.ndarray) -> tuple[list[int], dict[str, float] | None]:
    """Worst index and the values of both sides there (None for empty arrays)."""
    index = pm.worst_index(a, b)
    if a.size == 0:
        return list(index), None
    va, vb = float(a[index]), float(b[index])
    return list(index), {"actual": va, "expected": vb, "abs_diff": abs(va - vb) if va == va and vb == vb
                         else math.nan}


def _evaluate(nodeid: str, profile: str, *, component: str, actual: Any, expected: Any, reference: str | None,
              dtype: Any, mesh: Any, layer: int | None, oracle: Any, logits: bool, name: str | None,
              extra_metrics: Mapping[str, float] | None, peers: Any = ()) -> dict[str, Any]:
    """Build one record (metrics, bounds, verdict); never raises on a numerical failure."""
    dtype, mesh = dtype_name(dtype), mesh_name(mesh)
    bounds = bounds_for(component, dtype, profile, reference=reference, mesh=mesh, name=name, test=nodeid)
    record: dict[str, Any] = {
        "test": nodeid, "component": component, "name": name,
        "layer": layer if layer is not None else layer_of(name),
        "reference": reference, "dtype": dtype, "mesh": mesh,
        "metrics": {}, "bounds": {m: float(b) for m, b in bounds.items()},
        "passed": False, "failed_metrics": [], "worst_index": [], "worst": None, "error": None,
    }
    a, b = pm.as_float64(actual), pm.as_float64(expected)
    if a.shape != b.shape:
        record["error"] = f"shape mismatch: actual {a.shape} vs expected {b.shape}"
        return record
    try:
        values = pm.compute_metrics(a, b, oracle=oracle, logits=logits, dtype=dtype,
                                    k=int(bounds.get("topk", pm.DEFAULT_TOPK)))
    except ValueError as exc:  # e.g. an oracle of another shape
        record["error"] = str(exc)
        return record
    values.update({m: float(v) for m, v in (extra_metrics or {}).items()})
    record["metrics"] = values
    if oracle is not None and component in NOISE_SCALED_COMPONENTS:
        # the reference's own distance from exact math sets the bounds that transfer (parity.tolerances)
        own = _own_noise([expected, *peers], oracle, logits, dtype, int(bounds.get("topk", pm.DEFAULT_TOPK)))
        spread = pm.bias_spread(b)
        judged = noise_scaled(bounds, own, spread)
        # what widened them, so the calibration can tell the records the table's bounds judged (parity.calibrate)
        record["reference_noise"] = {m: float(own[m]) for m in NOISE_SCALED if m in own}
        record["bias_spread"] = float(spread)
        if judged != bounds:
            record["table_bounds"], record["bounds"] = record["bounds"], {m: float(v) for m, v in judged.items()}
            bounds = judged
    record["worst_index"], record["worst"] = _worst(a, b)
    record["error"] = pm.check_finite(a, b)
    record["failed_metrics"] = _failing(values, bounds)
    record["passed"] = not record["failed_metrics"] and record["error"] is None
    return record


_OWN_METRICS: dict[tuple, tuple[Any, Any, dict[str, float]]] = {}


def _reference_metrics(reference: Any, oracle: Any, logits: bool, dtype: str, k: int) -> dict[str, float]:
    """compute_metrics(reference, oracle), kept while both objects live: the same cached reference and oracle
    arrays are judged against every mesh and every implementation, and for logits this is the costly part."""
    key = (id(reference), id(oracle), logits, dtype, k)
    kept = _OWN_METRICS.get(key)
    try:
        if kept is not None and kept[0]() is reference and kept[1]() is oracle:
            return kept[2]
        refs = (weakref.ref(reference), weakref.ref(oracle))
    except TypeError:  # not weak-referenceable (a list, a scalar): compute every time
        return pm.compute_metrics(reference, oracle, logits=logits, dtype=dtype, k=k)
    values = pm.compute_metrics(reference, oracle, logits=logits, dtype=dtype, k=k)
    _OWN_METRICS[key] = (*refs, values)
    return values


def _own_noise(references: list, oracle: Any, logits: bool, dtype: str, k: int) -> dict[str, float]:
    """The references' own metrics against the oracle, the farthest of them per metric: an implementation may be
    as far from exact math as any official reference is (`peers`: the other references' outputs)."""
    own: dict[str, float] = {}
    for reference in references:
        for metric, value in _reference_metrics(reference, oracle, logits, dtype, k).items():
            worse = max if direction(metric) == UPPER else min
            own[metric] = worse(own[metric], value) if metric in own else value
    return own


def record_context(request: Any) -> tuple[str, str, list]:
    """Node id, tolerance profile and the user_properties list of the running test."""
    profile = request.config.getoption("tolerance_profile", default=None) or "default"
    return request.node.nodeid, profile, request.node.user_properties


def assert_parity(request: Any, *, component: str, actual: Any, expected: Any, reference: str | None,
                  dtype: Any, mesh: Any, layer: int | None = None, oracle: Any = None, logits: bool = False,
                  name: str | None = None, extra_metrics: Mapping[str, float] | None = None,
                  extra: Mapping[str, Any] | None = None, diagnose: Any = None, peers: Any = ()) -> dict[str, Any]:
    """Compare `actual` (implementation) with `expected` (reference) under the table's bounds, record, judge.

    noise_ratio is computed only with an `oracle` (float64 result of exact math), kl/top1/topk_overlap only
    for `logits`; `extra_metrics` adds values computed elsewhere in parity.metrics (e.g. logprob_gap).
    `extra` adds JSON-serialisable fields to the record under keys the schema declares (e.g. 'generation':
    the two token streams); it may not replace a standard field.
    Only metrics that have both a value and a bound are judged; NaN/Inf on either side always fails.
    `diagnose`: a callable giving {deviation name: parity.diagnosis.Prediction} for these inputs, called only
    when the record fails; the ranked result goes to record["diagnosis"] and its summary to the message.
    `peers`: the other references' outputs of the same tensor; with an oracle, bounds widen to the farthest
    reference's own distance from exact math (parity.tolerances.noise_scaled), not only `expected`'s.
    Returns the record; raises AssertionError listing every failing metric and the worst index.
    """
    __tracebackhide__ = True
    nodeid, profile, properties = record_context(request)
    record = _evaluate(nodeid, profile, component=component, actual=actual, expected=expected,
                       reference=reference, dtype=dtype, mesh=mesh, layer=layer, oracle=oracle, logits=logits,
                       name=name, extra_metrics=extra_metrics, peers=peers)
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ValueError(f"assert_parity(extra=...): {clash} would replace standard record fields; rename them")
    record.update(extra or {})
    if diagnose is not None and not record["passed"]:
        record["diagnosis"] = _diagnosis(actual, expected, oracle, diagnose)
    properties.append((RECORD_KEY, record))
    if not record["passed"]:
        raise AssertionError(failure_message(record, profile))
    return record


def _diagnosis(actual: Any, expected: Any, oracle: Any, predict: Any) -> dict[str, Any]:
    """parity.diagnosis on a failing record; the rounding noise is the reference's own error against the oracle."""
    a, b = pm.as_float64(actual), pm.as_float64(expected)
    noise = diagnosis.residual(b, pm.as_float64(oracle)) if oracle is not None else 0.0
    return diagnosis.diagnose(a, b, predict(), noise, pm.as_float64(oracle) if oracle is not None else None)


def failure_message(record: Mapping[str, Any], profile: str) -> str:
    """The multi-line explanation of one failed record: what was compared, where, which bounds it missed."""
    what = f"component '{record['component']}'"
    if record.get("name"):
        what += f", name '{record['name']}'"
    if record.get("layer") is not None:
        what += f", layer {record['layer']}"
    lines = [f"parity failed for {what}", _scope_text(record, profile), *_failure_lines(record)]
    worst = _worst_line(record)
    if worst:
        lines.append(worst)
    if record.get("diagnosis"):
        lines.append(record["diagnosis"]["summary"])
    return "\n  ".join(lines)


def assert_parity_many(request: Any, *, component: str, actual: Mapping[str, Any], expected: Mapping[str, Any],
                       reference: str | None, dtype: Any, mesh: Any, oracle: Mapping[str, Any] | None = None,
                       logits: bool = False, diagnose: Any = None, peers: Any = ()) -> list[dict[str, Any]]:
    """Check many named tensors (e.g. per-layer intermediates) at once, recording every one.

    The reference's names set the order; a name missing on either side fails. The layer of each record is
    parsed from its name ('layers.3.attention_out' -> 3). Fails once, listing every failing name, the first
    failing one (in the reference's order, usually where a bug enters) named first.
    `diagnose`: name -> the `diagnose` callable of assert_parity for that tensor; only the first failing record
    is diagnosed (where a bug enters, before later tensors mix its effect with others), and its summary ends the
    message. `peers`: a list of name -> tensor mappings, the other references' (see assert_parity).
    """
    __tracebackhide__ = True
    nodeid, profile, properties = record_context(request)
    records, problems = [], []
    for name in expected:
        if name not in actual:
            continue
        record = _evaluate(nodeid, profile, component=component, actual=actual[name], expected=expected[name],
                           reference=reference, dtype=dtype, mesh=mesh, layer=None,
                           oracle=(oracle or {}).get(name), logits=logits, name=name, extra_metrics=None,
                           peers=[p[name] for p in peers if name in p])
        if diagnose is not None and not record["passed"] and all(r["passed"] for r in records):
            record["diagnosis"] = _diagnosis(actual[name], expected[name], (oracle or {}).get(name), diagnose(name))
        properties.append((RECORD_KEY, record))
        records.append(record)
        if not record["passed"]:
            problems.append(_summary_line(record))
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing:
        problems.append(f"missing in actual: {', '.join(missing)}")
    if extra:
        problems.append(f"missing in expected: {', '.join(extra)}")
    if problems:
        failed = [r["name"] for r in records if not r["passed"]]
        head = (f"parity failed for component '{component}': {len(failed)} of {len(records)} named tensors"
                + (f", first failing '{failed[0]}'" if failed else ""))
        scope = _scope_text({"reference": reference, "dtype": dtype_name(dtype), "mesh": mesh_name(mesh)}, profile)
        causes = [r["diagnosis"]["summary"] for r in records if r.get("diagnosis")]
        raise AssertionError("\n  ".join([head, scope, *problems, *causes]))
    return records


def record_not_checked(request: Any, *, component: str, names: list[str], reason: str, reference: str | None,
                       dtype: Any, mesh: Any) -> list[dict[str, Any]]:
    """Note named tensors that were not compared (e.g. intermediates an --impl adapter does not provide).

    Each goes to user_properties as (NOT_CHECKED_KEY, entry), never as a parity record, so it counts neither as
    passed nor as failed; the calling test should end skipped with `reason`, not passed.
    """
    nodeid, _, properties = record_context(request)
    entries = [{"test": nodeid, "component": component, "name": name, "layer": layer_of(name),
                "reference": reference, "dtype": dtype_name(dtype), "mesh": mesh_name(mesh), "reason": reason}
               for name in names]
    properties.extend((NOT_CHECKED_KEY, entry) for entry in entries)
    return entries


def record_failure(request: Any, *, component: str, error: str, reference: str | None, dtype: Any, mesh: Any,
                   layer: int | None = None, name: str | None = None) -> dict[str, Any]:
    """A failed record for a comparison that never happened because the implementation raised: it counts in the
    summary, the JSON and the report like any failure, with the error text where the metrics would be."""
    nodeid, profile, properties = record_context(request)
    dtype, mesh = dtype_name(dtype), mesh_name(mesh)
    record = {"test": nodeid, "component": component, "name": name,
              "layer": layer if layer is not None else layer_of(name), "reference": reference, "dtype": dtype,
              "mesh": mesh, "metrics": {}, "bounds": {m: float(b) for m, b in
                                                      bounds_for(component, dtype, profile, reference=reference,
                                                                 mesh=mesh, name=name,
                                                                 test=nodeid).items()},
              "passed": False, "failed_metrics": [], "worst_index": [], "worst": None, "error": error}
    properties.append((RECORD_KEY, record))
    return record


def assert_config_agrees(request: Any, check: Any) -> dict[str, Any]:
    """Record one config cross-check (reference.config_check.CrossCheck: the suite's config against what one
    reference library read from a checkpoint's file) as a parity record of component 'config', so the JSON and
    the report show it beside the numerical ones; fail naming every disagreeing field.

    The record's name is the file, its reference the library's reference; metrics count the fields compared and
    those that disagree; the disagreements (field, both values, who read which) are its error, so a disagreement
    fails in the report as in the test. No bound: any disagreement fails."""
    __tracebackhide__ = True
    nodeid, _, properties = record_context(request)
    read = check.read
    message = check.message()
    record = {"test": nodeid, "component": "config", "name": f"{read.file.parent.name}/{read.file.name}",
              "layer": None, "reference": read.reference, "dtype": "config", "mesh": None,
              "metrics": {"config_fields": float(len(check.compared)),
                          "config_disagreements": float(len(check.disagreements))},
              "bounds": {}, "passed": not check.disagreements, "failed_metrics": [], "worst_index": [], "worst": None,
              "error": None if not check.disagreements else message}
    properties.append((RECORD_KEY, record))
    if check.disagreements:
        raise AssertionError(message)
    return record


def id_differences(actual: Sequence[int], expected: Sequence[int]) -> tuple[int, int, int]:
    """(positions compared, positions differing, first differing position or -1) of two id sequences; every
    position past the shorter one's end differs."""
    shorter, longer = sorted((len(actual), len(expected)))
    differing = [i for i in range(shorter) if actual[i] != expected[i]] + list(range(shorter, longer))
    return longer, len(differing), differing[0] if differing else -1


def record_token_ids(request: Any, *, name: str, actual: Sequence[Sequence[int]],
                     expected: Sequence[Sequence[int]], reference: str) -> dict[str, Any]:
    """Record one tokenizer check (one id list per input text: `actual` from the tokenizer under test, `expected`
    from `reference`'s) as a parity record of component 'tokenizer', so the JSON and the report show it beside
    the numerical ones.

    Metrics: token_ids (positions compared over every input), differing_ids, first_difference (its position in
    the first input that differs, -1 for none); that input and both sides' ids there are the error. No bound: any
    differing id fails. Returns the record; the caller fails the test, with what the ids decode to."""
    if len(actual) != len(expected):
        raise ValueError(f"record_token_ids: {len(actual)} actual id lists for {len(expected)} expected; give one "
                         f"per input on both sides")
    nodeid, _, properties = record_context(request)
    compared = differing = 0
    first, error = -1, None
    for index, (a, b) in enumerate(zip(actual, expected)):
        count, wrong, at = id_differences(a, b)
        compared, differing = compared + count, differing + wrong
        if at >= 0 and error is None:
            window = slice(max(0, at - 3), at + 4)
            first, error = at, (f"input {index} of {len(expected)} differs from position {at} (lengths {len(a)} "
                                f"and {len(b)}); around it actual {list(a[window])}, expected {list(b[window])}")
    record = {"test": nodeid, "component": "tokenizer", "name": name, "layer": None, "reference": reference,
              "dtype": "tokenizer", "mesh": None,
              "metrics": {"token_ids": float(compared), "differing_ids": float(differing),
                          "first_difference": float(first)},
              "bounds": {}, "passed": error is None, "failed_metrics": [], "worst_index": [], "worst": None,
              "error": error and f"{differing} of {compared} ids differ; {error}"}
    properties.append((RECORD_KEY, record))
    return record


def _summary_line(record: Mapping[str, Any]) -> str:
    """One line per failing name for assert_parity_many."""
    where = f" (layer {record['layer']})" if record.get("layer") is not None else ""
    parts = _failure_lines(record)
    worst = _worst_line(record)
    return f"{record['name']}{where}: " + "; ".join(parts + ([worst] if worst else []))
