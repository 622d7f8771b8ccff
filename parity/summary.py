"""A run's summary, shared by the terminal and the report: verdict lines, what was not checked, the worst case
per component, and the probable causes the diagnosis named for the failing records.
"""
from __future__ import annotations

from typing import Any, Iterable

from parity import baseline as pb
from parity.areas import scope, scorecard, scorecard_line
from parity.check import budget_used, format_value
from parity.pooled import pooled_diagnosis
from parity.report import probable_causes, record_outcome
from parity.tolerances import LOWER, UPPER, direction


def not_checked_lines(entries: list[dict[str, Any]]) -> list[str]:
    """How many checks did not run on the implementation, and the commonest reasons."""
    tests: dict[str, str] = {}
    for entry in entries:
        tests.setdefault(entry["test"], entry["reason"])
    reasons: dict[str, int] = {}
    for reason in tests.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    lines = [f"not checked: {len(tests)} tests ({len(entries)} entries); the implementation lacks what they need:"]
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:5]:
        lines.append(f"  {count:4d} x {reason[:150]}")
    return lines


def scope_lines(environment: dict[str, Any], records: list[dict], tests: list[dict],
                not_checked: list[dict]) -> list[str]:
    """What the run covered and its status per area (parity.areas), as the report's first screen says them."""
    covered = scope([environment], tests, records)
    if covered["known"]:
        if covered["deselected"]:
            part = "part of what it selects" if covered["partial"] else "all it selects"
            modules = (f"{len(covered['ran'])} of the {len(covered['selected'])} battery modules its -m selects "
                       f"({part}; {len(covered['deselected'])} more outside it: "
                       f"{', '.join(covered['deselected_marks'])})")
        else:
            part = "part of the battery" if covered["partial"] else "the whole battery"
            modules = f"{len(covered['ran'])} of {len(covered['battery'])} battery modules ({part})"
    else:
        count = len(covered["modules"])
        modules = f"{count} module{'' if count == 1 else 's'} (the battery's modules not recorded)"
    settings = [f"{name} {', '.join(values)}" for name, values in
                (("meshes", covered["meshes"]), ("dtypes", covered["dtypes"]), ("references", covered["references"]))
                if values]
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    judged = [{**r, "_outcome": record_outcome(r, outcomes.get(r["test"]))} for r in records]
    areas = scorecard(tests, judged, not_checked, covered["battery"])
    return [f"scope: {' · '.join([modules, *settings])} · profile {covered['profile'] or 'not recorded'}",
            f"areas: {scorecard_line(areas)}"]


def worst_per_component(records: list[dict[str, Any]]) -> dict[str, tuple[float, str, dict]]:
    """For each component, the (budget used, metric, record) closest to or furthest past its bound."""
    worst: dict[str, tuple[float, str, dict]] = {}
    for record in records:
        for metric, bound in record["bounds"].items():
            value = record["metrics"].get(metric)
            if value is None or direction(metric) not in (UPPER, LOWER):
                continue
            used = budget_used(metric, value, bound)
            current = worst.get(record["component"])
            if current is None or used > current[0]:
                worst[record["component"]] = (used, metric, record)
    return worst


def summary_lines(records: list[dict], tests: list[dict], json_path: str | None,
                  gate: pb.GateResult | None = None) -> list[str]:
    """The terminal summary: verdict, record counts, worst case per component, baseline gate, JSON path."""
    failed_records = [r for r in records if not r["passed"]]
    bad_tests = [t for t in tests if t["outcome"] in ("failed", "error")]
    regressions = f"; {len(gate.regressions)} baseline regressions" if gate and not gate.passed else ""
    verdict = "PASS" if not bad_tests and not regressions else "FAIL"
    lines = ["", "=" * 20 + " parity summary " + "=" * 20,
             f"verdict: {verdict} ({len(bad_tests)} failed/error of {len(tests)} tests{regressions})",
             f"records: {len(records) - len(failed_records)} passed, {len(failed_records)} failed"]
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    caught = [r for r in failed_records if outcomes.get(r["test"]) in ("passed", "xfailed")]
    if caught:
        lines.append(f"  ({len(caught)} failed records belong to tests that passed or xfailed, "
                     f"e.g. planted-bug checks)")
    judged = [r for r in records if r["passed"] or outcomes.get(r["test"]) not in ("passed", "xfailed")]
    worst = worst_per_component(judged)  # planted bugs a test caught are not the run's worst case
    if worst:
        lines.append("worst per component (share of bound used; > 1 fails):")
    for component, (used, metric, record) in sorted(worst.items()):
        label = record["test"] + (f" [{record['name']}]" if record.get("name") else "")
        value, bound = format_value(metric, record["metrics"][metric]), format_value(metric, record["bounds"][metric])
        lines.append(f"  {component:<14} {metric} = {value} (bound {bound}, {used:.3g}x)  {label}")
    for record in [r for r in failed_records if r.get("error")][:5]:
        lines.append(f"  error in {record['test']} [{record.get('name')}]: {record['error'].splitlines()[0]}")
    lines += cause_lines(failed_records, outcomes)
    lines += pooled_lines(run_failures(records, tests))
    if gate is not None:
        lines += pb.summary_lines(gate)
    if json_path:
        lines.append(f"parity JSON: {json_path}")
    return lines


def cause_lines(failed_records: list[dict], outcomes: dict[str, str]) -> list[str]:
    """The probable causes of the failing records (parity.diagnosis, grouped as the report's summary does), when
    any failing record was diagnosed."""
    if not any(r.get("diagnosis") for r in failed_records):
        return []
    lines = ["probable causes (failing records / tests):"]
    for group in probable_causes(failed_records, outcomes)[:8]:
        about = f" — {group['description']}" if group["description"] else ""
        lines.append(f"  {group['records']:4d} / {group['tests']:<4d} {group['cause']}{about}")
    return lines


def run_failures(records: Iterable[dict], tests: Iterable[dict]) -> list[dict]:
    """The failing records of the tests that failed (not those a passing test expects, such as planted bugs)."""
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    return [r for r in records if not r["passed"] and outcomes.get(r["test"]) not in ("passed", "xfailed")]


def pooled_lines(failures: list[dict]) -> list[str]:
    """The pooled diagnosis (parity.pooled) of the failing records, when it names anything."""
    named = pooled_diagnosis(failures)
    if not named:
        return []
    return ["pooled diagnosis (the failing records together):", *(f"  {row['summary']}" for row in named[:4])]
