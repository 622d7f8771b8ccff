"""The baseline gate: compare a run's parity records with a stored run, so CI fails on numerical regressions.

A case is one parity record, keyed by test, component or name, layer, reference, dtype, mesh and occurrence. A run
regresses when a case that passed fails, a metric worsens past `slack_limit`, a bound is looser than the baseline's
(so a loosened bound shows in review as a changed baseline), or a passing test fails without a case to name.
Metrics are compared only on the same numerics (CPU flags, package versions); cases in only one run are counted,
never judged (docs/report-and-gate.md, docs/internals.md#the-baseline-gate).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from parity.environment import cpu_label, json_safe
from parity.tolerances import LOWER, SLACK, UPPER, direction, slack_limit

FORMAT = "tp_llama-parity-baseline/2"  # /2: every case records its bounds; a /1 file cannot see a loosened bound
KEY_FIELDS = ("test", "name", "layer", "reference", "dtype", "mesh", "occurrence")
_BAD_TEST_OUTCOMES = ("failed", "error")
NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "llama-models", "numpy")


class BaselineError(ValueError):
    """A baseline file that is missing or malformed; the message names the file and what to do."""


@dataclass(frozen=True)
class Regression:
    """One regressed case (or test): `label` names it, `detail` says what got worse and by how much."""

    kind: str  # "failed" (passed before, fails now), "worsened" (a metric past its slack), "loosened" (a bound), "test"
    label: str
    detail: str


@dataclass
class GateResult:
    """What comparing one run with a baseline found; `regressions` empty means the gate passes."""

    path: str
    regressions: list[Regression] = field(default_factory=list)
    compared: int = 0
    new: int = 0
    missing: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.regressions


def keyed(records: Iterable[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    """Records by case key; repeats of one key within a test are told apart by their occurrence number."""
    out: dict[tuple, Mapping[str, Any]] = {}
    counts: dict[tuple, int] = {}
    for record in records:
        base = (record["test"], record.get("name") or record["component"], record.get("layer"),
                record.get("reference"), record.get("dtype"), record.get("mesh"))
        counts[base] = counts.get(base, 0) + 1
        out[(*base, counts[base])] = record
    return out


def case_label(key: tuple) -> str:
    """'node id [name] layer=1 reference=meta dtype=float32 mesh=1x4' for one case key."""
    test, name, layer, reference, dtype, mesh, occurrence = key
    parts = [f"{test} [{name}]"]
    if layer is not None:
        parts.append(f"layer={layer}")
    parts += [f"reference={reference}", f"dtype={dtype}", f"mesh={mesh}"]
    if occurrence > 1:
        parts.append(f"occurrence={occurrence}")
    return " ".join(parts)


def _number(value: Any) -> float:
    """A metric as a float; the JSON strings 'NaN' / 'Infinity' / '-Infinity' included."""
    return float(value)


def make_baseline(document: Mapping[str, Any]) -> dict[str, Any]:
    """The baseline file's content for one run's --parity-json document: every case's verdict, gated metrics and
    bounds, and the tests that passed (only a passing test can regress by failing)."""
    cases = []
    # sorted by key, not run order (which workers and --dist change): a retaken baseline diffs by what changed
    for key, record in sorted(keyed(document["records"]).items(), key=lambda item: repr(item[0])):
        case = dict(zip(KEY_FIELDS, key))
        case["component"] = record["component"]
        case["passed"] = bool(record["passed"])
        case["metrics"] = {m: v for m, v in record["metrics"].items() if m in SLACK}
        case["bounds"] = _directed(table_bounds(record))
        if "reference_noise" in record:  # the calibration's view of which bounds judged the case
            case["reference_noise"], case["bias_spread"] = record["reference_noise"], record["bias_spread"]
        cases.append(case)
    environment = document.get("environment", {})
    return {
        "format": FORMAT,
        "tolerance_profile": environment.get("tolerance_profile"),
        "versions": environment.get("versions", {}),
        "cpu": environment.get("cpu"),
        "passed_tests": sorted(t["nodeid"] for t in document.get("tests", []) if t["outcome"] == "passed"),
        "cases": cases,
    }


def write_baseline(path: str | Path, document: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite the baseline at `path` from this run (one case per line pair, so diffs stay reviewable)."""
    content = json_safe(make_baseline(document))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(content, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return content


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and check a baseline file; BaselineError says which file is wrong and how to make a good one."""
    fix = f"write one with: pytest --parity-baseline {path} --parity-update-baseline"
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"--parity-baseline {path}: no such file; {fix}") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"--parity-baseline {path}: not JSON ({exc}); {fix}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise BaselineError(f"--parity-baseline {path}: format {found!r}, expected {FORMAT!r}; {fix}")
    missing = [k for k in ("cases", "passed_tests") if not isinstance(content.get(k), list)]
    if missing:
        raise BaselineError(f"--parity-baseline {path}: no list {' or '.join(map(repr, missing))}; {fix}")
    for number, case in enumerate(content["cases"]):
        missing = [k for k in (*KEY_FIELDS, "passed", "metrics", "bounds") if k not in case]
        if missing:
            raise BaselineError(f"--parity-baseline {path}: case {number} lacks {', '.join(missing)}; {fix}")
    return content


def _case_key(case: Mapping[str, Any]) -> tuple:
    return tuple(case[k] for k in KEY_FIELDS)


def _worsened(metric: str, old: float, new: float) -> str | None:
    """Why `new` is a regression from `old` for one metric, or None when it is within the table's slack."""
    if not math.isfinite(old):
        return None  # the baseline already failed here; the verdict check covers it
    limit = slack_limit(metric, old)
    upper = direction(metric) == UPPER
    if math.isfinite(new) and (new <= limit if upper else new >= limit):
        return None
    slack = SLACK[metric]
    allowed = (f"x{slack['factor']:g} + {slack['absolute']:g}" if upper else f"- {slack['absolute']:g}")
    sign = ">" if upper else "<"
    return f"{metric} = {new:.4g} {sign} limit {limit:.4g} (baseline {old:.4g}, slack {allowed})"


def _directed(bounds: Mapping[str, Any]) -> dict[str, Any]:
    """The bounds that bound something (not params such as topk)."""
    return {m: b for m, b in bounds.items() if direction(m) in (UPPER, LOWER)}


def table_bounds(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tolerance table's bounds of a record, before any were widened by the reference's own noise
    (parity.tolerances.noise_scaled): a loosened bound is a change of the table, not of the data."""
    return record.get("table_bounds") or record.get("bounds", {})


def _loosened(old: Mapping[str, Any], record: Mapping[str, Any]) -> list[tuple[str, float, float | None]]:
    """(metric, baseline bound, bound now; None when removed) for every bound looser now than in the baseline.

    A removed bound counts when the case still computes the metric: nothing judges it any more."""
    found = []
    new_bounds = _directed(table_bounds(record))
    for metric, was in _directed(old.get("bounds", {})).items():
        was = _number(was)
        if metric not in new_bounds:
            if metric in record["metrics"]:
                found.append((metric, was, None))
            continue
        now = _number(new_bounds[metric])
        if (now > was) if direction(metric) == UPPER else (now < was):
            found.append((metric, was, now))
    return found


def _loosened_regressions(groups: Mapping[tuple, list[str]]) -> list[Regression]:
    out = []
    for (component, dtype, metric, was, now), labels in groups.items():
        change = f"removed (was {was:.4g})" if now is None else f"loosened from {was:.4g} to {now:.4g}"
        more = f"; {len(labels)} cases, the first named" if len(labels) > 1 else ""
        out.append(Regression("loosened", labels[0],
                              f"bound {metric} {change} (component {component}, dtype {dtype}{more}); if intended, "
                              f"rewrite the baseline in the same change (--parity-update-baseline)"))
    return out


def numerics_differences(baseline: Mapping[str, Any], environment: Mapping[str, Any]) -> list[str]:
    """What differs between the baseline's numerics and this run's (CPU, NUMERIC_PACKAGES); empty when the same.

    A CPU whose flags could not be read matches nothing, so an unknown machine never has its values judged."""
    found = []
    old_cpu, new_cpu = baseline.get("cpu"), environment.get("cpu")
    recorded = old_cpu is not None or new_cpu is not None  # neither: a document without an environment
    if recorded and (old_cpu != new_cpu or (old_cpu or {}).get("flags") is None):
        found.append(f"CPU: baseline {cpu_label(old_cpu)}, this run {cpu_label(new_cpu)}")
    old_versions, new_versions = baseline.get("versions") or {}, environment.get("versions") or {}
    for name in NUMERIC_PACKAGES:
        if name in old_versions and name in new_versions and old_versions[name] != new_versions[name]:
            found.append(f"{name}: baseline {old_versions[name]}, this run {new_versions[name]}")
    return found


def compare(baseline: Mapping[str, Any], document: Mapping[str, Any], path: str = "baseline") -> GateResult:
    """Judge one run (a --parity-json document) against a loaded baseline."""
    result = GateResult(path=str(path))
    old_cases = {_case_key(c): c for c in baseline["cases"]}
    new_cases = keyed(document["records"])
    result.new = len(new_cases.keys() - old_cases.keys())
    result.missing = len(old_cases.keys() - new_cases.keys())
    run_profile = document.get("environment", {}).get("tolerance_profile")
    same_profile = baseline.get("tolerance_profile") in (None, run_profile)
    differences = numerics_differences(baseline, document.get("environment", {}))
    named_tests = set()
    loosened: dict[tuple, list[str]] = {}
    for key in sorted(new_cases.keys() & old_cases.keys(), key=repr):
        old, record = old_cases[key], new_cases[key]
        result.compared += 1
        found = _case_regressions(key, old, record, values=not differences)
        result.regressions += found
        if found:
            named_tests.add(key[0])
        for metric, was, now in (_loosened(old, record) if same_profile else []):
            loosened.setdefault((record["component"], record["dtype"], metric, was, now), []).append(case_label(key))
    result.regressions += _loosened_regressions(loosened)
    passed_before = set(baseline["passed_tests"])
    for test in document.get("tests", []):
        nodeid = test["nodeid"]
        if nodeid in passed_before and test["outcome"] in _BAD_TEST_OUTCOMES and nodeid not in named_tests:
            first_line = (test.get("message") or "no message").splitlines()[0]
            result.regressions.append(Regression("test", nodeid, f"passed in the baseline, {test['outcome']} now: "
                                                                  f"{first_line}"))
    if not same_profile:
        result.notes.append(f"baseline was taken under tolerance profile {baseline['tolerance_profile']!r}, "
                            f"this run uses {run_profile!r}; bounds not compared")
    if differences:
        result.notes.append("metric values not compared (another numerics platform; verdicts and bounds are): "
                            + "; ".join(differences) + "; to gate values on this platform, retake the baseline "
                            "here (--parity-update-baseline)")
    return result


def _case_regressions(key: tuple, old: Mapping[str, Any], record: Mapping[str, Any], *,
                      values: bool = True) -> list[Regression]:
    """A verdict flipped to failing, or (when `values`) each gated metric worsened past its slack."""
    label = case_label(key)
    if old["passed"] and not record["passed"]:
        why = record.get("error") or ", ".join(record.get("failed_metrics") or []) or "failed"
        return [Regression("failed", label, f"passed in the baseline, fails now: {why}")]
    if not values:
        return []
    found = []
    for metric, old_value in old["metrics"].items():
        if metric not in record["metrics"] or metric not in SLACK:
            continue
        why = _worsened(metric, _number(old_value), _number(record["metrics"][metric]))
        if why:
            found.append(Regression("worsened", label, why))
    return found


def summary_lines(result: GateResult) -> list[str]:
    """The terminal lines of the gate: the outcome, then each regressed case by name."""
    counts = f"{result.compared} cases compared, {result.new} new, {result.missing} in the baseline not run"
    lines = [f"baseline {result.path}: {'PASS' if result.passed else 'FAIL'} "
             f"({len(result.regressions)} regressions; {counts})"]
    lines += [f"  note: {note}" for note in result.notes]
    lines += [f"  REGRESSED {r.label}: {r.detail}" for r in result.regressions]
    return lines
