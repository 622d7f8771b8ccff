"""The HTML parity report: one self-contained file (inline CSS, JS and SVG, no network) from the same document as
--parity-json and the gate's result, so what a person reads and what CI parses cannot disagree.

`render_runs` merges several hosts' runs of one implementation, or puts implementations side by side (told apart
by `environment.implementation`). Meshes a test drew for itself fold into one "drawn" column per dtype. The record
fields it reads and the page's sections: docs/report-and-gate.md.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from parity.areas import AREAS, area_detail, scope, scorecard
from parity.check import budget_used, format_value
from parity.environment import cpu_label
from parity.pooled import pooled_diagnosis
from parity.position_chart import position_chart, position_series, position_table
from parity.tolerances import COMPONENTS, LOWER, UPPER, direction

TEMPLATES = Path(__file__).with_name("templates")
DEPTH_METRICS = ("rel_l2", "noise_ratio")
BAD_TEST_OUTCOMES = ("failed", "error")
OUTCOME_ORDER = ("passed", "failed", "error", "xpassed", "xfailed", "skipped")
NONE_TEXT = "none"  # how a null reference / mesh / layer shows and filters
DRAWN = "drawn"  # the matrix column of meshes that only tests drawing their own mesh used
NO_KNOWN_CAUSE = "no known cause"  # a diagnosis that matched no hypothesis
NOT_DIAGNOSED = "not diagnosed"  # a failing record without a diagnosis
_DTYPE_ORDER = ("float32", "bfloat16")
STEPS_BEFORE, STEPS_AFTER = 4, 8  # the window of a generation stream shown around its first divergence
RECORD_FIELDS = ("test", "component", "dtype", "passed", "metrics", "bounds")  # what the page cannot do without


# ---- numbers ---------------------------------------------------------------------------------------------

def as_float(value: Any) -> float:
    """Metric values as floats; --parity-json writes non-finite ones as 'NaN' / 'Infinity' strings."""
    return float(value)


def margin_text(used: float) -> str:
    """Share of a bound used, as people read it: '0.16×', '3.2×', '∞' (NaN, Inf or an error)."""
    return "∞" if math.isinf(used) else f"{used:.2g}×"


def record_margin(record: Mapping[str, Any]) -> tuple[float, str | None]:
    """The worst (value / bound) over the bounded metrics of one record and which metric it is.

    An error (NaN/Inf, shape mismatch) is infinitely bad; a record with no bounded metric uses 0 of nothing.
    """
    if record.get("error"):
        return math.inf, "error"
    worst, which = 0.0, None
    for metric, bound in record.get("bounds", {}).items():
        if metric not in record.get("metrics", {}) or direction(metric) not in (UPPER, LOWER):
            continue
        used = budget_used(metric, as_float(record["metrics"][metric]), as_float(bound))
        if which is None or used > worst:
            worst, which = used, metric
    return worst, which


def record_outcome(record: Mapping[str, Any], test_outcome: str | None) -> str:
    """'pass', 'fail', or 'expected fail': a failing record inside a test that passed or xfailed, such as a
    planted bug the test expects to be caught, is not a failure of the run."""
    if record["passed"]:
        return "pass"
    return "expected fail" if test_outcome in ("passed", "xfailed") else "fail"


def _outcome_of(record: Mapping[str, Any], outcomes: Mapping[str, str] | None = None) -> str:
    """A record's outcome: annotated once per run (see `_annotate`), or looked up by its test id."""
    if "_outcome" in record:
        return record["_outcome"]
    return record_outcome(record, (outcomes or {}).get(record["test"]))


def scope_text(value: Any) -> str:
    """A scope field for display and filtering; None becomes 'none'."""
    return NONE_TEXT if value is None else str(value)


# ---- ordering --------------------------------------------------------------------------------------------

def _component_order(name: str) -> tuple:
    return (COMPONENTS.index(name), "") if name in COMPONENTS else (len(COMPONENTS), name)


def _dtype_order(name: str) -> tuple:
    return (_DTYPE_ORDER.index(name), "") if name in _DTYPE_ORDER else (len(_DTYPE_ORDER), name)


def _mesh_order(name: str) -> tuple:
    """'1x1' < '1x2' < '1x4' < '2x4' < '1x8' (by device count, then data size); then 'none', then 'drawn'."""
    try:
        data, model = (int(p) for p in name.split("x"))
    except ValueError:
        return (math.inf, name == DRAWN, name)
    return (data * model, data, name)


# ---- implementations and runs ------------------------------------------------------------------------------

class ReportError(ValueError):
    """A saved parity JSON that cannot be read; the message is one line naming the file and the problem."""


def implementation_of(environment: Mapping[str, Any]) -> dict[str, str | None]:
    """The implementation under test from an environment: `implementation` = {factory, package, version}, or
    the older `impl` string (the factory). A string `implementation` is the Python implementation (CPython)."""
    given = environment.get("implementation")
    if isinstance(given, Mapping):
        return {"factory": given.get("factory"), "package": given.get("package"), "version": given.get("version")}
    return {"factory": environment.get("impl"), "package": None, "version": None}


