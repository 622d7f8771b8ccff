"""The HTML parity report (--parity-report): one self-contained file, inline CSS, JS and SVG, no network.

It is built from the same document as --parity-json (and the baseline gate's result, when there is one), so
what a person reads and what CI parses cannot disagree. The page comes from the Jinja2 template in
parity/templates; the error-against-depth chart is drawn by matplotlib's SVG backend and inlined.

Beyond DESIGN.md's record shape it reads the optional `generation` field of generation records (token
streams, first divergence, top-k; declared in record.schema.json). Any other extra field is ignored.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from fixtures.tolerances import COMPONENTS, LOWER, UPPER, direction
from parity.check import budget_used, format_value

TEMPLATES = Path(__file__).with_name("templates")
DEPTH_METRICS = ("rel_l2", "noise_ratio")
BAD_TEST_OUTCOMES = ("failed", "error")
OUTCOME_ORDER = ("passed", "failed", "error", "xpassed", "xfailed", "skipped")
NONE_TEXT = "none"  # how a null reference / mesh / layer shows and filters
_DTYPE_ORDER = ("float32", "bfloat16")
STEPS_BEFORE, STEPS_AFTER = 4, 8  # the window of a generation stream shown around its first divergence


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


def scope_text(value: Any) -> str:
    """A scope field for display and filtering; None becomes 'none'."""
    return NONE_TEXT if value is None else str(value)


# ---- ordering --------------------------------------------------------------------------------------------

def _component_order(name: str) -> tuple:
    return (COMPONENTS.index(name), "") if name in COMPONENTS else (len(COMPONENTS), name)


def _dtype_order(name: str) -> tuple:
    return (_DTYPE_ORDER.index(name), "") if name in _DTYPE_ORDER else (len(_DTYPE_ORDER), name)


def _mesh_order(name: str) -> tuple:
    """'1x1' < '1x2' < '1x4' < '2x4' < '1x8' (by device count, then data size); anything else last."""
    try:
        data, model = (int(p) for p in name.split("x"))
    except ValueError:
        return (math.inf, 0, name)
    return (data * model, data, name)


# ---- sections ----------------------------------------------------------------------------------------------

def verdict(document: Mapping[str, Any], gate: Any = None) -> dict[str, Any]:
    """The headline: PASS only when no test failed or errored and the baseline gate (if any) passed."""
    tests = document.get("tests", [])
    by_outcome: dict[str, int] = {}
    for test in tests:
        by_outcome[test["outcome"]] = by_outcome.get(test["outcome"], 0) + 1
    bad = [t for t in tests if t["outcome"] in BAD_TEST_OUTCOMES]
    regressions = list(gate.regressions) if gate is not None else []
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    record_counts = {"pass": 0, "fail": 0, "expected fail": 0}
    for record in document.get("records", []):
        record_counts[record_outcome(record, outcomes.get(record["test"]))] += 1
    return {
        "passed": not bad and not regressions,
        "tests": len(tests),
        "by_outcome": sorted(by_outcome.items(), key=lambda kv: OUTCOME_ORDER.index(kv[0])),
        "records": record_counts,
        "problems": [t for t in tests if t["outcome"] in (*BAD_TEST_OUTCOMES, "xpassed")],
        "quiet": [t for t in tests if t["outcome"] in ("skipped", "xfailed")],
        "gate": gate,
        "exitstatus": document.get("exitstatus"),
    }


def matrix(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str]) -> dict[str, Any]:
    """Component x reference rows, dtype x mesh columns; each cell the worst margin of its records.

    Records that fail as expected (planted bugs) are counted in a cell but neither colour it nor set its margin.
    """
    cells: dict[tuple, dict[str, Any]] = {}
    for record in records:
        outcome = record_outcome(record, outcomes.get(record["test"]))
        row = (record["component"], scope_text(record.get("reference")))
        column = (record["dtype"], scope_text(record.get("mesh")))
        cell = cells.setdefault((row, column), {"records": 0, "failed": 0, "expected_fail": 0, "margin": 0.0,
                                                "metric": None, "worst": None})
        cell["records"] += 1
        if outcome == "expected fail":
            cell["expected_fail"] += 1
            continue
        cell["failed"] += outcome == "fail"
        used, metric = record_margin(record)
        if cell["worst"] is None or used > cell["margin"]:
            cell.update(margin=used, metric=metric, worst=record)
    for cell in cells.values():
        cell["outcome"] = "fail" if cell["failed"] else ("pass" if cell["worst"] is not None else "expected fail")
        cell["margin_text"] = margin_text(cell["margin"]) if cell["worst"] is not None else "caught"
        worst = cell.pop("worst")
        cell["title"] = (f"{cell['records']} records, {cell['failed']} failing, {cell['expected_fail']} failing as "
                         f"expected" + (f"; worst: {worst['test']} [{worst.get('name') or worst['component']}] "
                                        f"{cell['metric']}" if worst else ""))
    rows = sorted({key[0] for key in cells}, key=lambda r: (_component_order(r[0]), r[1]))
    columns = sorted({key[1] for key in cells}, key=lambda c: (_dtype_order(c[0]), _mesh_order(c[1])))
    return {"columns": columns,
            "dtypes": _spans([c[0] for c in columns]),
            "rows": [{"component": r[0], "reference": r[1], "cells": [cells.get((r, c)) for c in columns]}
                     for r in rows]}


def _spans(values: list[str]) -> list[tuple[str, int]]:
    """Runs of equal neighbours, for a header cell that spans its group: ['a','a','b'] -> [('a',2), ('b',1)]."""
    spans: list[tuple[str, int]] = []
    for value in values:
        if spans and spans[-1][0] == value:
            spans[-1] = (value, spans[-1][1] + 1)
        else:
            spans.append((value, 1))
    return spans


def depth_series(records: Iterable[Mapping[str, Any]],
                 outcomes: Mapping[str, str]) -> dict[str, dict[tuple[str, str], dict[int, float]]]:
    """metric -> (reference, dtype) -> layer -> worst value over the records at that layer (any mesh, name).

    Only records with a layer count, and not those failing as expected (planted bugs). NaN counts as +inf.
    """
    series: dict[str, dict[tuple[str, str], dict[int, float]]] = {m: {} for m in DEPTH_METRICS}
    for record in records:
        if record.get("layer") is None or record_outcome(record, outcomes.get(record["test"])) == "expected fail":
            continue
        for metric in DEPTH_METRICS:
            if metric not in record["metrics"]:
                continue
            value = as_float(record["metrics"][metric])
            value = math.inf if math.isnan(value) else value
            line = series[metric].setdefault((scope_text(record.get("reference")), record["dtype"]), {})
            line[record["layer"]] = max(value, line.get(record["layer"], -math.inf))
    return series


def record_rows(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str]) -> list[dict[str, Any]]:
    """One table row per record: scope, outcome, worst margin and every metric with its bound."""
    rows = []
    for record in records:
        used, metric = record_margin(record)
        rows.append({
            "outcome": record_outcome(record, outcomes.get(record["test"])),
            "component": record["component"], "name": record.get("name") or "",
            "layer": record.get("layer"), "reference": scope_text(record.get("reference")), "dtype": record["dtype"],
            "mesh": scope_text(record.get("mesh")), "test": record["test"],
            "margin_sort": used if math.isfinite(used) else 1e308,
            "margin_text": margin_text(used), "margin_metric": metric, "error": record.get("error"),
            "metrics": _metric_items(record),
        })
    return rows


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


def generation_cases(records: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str]) -> list[dict[str, Any]]:
    """Generation records (their `generation` field, record.schema.json): per prompt, both token streams step by
    step, the first divergence and both top-k lists there. Failing records first, then those whose streams part."""
    cases = []
    for record in records:
        payload = record.get("generation")
        if not payload:
            continue
        prompts = [_prompt(row) for row in payload["rows"]]
        outcome = record_outcome(record, outcomes.get(record["test"]))
        cases.append({"record": record, "outcome": outcome, "case": payload["case"],
                      "start_pos": payload["start_pos"], "actual_engine": payload["actual_engine"],
                      "expected_engine": payload["expected_engine"], "prompts": prompts,
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


def environment_rows(environment: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What ran where: package versions, platform, devices, meshes, tolerance profile, seeds, wall time."""
    records = list(records)
    devices = environment.get("devices") or {}
    device_text = (f"{devices.get('count')} x {devices.get('kind')} ({devices.get('platform')})" if devices
                   else "not reported (no process had started a JAX backend)")
    seeds = environment.get("seeds") or {}
    wall = environment.get("wall_time_s")
    rows = [
        ("platform", environment.get("platform")),
        ("python", f"{environment.get('python_implementation', '')} {environment.get('python', '')}".strip()),
        ("devices", device_text),
        ("processes", devices.get("process_count")),
        ("meshes in records",
         ", ".join(sorted({scope_text(r.get("mesh")) for r in records}, key=_mesh_order)) or "none"),
        ("dtypes in records", ", ".join(sorted({r["dtype"] for r in records}, key=_dtype_order)) or "none"),
        ("references in records", ", ".join(sorted({scope_text(r.get("reference")) for r in records})) or "none"),
        ("tolerance profile", environment.get("tolerance_profile")),
        ("seeds", ", ".join(f"{k}={v}" for k, v in sorted(seeds.items())) or
         "not recorded (no fixture called parity.plugin.note_seed)"),
        ("xdist workers", environment.get("xdist_workers")),
        ("started at", environment.get("started_at")),
        ("wall time", f"{wall:.1f} s" if isinstance(wall, (int, float)) else "not measured"),
    ]
    versions = [(name, version or "not installed") for name, version in environment.get("versions", {}).items()]
    return {"rows": [(k, v) for k, v in rows if v is not None], "versions": versions}


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
        line.set_gid(f"depth-{metric}-{reference}-{dtype}")
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

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def context(document: Mapping[str, Any], gate: Any = None) -> dict[str, Any]:
    """Everything the template shows, computed once from the document."""
    records = document.get("records", [])
    outcomes = {t["nodeid"]: t["outcome"] for t in document.get("tests", [])}
    rows = record_rows(records, outcomes)
    series = depth_series(records, outcomes)
    return {
        "verdict": verdict(document, gate),
        "matrix": matrix(records, outcomes),
        "depth_svg": depth_chart(series),
        "depth_table": _depth_table(series),
        "rows": rows,
        "filters": {key: sorted({str(r[key]) for r in rows}, key=_filter_order(key))
                    for key in ("component", "reference", "dtype", "mesh", "outcome")},
        "generation": generation_cases(records, outcomes),
        "environment": environment_rows(document.get("environment", {}), records),
    }


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


def render(document: Mapping[str, Any], gate: Any = None) -> str:
    """The report page as one HTML string."""
    return _jinja().get_template("report.html.j2").render(**context(document, gate))


def write_report(path: str | Path, document: Mapping[str, Any], gate: Any = None) -> None:
    """Render and write the report, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(render(document, gate), encoding="utf-8")