def package_text(impl: Mapping[str, Any]) -> str | None:
    """'keras-hub 0.21.1', 'version 1.2' or 'my-pkg'; None when there is nothing to add to the factory: a version
    that is not recorded is not shown, nor a package that is only the factory's own top-level module."""
    package, version = impl.get("package"), impl.get("version")
    if version:
        return f"{package} {version}" if package else f"version {version}"
    own_module = (impl.get("factory") or "").partition(":")[0].split(".")[0]
    return package if package and package != own_module else None


def implementation_label(impl: Mapping[str, Any]) -> str:
    """'module:ATTR (package 1.2)', or the factory alone (package_text); no factory at all says that."""
    factory = impl.get("factory") or "implementation not recorded"
    package = package_text(impl)
    return f"{factory} ({package})" if package else factory


def _short_label(impl: Mapping[str, Any]) -> str:
    """A column-group header: 'keras-hub 0.21.1', or the factory's attribute name."""
    if impl.get("package"):
        return " ".join(str(p) for p in (impl["package"], impl.get("version")) if p)
    factory = impl.get("factory") or "unknown"
    name = factory.rsplit(":", 1)[-1]
    return f"{name} {impl['version']}" if impl.get("version") else name


def python_text(environment: Mapping[str, Any]) -> str:
    """'CPython 3.11.7': the Python implementation is `python_implementation`, or a string `implementation`."""
    flavour = environment.get("python_implementation")
    if flavour is None and isinstance(environment.get("implementation"), str):
        flavour = environment["implementation"]
    return f"{flavour or ''} {environment.get('python', '')}".strip()


def document_problem(document: Any) -> str | None:
    """Why a JSON value is not a --parity-json document the report can read, or None."""
    if not isinstance(document, dict):
        return f"the top level is a JSON {type(document).__name__}, not an object"
    if not isinstance(document.get("environment", {}), dict):
        return "'environment' is not an object"
    for key in ("records", "tests"):
        if not isinstance(document.get(key), list):
            return f"no '{key}' list"
    for i, record in enumerate(document["records"]):
        if not isinstance(record, dict):
            return f"records[{i}] is not an object"
        missing = [field for field in RECORD_FIELDS if field not in record]
        if missing:
            return f"records[{i}] has no '{missing[0]}'"
    for i, test in enumerate(document["tests"]):
        if not isinstance(test, dict) or "nodeid" not in test or "outcome" not in test:
            return f"tests[{i}] has no 'nodeid' and 'outcome'"
    not_checked = document.get("not_checked", [])
    if not isinstance(not_checked, list) or not all(isinstance(e, dict) and "test" in e for e in not_checked):
        return "'not_checked' is not a list of entries with a 'test'"
    return None


def load_document(path: str | Path) -> dict[str, Any]:
    """Read one saved --parity-json file; every problem is a ReportError of one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a --parity-json file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file (not UTF-8), not a --parity-json file") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    problem = document_problem(document)
    if problem:
        raise ReportError(f"{path}: not a --parity-json document: {problem}")
    return document


def _runs(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    runs = []
    for label, document in sources:
        environment = document.get("environment") or {}
        impl = implementation_of(environment)
        runs.append({"label": label, "environment": environment, "implementation": impl,
                     "key": (impl["factory"], impl["package"], impl["version"]),
                     "exitstatus": document.get("exitstatus"), "tests": document.get("tests", []),
                     "records": document.get("records", []), "not_checked": document.get("not_checked") or []})
    return runs


def _implementations(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per distinct implementation, in the order of first appearance; runs of one merge."""
    found: dict[tuple, dict[str, Any]] = {}
    for index, run in enumerate(runs):
        entry = found.setdefault(run["key"], {"impl": run["implementation"], "runs": []})
        entry["runs"].append(index)
        run["impl_index"] = list(found).index(run["key"])
    entries = list(found.values())
    shorts = [_short_label(e["impl"]) for e in entries]
    for entry, short in zip(entries, shorts):
        entry["label"] = implementation_label(entry["impl"])
        entry["package"] = package_text(entry["impl"])
        entry["short"] = short if shorts.count(short) == 1 else entry["label"]
    return entries


def _annotate(runs: list[dict[str, Any]], implementations: list[dict[str, Any]]):
    """Records, tests and not-checked entries of every run, each knowing its run, implementation and outcome
    (a test id may pass on one host and fail on another, so outcomes are looked up within a run)."""
    records, tests, not_checked = [], [], []
    for index, run in enumerate(runs):
        impl = implementations[run["impl_index"]]["short"]
        outcomes = {t["nodeid"]: t["outcome"] for t in run["tests"]}
        extra = {"_run": index, "_run_label": run["label"], "_impl": impl}
        records += [{**r, **extra, "_outcome": record_outcome(r, outcomes.get(r["test"]))} for r in run["records"]]
        tests += [{**t, **extra} for t in run["tests"]]
        not_checked += [{**e, **extra} for e in run["not_checked"]]
    return records, tests, not_checked


# ---- meshes: chosen or drawn -----------------------------------------------------------------------------------

def mesh_named_by_test(nodeid: str, mesh: str) -> bool:
    """Whether a test id names the mesh among its parameters: 'test_mlp[meta-float32-1x4]' names 1x4,
    'test_component_matches_oracle[rmsnorm]' (a property test drawing its own mesh) names none."""
    params = nodeid[nodeid.find("[") + 1:] if "[" in nodeid else ""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(mesh)}(?![0-9A-Za-z])", params) is not None


def drawn_meshes(records: Iterable[Mapping[str, Any]],
                 environments: Iterable[Mapping[str, Any]] = ()) -> set[str]:
    """Meshes that no record's test id names and no environment's `meshes` list holds: those tests drew."""
    records = list(records)
    chosen = {m for env in environments for m in (env.get("meshes") or []) if isinstance(m, str)}
    chosen |= {r["mesh"] for r in records if r.get("mesh") and mesh_named_by_test(r["test"], r["mesh"])}
    return {r["mesh"] for r in records if r.get("mesh") and r["mesh"] not in chosen}


def mesh_column(record: Mapping[str, Any], drawn: set[str] | frozenset = frozenset()) -> str:
    return DRAWN if record.get("mesh") in drawn else scope_text(record.get("mesh"))


# ---- sections ----------------------------------------------------------------------------------------------

def verdict_of(tests: list[Mapping[str, Any]], records: list[Mapping[str, Any]], gate: Any = None,
               not_checked: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """PASS only when no test failed or errored and the baseline gate (if any) passed."""
    by_outcome = Counter(t["outcome"] for t in tests)
    bad = [t for t in tests if t["outcome"] in BAD_TEST_OUTCOMES]
    regressions = list(gate.regressions) if gate is not None else []
    record_counts = {"pass": 0, "fail": 0, "expected fail": 0}
    for record in records:
        record_counts[_outcome_of(record)] += 1
    return {
        "passed": not bad and not regressions,
        "tests": len(tests),
        "by_outcome": sorted(by_outcome.items(), key=lambda kv: OUTCOME_ORDER.index(kv[0])),
        "records": record_counts,
        "not_checked": len(not_checked),
        "quiet": [t for t in tests if t["outcome"] in ("skipped", "xfailed")],
        "gate": gate,
    }


def verdict(document: Mapping[str, Any], gate: Any = None) -> dict[str, Any]:
    """The verdict of one --parity-json document."""
    runs = _runs([("this run", document)])
    records, tests, not_checked = _annotate(runs, _implementations(runs))
    return verdict_of(tests, records, gate, not_checked)


def _diagnosis(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """A record's diagnosis (record.schema.json) for display: cause, summary, hypotheses best match first."""
    diagnosis = record.get("diagnosis")
    if not isinstance(diagnosis, Mapping):
        return None
    hypotheses = []
    for h in diagnosis.get("hypotheses") or []:
        residual = as_float(h.get("residual", math.nan))
        hypotheses.append({"name": h.get("name"), "description": h.get("description") or "",
                           "matched": bool(h.get("matched")), "residual": f"{residual:.2g}",
                           "sort": residual if math.isfinite(residual) else math.inf})
    hypotheses.sort(key=lambda h: (not h["matched"], h["sort"]))
    cause = diagnosis.get("cause")
    description = next((h["description"] for h in hypotheses if h["name"] == cause), "") if cause else ""
    return {"cause": cause, "label": cause or NO_KNOWN_CAUSE, "description": description,
            "summary": diagnosis.get("summary") or "", "hypotheses": hypotheses}


def cause_of(record: Mapping[str, Any]) -> str:
    """The probable cause's name, 'no known cause', or 'not diagnosed'."""
    diagnosis = _diagnosis(record)
    return diagnosis["label"] if diagnosis else NOT_DIAGNOSED


def probable_causes(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str] | None = None):
    """Failing records by probable cause: how many records and tests each explains, most first; 'no known
    cause' and 'not diagnosed' last. Empty when nothing fails."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if _outcome_of(record, outcomes) != "fail":
            continue
        label = cause_of(record)
        diagnosis = _diagnosis(record)
        default = {NO_KNOWN_CAUSE: "no hypothesis matched (the summary names the closest)",
                   NOT_DIAGNOSED: "the record carries no diagnosis"}.get(label, "")
        group = groups.setdefault(label, {"cause": label, "description": default, "records": 0, "tests": set()})
        group["records"] += 1
        group["tests"].add((record.get("_run"), record["test"]))
        if diagnosis and diagnosis["cause"] and not group["description"]:
            group["description"] = diagnosis["description"]
    rows = [{**g, "tests": len(g["tests"])} for g in groups.values()]
    return sorted(rows, key=lambda g: (g["cause"] in (NO_KNOWN_CAUSE, NOT_DIAGNOSED), g["cause"] == NOT_DIAGNOSED,
                                       -g["records"], g["cause"]))


def _failed_metric_lines(record: Mapping[str, Any]) -> list[str]:
    """'rel_l2 3.000e-06 > 1.000e-06 (3×)' for each failing metric; the error text for an error."""
    lines = [record["error"].splitlines()[0]] if record.get("error") else []
    for metric in record.get("failed_metrics") or ():
        if metric not in record.get("metrics", {}) or metric not in record.get("bounds", {}):
            continue
        value, limit = as_float(record["metrics"][metric]), as_float(record["bounds"][metric])
        sign = ">" if direction(metric) == UPPER else "<"
        lines.append(f"{metric} {format_value(metric, value)} {sign} {format_value(metric, limit)} "
                     f"({margin_text(budget_used(metric, value, limit))})")
    return lines


def failures(tests: list[Mapping[str, Any]], records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The failure-first view: every failed, errored or xpassed test, and every test with failing records, in
    run order, each with its first failing record (the first in computation order is where a bug enters), how
    many of its records fail, and that record's diagnosis."""
    by_test: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        by_test.setdefault((record.get("_run"), record["test"]), []).append(record)
    entries, seen = [], set()
    listed = [t for t in tests if t["outcome"] in (*BAD_TEST_OUTCOMES, "xpassed")]
    listed += [{"nodeid": test, "outcome": "failed", "message": None, "_run": run,
                "_run_label": rs[0].get("_run_label"), "_impl": rs[0].get("_impl")}
               for (run, test), rs in by_test.items() if any(_outcome_of(r) == "fail" for r in rs)
               and not any(t["nodeid"] == test and t.get("_run") == run for t in tests)]
    for test in listed:
        key = (test.get("_run"), test["nodeid"])
        if key in seen:
            continue
        seen.add(key)
        own = by_test.get(key, [])
        failing = [r for r in own if _outcome_of(r) == "fail"]
        first = failing[0] if failing else None
        entries.append({
            "test": test["nodeid"], "outcome": test["outcome"], "message": test.get("message"),
            "run": test.get("_run_label"), "implementation": test.get("_impl"),
            "records": len(own), "failing": len(failing),
            "first": None if first is None else {
                "name": first.get("name") or first["component"], "component": first["component"],
                "layer": first.get("layer"), "reference": scope_text(first.get("reference")),
                "dtype": first["dtype"], "mesh": scope_text(first.get("mesh")),
                "problems": _failed_metric_lines(first), "diagnosis": _diagnosis(first)},
        })
    return entries


def not_checked_summary(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Named tensors the implementation does not provide: how many, in how many tests, grouped by reason."""
    reasons: dict[str, dict[str, Any]] = {}
    for entry in entries:
        group = reasons.setdefault(entry.get("reason") or "no reason given",
                                   {"reason": entry.get("reason") or "no reason given", "count": 0, "tests": set(),
                                    "components": set()})
        group["count"] += 1
        group["tests"].add((entry.get("_run"), entry["test"]))
        group["components"].add(entry.get("component") or NONE_TEXT)
    groups = [{**g, "tests": len(g["tests"]), "components": sorted(g["components"], key=_component_order)}
              for g in reasons.values()]
    return {"count": len(entries), "tests": len({(e.get("_run"), e["test"]) for e in entries}),
            "reasons": sorted(groups, key=lambda g: -g["count"])}


def matrix(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str] | None = None,
           drawn: set[str] | frozenset = frozenset(), implementations: Sequence[str] = ()) -> dict[str, Any]:
    """One table per dtype: component x reference rows (the same rows in every table, so tables side by side
    line up), one column group per implementation, a column per mesh with drawn meshes folded into one; each
    cell the worst margin of its records.

    Records that fail as expected (planted bugs) are counted in a cell but neither colour it nor set its margin.
    """
    records = list(records)
    implementations = list(implementations) or list(dict.fromkeys(r.get("_impl", "") for r in records))
    cells: dict[tuple, dict[str, Any]] = {}
    for record in records:
        outcome = _outcome_of(record, outcomes)
        row = (record["component"], scope_text(record.get("reference")))
        column = (record.get("_impl", ""), mesh_column(record, drawn))
        cell = cells.setdefault((record["dtype"], row, column), {
            "records": 0, "failed": 0, "expected_fail": 0, "margin": 0.0, "metric": None, "worst": None,
            "meshes": Counter()})
        cell["records"] += 1
        cell["meshes"][scope_text(record.get("mesh"))] += 1
        if outcome == "expected fail":
            cell["expected_fail"] += 1
            continue
        cell["failed"] += outcome == "fail"
        used, metric = record_margin(record)
        if cell["worst"] is None or used > cell["margin"]:
            cell.update(margin=used, metric=metric, worst=record)
    for (_, _, (_, column)), cell in cells.items():
        cell["outcome"] = "fail" if cell["failed"] else ("pass" if cell["worst"] is not None else "expected fail")
        cell["margin_text"] = margin_text(cell["margin"]) if cell["worst"] is not None else "caught"
        cell["note"] = (f"{cell['failed']} fail" if cell["failed"] else
                        (cell["metric"] or "") if cell["worst"] is not None else f"{cell['expected_fail']} caught")
        worst = cell.pop("worst")
        meshes = cell.pop("meshes")
        cell["title"] = (f"{cell['records']} records, {cell['failed']} failing, {cell['expected_fail']} failing as "
                         f"expected" + (f"; worst: {worst['test']} [{worst.get('name') or worst['component']}] "
                                        f"{cell['metric']}" if worst else ""))
        if column == DRAWN:
            cell["title"] += "; drawn meshes: " + ", ".join(
                f"{m} ({n})" for m, n in sorted(meshes.items(), key=lambda kv: _mesh_order(kv[0])))
    rows = sorted({key[1] for key in cells}, key=lambda r: (_component_order(r[0]), r[1]))
    tables = []
    for dtype in sorted({key[0] for key in cells}, key=_dtype_order):
        groups = []
        for impl in implementations:
            meshes = sorted({key[2][1] for key in cells if key[0] == dtype and key[2][0] == impl}, key=_mesh_order)
            if meshes:
                groups.append({"implementation": impl, "meshes": meshes})
        columns = [(g["implementation"], mesh) for g in groups for mesh in g["meshes"]]
        tables.append({"dtype": dtype, "groups": groups, "columns": columns,
                       "rows": [{"component": r[0], "reference": r[1],
                                 "cells": [cells.get((dtype, r, c)) for c in columns]} for r in rows]})
    return {"tables": tables, "drawn": sorted(drawn, key=_mesh_order), "rows": bool(rows)}


def depth_series(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str] | None = None,
                 by_implementation: bool = False) -> dict[str, dict[tuple[str, str], dict[int, float]]]:
    """metric -> (reference, dtype) -> layer -> worst value over the records at that layer (any mesh, name);
    with `by_implementation`, the line's first label is 'implementation · reference'.

    Only records with a layer count, and not those failing as expected (planted bugs). NaN counts as +inf.
    """
    series: dict[str, dict[tuple[str, str], dict[int, float]]] = {m: {} for m in DEPTH_METRICS}
    for record in records:
        if record.get("layer") is None or _outcome_of(record, outcomes) == "expected fail":
            continue
        reference = scope_text(record.get("reference"))
        if by_implementation:
            reference = f"{record.get('_impl', '')} · {reference}"
        for metric in DEPTH_METRICS:
            if metric not in record["metrics"]:
                continue
            value = as_float(record["metrics"][metric])
            value = math.inf if math.isnan(value) else value
            line = series[metric].setdefault((reference, record["dtype"]), {})
            line[record["layer"]] = max(value, line.get(record["layer"], -math.inf))
    return series


def record_rows(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str] | None = None,
                drawn: set[str] | frozenset = frozenset()) -> list[dict[str, Any]]:
    """One table row per record, failing ones first: scope, outcome, worst margin, every metric with its bound,
    and the probable cause of a failing record."""
    rows = []
    for record in records:
        used, metric = record_margin(record)
        diagnosis = _diagnosis(record)
        rows.append({
            "outcome": _outcome_of(record, outcomes),
            "component": record["component"], "name": record.get("name") or "",
            "layer": record.get("layer"), "reference": scope_text(record.get("reference")), "dtype": record["dtype"],
            "mesh": scope_text(record.get("mesh")), "mesh_group": DRAWN if record.get("mesh") in drawn else "",
            "test": record["test"], "implementation": record.get("_impl", ""), "run": record.get("_run_label", ""),
            "margin_sort": used if math.isfinite(used) else 1e308,
            "margin_text": margin_text(used), "margin_metric": metric, "error": record.get("error"),
            "metrics": _metric_items(record),
            "cause": diagnosis["label"] if diagnosis else "", "diagnosis": diagnosis,
        })
    return sorted(rows, key=lambda r: r["outcome"] != "fail")


def _metric_items(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every metric of a record, bounded ones first: value, its bound and margin, whether it failed."""
    bounds, failed = record.get("bounds", {}), set(record.get("failed_metrics") or ())
    items = []
    for metric, raw in record.get("metrics", {}).items():
        value = as_float(raw)
        if metric.startswith("nonfinite_") and value == 0.0:
            continue  # zero NaN/Inf counts are the normal case; a non-zero count is shown and is also an error
        item = {"metric": metric, "value": format_value(metric, value), "bound": None, "used": None,
                "failed": metric in failed}
        if metric in bounds and direction(metric) in (UPPER, LOWER):
            bound = as_float(bounds[metric])
            item.update(bound=("≤ " if direction(metric) == UPPER else "≥ ") + format_value(metric, bound),
                        used=margin_text(budget_used(metric, value, bound)))
        items.append(item)
    return sorted(items, key=lambda i: i["bound"] is None)


def generation_cases(records: Iterable[Mapping[str, Any]],
                     outcomes: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Generation records (their `generation` field, record.schema.json): per prompt, both token streams step by
    step, the first divergence and both top-k lists there. Failing records first, then those whose streams part."""
    cases = []
    for record in records:
        payload = record.get("generation")
        if not payload:
            continue
        prompts = [_prompt(row) for row in payload["rows"]]
        outcome = _outcome_of(record, outcomes)
        cases.append({"record": record, "outcome": outcome, "case": payload["case"],
                      "start_pos": payload["start_pos"], "actual_engine": payload["actual_engine"],
                      "expected_engine": payload["expected_engine"], "prompts": prompts,
                      "implementation": record.get("_impl", ""),
                      "diverged": sum(p["first_divergence"] is not None for p in prompts)})
    return sorted(cases, key=lambda c: (c["outcome"] != "fail", c["diverged"] == 0))


def _prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """One prompt's streams side by side around the first divergence (STEPS_BEFORE steps before it,
    STEPS_AFTER after), which is marked; identical streams show no steps, only their length."""
    actual, expected = list(row["actual_tokens"]), list(row["expected_tokens"])
    length = max(len(actual), len(expected))
    diverge = row["first_divergence"] if row["first_divergence"] >= 0 else None
    first, last = (0, 0)
    if diverge is not None:
        first, last = max(0, diverge - STEPS_BEFORE), min(length, diverge + STEPS_AFTER + 1)
    steps = []
    for i in range(first, last):
        steps.append({"step": i, "actual": actual[i] if i < len(actual) else "",
                      "expected": expected[i] if i < len(expected) else "",
                      "mark": "diverge" if i == diverge else ("after" if i > diverge else "")})
    topk = None
    if diverge is not None and row.get("topk_actual") is not None:
        topk = _topk(row["topk_actual"], row["topk_expected"] or [], chosen_actual=actual[diverge],
                     chosen_expected=expected[diverge])
    return {"prompt": row["prompt"], "prompt_length": row["prompt_length"], "first_divergence": diverge,
            "length": length, "steps": steps, "hidden_before": first, "hidden_after": length - last,
            "actual_text": row.get("actual_text"), "expected_text": row.get("expected_text"), "topk": topk}


def _topk(top_actual: list, top_expected: list, *, chosen_actual: int, chosen_expected: int) -> list[tuple]:
    """Rows of (implementation entry, reference entry), most likely first; an entry is marked when it is the
    token the other side chose, which a near-tie divergence keeps in the top-k."""
    def entries(top: list, other_choice: int) -> list[dict[str, Any]]:
        return [{"token": int(token), "logprob": f"{as_float(logprob):.4f}", "other_choice": int(token) == other_choice}
                for token, logprob in top]

    sides = entries(top_actual, chosen_expected), entries(top_expected, chosen_actual)
    depth = max(map(len, sides))
    return [tuple(side[i] if i < len(side) else None for side in sides) for i in range(depth)]


def _environment_values(environment: Mapping[str, Any], records: list[Mapping[str, Any]],
                        drawn: set[str] | frozenset) -> list[tuple[str, Any]]:
    """What ran where for one run: implementation, platform, devices, meshes, tolerance profile, seeds, time."""
    devices = environment.get("devices") or {}
    device_text = (f"{devices.get('count')} x {devices.get('kind')} ({devices.get('platform')})" if devices
                   else "not reported (no process had started a JAX backend)")
    seeds = environment.get("seeds") or {}
    wall = environment.get("wall_time_s")
    meshes = sorted({scope_text(r.get("mesh")) for r in records}, key=_mesh_order)
    return [
        ("implementation under test", implementation_label(implementation_of(environment))),
        ("platform", environment.get("platform")),
        ("CPU (flags that pick kernels)", cpu_label(environment.get("cpu")) if environment.get("cpu") else None),
        ("python", python_text(environment) or None),
        ("devices", device_text),
        ("processes", devices.get("process_count")),
        ("meshes in records", ", ".join(m for m in meshes if m not in drawn) or "none"),
        ("drawn meshes", ", ".join(m for m in meshes if m in drawn) or None),
        ("dtypes in records", ", ".join(sorted({r["dtype"] for r in records}, key=_dtype_order)) or "none"),
        ("references in records", ", ".join(sorted({scope_text(r.get("reference")) for r in records})) or "none"),
        ("tolerance profile", environment.get("tolerance_profile")),
        ("seeds", ", ".join(f"{k}={v}" for k, v in sorted(seeds.items())) or
         "not recorded (no fixture called parity.plugin.note_seed)"),
        ("xdist workers", environment.get("xdist_workers")),
        ("started at", environment.get("started_at")),
        ("wall time", f"{wall:.1f} s" if isinstance(wall, (int, float)) else "not measured"),
        ("pytest exit status", environment.get("_exitstatus")),
    ]


def environment_rows(runs: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                     drawn: set[str] | frozenset = frozenset()) -> dict[str, Any]:
    """The environment of every run, one column per run: settings rows, then package versions."""
    per_run = []
    for index, run in enumerate(runs):
        environment = {**run["environment"], "_exitstatus": run.get("exitstatus")}
        per_run.append(dict(_environment_values(environment, [r for r in records if r.get("_run") == index], drawn)))
    keys = [k for k, _ in _environment_values({}, [], drawn)]
    rows = [(k, [values[k] if values[k] is not None else "" for values in per_run]) for k in keys
            if any(values[k] is not None for values in per_run)]
    packages = list(dict.fromkeys(n for run in runs for n in (run["environment"].get("versions") or {})))
    versions = [(name, [(run["environment"].get("versions") or {}).get(name) or "not installed" for run in runs])
                for name in packages]
    return {"columns": [run["label"] for run in runs], "rows": rows, "versions": versions}


# ---- chart -------------------------------------------------------------------------------------------------

def depth_chart(series: Mapping[str, Mapping[tuple[str, str], Mapping[int, float]]]) -> str | None:
    """Error against depth as inline SVG: one panel per metric, one line per (reference, dtype), log scale.

    Exact zeros sit on the bottom edge (hollow markers) and non-finite values on the top edge (crosses), so
    no point silently disappears from a log axis. None when no record has a layer.
    """
    if not any(series.values()):
        return None
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    references = sorted({ref for lines in series.values() for ref, _ in lines})
    colours = {ref: f"C{i % 10}" for i, ref in enumerate(references)}
    styles = {"float32": "-", "bfloat16": "--"}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "parity-depth", "font.size": 9}):
        figure = Figure(figsize=(11, 3.8), layout="constrained")
        FigureCanvasSVG(figure)
        axes = figure.subplots(1, len(DEPTH_METRICS))
        for ax, metric in zip(axes, DEPTH_METRICS):
            _depth_panel(ax, metric, series[metric], colours, styles)
        handles, labels = [], []
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
        if handles:
            figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _depth_panel(ax: Any, metric: str, lines: Mapping[tuple[str, str], Mapping[int, float]],
                 colours: Mapping[str, str], styles: Mapping[str, str]) -> None:
    ax.set_title(f"{metric} per layer (worst over tensors and meshes)")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    if not lines:
        ax.text(0.5, 0.5, f"no record with a layer has {metric}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    values = [v for line in lines.values() for v in line.values()]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    low = min(finite) / 10 if finite else 1e-12
    high = max(finite) * 10 if finite else 1.0
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    for (reference, dtype), points in sorted(lines.items(), key=lambda kv: (kv[0][0], _dtype_order(kv[0][1]))):
        layers = sorted(points)
        ys = [min(max(points[layer], low), high) for layer in layers]
        (line,) = ax.plot(layers, ys, styles.get(dtype, ":"), color=colours[reference], marker="o", markersize=4,
                          label=f"{reference} · {dtype}")
        line.set_gid(f"depth-{metric}-{reference}-{dtype}".replace(" · ", "-").replace(" ", "_"))
        edges = [(layer, y, points[layer]) for layer, y in zip(layers, ys) if points[layer] <= 0 or
                 not math.isfinite(points[layer])]
        for layer, y, raw in edges:
            ax.plot([layer], [y], "x" if raw > 0 else "o", color=colours[reference], markersize=9,
                    markerfacecolor="none")
    if metric == "noise_ratio" and low <= 1.0 <= high:
        ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        ax.annotate("as exact as the reference", (0.01, 1.0), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="0.3")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="major", alpha=0.3)


# ---- page ----------------------------------------------------------------------------------------------------

def _jinja():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["plural"] = plural
    env.filters["file_name"] = lambda path: str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return env


def plural(count: int, word: str) -> str:
    """'1 test', '2 tests'."""
    return f"{count} {word}" + ("" if count == 1 else "s")


def context_of(sources: Sequence[tuple[str, Mapping[str, Any]]], gate: Any = None) -> dict[str, Any]:
    """Everything the template shows, computed once from (label, --parity-json document) pairs."""
    runs = _runs(sources)
    implementations = _implementations(runs)
    records, tests, not_checked = _annotate(runs, implementations)
    drawn = drawn_meshes(records, [run["environment"] for run in runs])
    several = len(implementations) > 1
    rows = record_rows(records, drawn=drawn)
    series = depth_series(records, by_implementation=several)
    positions = position_series(r for r in records if _outcome_of(r) != "expected fail")
    overall = verdict_of(tests, records, gate, not_checked)
    for entry in implementations:
        mine = [r for r in records if r["_impl"] == entry["short"]]
        entry["verdict"] = verdict_of([t for t in tests if t["_impl"] == entry["short"]], mine,
                                      gate if not several else None,
                                      [e for e in not_checked if e["_impl"] == entry["short"]])
        entry["run_labels"] = [runs[i]["label"] for i in entry["runs"]]
    covered = scope([run["environment"] for run in runs], tests, records)
    filter_keys = ["component", "reference", "dtype", "mesh", "outcome"]
    if several:
        filter_keys.insert(0, "implementation")
    if any(r["cause"] for r in rows):
        filter_keys.append("cause")
    filters = {key: sorted({str(r[key]) for r in rows if r[key] != ""}, key=_filter_order(key))
               for key in filter_keys}
    subject = implementations[0]["label"] if len(implementations) == 1 else (
        f"{len(implementations)} implementations" if implementations else "no run")
    return {
        "subject": subject,
        "implementations": implementations,
        "several_implementations": several,
        "several_runs": len(runs) > 1,
        "exitstatus": runs[0]["exitstatus"] if len(runs) == 1 else None,
        "verdict": overall,
        "scope": covered,
        "scorecard": scorecard_rows(implementations, tests, records, not_checked, covered["battery"]),
        "failures": failures(tests, records),
        "causes": probable_causes(records),
        "pooled": pooled_diagnosis(r for r in records if _outcome_of(r) == "fail"),
        "diagnosed": any(r.get("diagnosis") for r in records),
        "not_checked": not_checked_summary(not_checked),
        "matrix": matrix(records, drawn=drawn, implementations=[e["short"] for e in implementations]),
        "depth_svg": depth_chart(series),
        "depth_table": _depth_table(series),
        "position_svg": position_chart(positions),
        "position_table": position_table(positions),
        "rows": rows,
        "filters": filters,
        "generation": generation_cases(records),
        "environment": environment_rows(runs, records, drawn),
    }


def scorecard_rows(implementations: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]],
                   records: Sequence[Mapping[str, Any]], not_checked: Sequence[Mapping[str, Any]],
                   battery: Sequence[str]) -> list[dict[str, Any]]:
    """The scorecard (parity.areas): one row per area, one cell per implementation with its status and what the
    status rests on; 'other' only when some test or record of a run falls there."""
    cards = []
    for entry in implementations:
        mine = entry["short"]
        cards.append({row["area"]: row for row in scorecard(
            [t for t in tests if t["_impl"] == mine], [r for r in records if r["_impl"] == mine],
            [e for e in not_checked if e["_impl"] == mine], battery)})
    areas = [*AREAS, *(a for a in dict.fromkeys(a for card in cards for a in card) if a not in AREAS)]
    return [{"area": area, "cells": [{**card[area], "detail": area_detail(card[area])} if area in card else None
                                     for card in cards]} for area in areas]


def context(document: Mapping[str, Any], gate: Any = None) -> dict[str, Any]:
    """The template context of one --parity-json document (what the plugin writes)."""
    return context_of([("this run", document)], gate)


def _filter_order(key: str):
    return {"component": _component_order, "dtype": _dtype_order, "mesh": _mesh_order}.get(key, lambda v: (v,))


def _depth_table(series: Mapping[str, Mapping[tuple[str, str], Mapping[int, float]]]) -> list[dict[str, Any]]:
    """The chart's numbers, for reading exact values and for screen readers."""
    rows = []
    for metric, lines in series.items():
        for (reference, dtype), points in sorted(lines.items()):
            rows.append({"metric": metric, "reference": reference, "dtype": dtype,
                         "values": [(layer, format_value(metric, points[layer])) for layer in sorted(points)]})
    return rows


def render_runs(sources: Sequence[tuple[str, Mapping[str, Any]]], gate: Any = None) -> str:
    """One page from several (label, document) pairs: runs of one implementation merge, implementations sit
    side by side."""
    return _jinja().get_template("report.html.j2").render(**context_of(sources, gate))


def render(document: Mapping[str, Any], gate: Any = None) -> str:
    """The report page of one document as one HTML string."""
    return render_runs([("this run", document)], gate)


def write_html(path: str | Path, html: str) -> None:
    """Write a rendered page, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(html, encoding="utf-8")


def write_report(path: str | Path, document: Mapping[str, Any], gate: Any = None) -> None:
    """Render and write the report, creating the parent folder."""
    write_html(path, render(document, gate))


def run_counts(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, int]:
    """How many runs and implementations these documents hold, as the page groups them."""
    runs = _runs(sources)
    return len(runs), len(_implementations(runs))
