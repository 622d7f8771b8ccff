"""`python -m benchmarks.drawn_bounds`: the worst value every drawn case reached, against the bound that judges it.

    python -m benchmarks.drawn_bounds                                    # thorough, both modules, -n 2
    python -m benchmarks.drawn_bounds --profile dev -- -k meshes_agree   # more pytest arguments after --
    python -m benchmarks.drawn_bounds --records out/drawn/records.json   # analyse an earlier run again

A bound that random draws are judged by must sit above what any draw reaches, with a stated margin. This runs the
property-based and metamorphic modules with every bound off (so no example fails, shrinks or stops its test early)
and prints, per component, dtype and metric, the worst value, its case and the margin (docs/internals.md#drawn-bounds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conformance import strategies
from llama_spec.files import InputFileError, read_json
from parity import check, tolerances
from parity.tolerances import LOWER, UPPER, bounds_for, direction

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("conformance/test_properties.py", "conformance/test_metamorphic.py")
CASES_ENV = "DRAWN_BOUNDS_CASES"


# ---- the plugin side: no bound is judged, every example's case is noted -----------------------

def _install() -> None:
    def no_bounds(component, dtype, profile, reference=None, mesh=None, **kwargs):
        bounds = tolerances.bounds_for(component, dtype, profile, reference=reference, mesh=mesh, **kwargs)
        return {m: b for m, b in bounds.items() if tolerances.direction(m) == tolerances.PARAM}

    check.bounds_for = no_bounds
    directory = os.environ.get(CASES_ENV)
    if not directory:
        return
    path = Path(directory) / f"cases-{os.getpid()}.jsonl"
    original = strategies.run_case

    def run_case(request, **drawn):
        case = drawn.get("case")
        if case is not None:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"tag": case.tag, "test": request.node.nodeid,
                                         "drawn": {k: repr(v) for k, v in drawn.items()}}) + "\n")
        return original(request, **drawn)

    strategies.run_case = run_case


def pytest_configure(config) -> None:
    """Loaded as a plugin (-p benchmarks.drawn_bounds): before collection, so before the tests import run_case."""
    _install()


# ---- the command side: run, then analyse ------------------------------------------------------

def worst_values(records: list[dict], profile: str = "default") -> dict[tuple, dict]:
    """(component, dtype, metric) -> the worst record for that metric, with the table's bounds for it."""
    worst: dict[tuple, dict] = {}
    for record in records:
        for metric, value in record.get("metrics", {}).items():
            kind = direction(metric)
            if kind not in (UPPER, LOWER) or value is None or value != value:
                continue
            scope = dict(reference=record.get("reference"), mesh=record.get("mesh"))
            bounds = {p: bounds_for(record["component"], record["dtype"], p, **scope).get(metric)
                      for p in ("default", "strict")}
            if bounds[profile] is None:
                continue  # reported, not judged (e.g. max_abs)
            key = (record["component"], record["dtype"], metric)
            badness = value if kind == UPPER else -value
            if key not in worst or badness > worst[key]["badness"]:
                worst[key] = {"badness": badness, "value": value, "bounds": bounds, "record": record,
                              "count": worst.get(key, {}).get("count", 0)}
            worst[key]["count"] += 1
    return worst


def margin(metric: str, value: float, bound: float) -> float:
    """How many times the worst value fits under its bound (similarities: distances from 1)."""
    used, allowed = (value, bound) if direction(metric) == UPPER else (1.0 - value, 1.0 - bound)
    return float("inf") if used <= 0 else allowed / used


def report_lines(worst: dict[tuple, dict], cases: dict[str, str]) -> list[str]:
    lines = [f"{'component':<17} {'dtype':<9} {'metric':<12} {'records':>7} {'worst':>11} {'default':>10} "
             f"{'margin':>7} {'strict':>10} {'margin':>7}  where"]
    for (component, dtype, metric), entry in sorted(worst.items()):
        record, value, bounds = entry["record"], entry["value"], entry["bounds"]
        cells = []
        for profile in ("default", "strict"):
            bound = bounds[profile]
            cells += [f"{bound:>10.3g}", f"{margin(metric, value, bound):>7.2f}"] if bound is not None else ["-", "-"]
        name = (record.get("name") or "").split(".", 1)
        tag, what = (name[0], name[1]) if len(name) == 2 else ("", record.get("name") or "")
        lines.append(f"{component:<17} {dtype:<9} {metric:<12} {entry['count']:>7} {value:>11.4g} {' '.join(cells)}  "
                     f"{record['test'].split('::')[-1]} [{what}] mesh {record.get('mesh')}")
        if tag in cases:
            lines.append(f"{'':<19}{cases[tag]}")
    return lines


def read_cases(directory: Path) -> dict[str, str]:
    cases = {}
    for path in sorted(directory.glob("cases-*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            cases[entry["tag"]] = ", ".join(f"{k}={v}" for k, v in entry["drawn"].items())
    return cases


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drawn_bounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="thorough", help="hypothesis profile (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="pytest -n (default: %(default)s)")
    parser.add_argument("--out", default="out/drawn_bounds", metavar="DIR",
                        help="records.json, run.log and the noted cases go here (default: %(default)s)")
    parser.add_argument("--records", action="append", default=None, metavar="PATH",
                        help="analyse this parity JSON instead of running (its cases-*.jsonl beside it); repeat "
                             "to pool several runs")
    parser.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                        help=f"more pytest arguments (default modules: {' '.join(MODULES)})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.records:
        paths = [Path(p) for p in args.records]
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("cases-*.jsonl"):
            old.unlink()
        records_path = out / "records.json"
        chosen = any(a.endswith(".py") or "::" in a for a in args.pytest_args)
        command = [sys.executable, "-m", "pytest", "-p", "benchmarks.drawn_bounds", "--hypothesis-profile",
                   args.profile, "--parity-json", str(records_path), *(["-n", str(args.workers)] if args.workers
                                                                      else []),
                   *args.pytest_args, *([] if chosen else MODULES)]
        print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(out / "run.log", "w", encoding="utf-8") as log:
            done = subprocess.run(command, cwd=ROOT, env={**os.environ, CASES_ENV: str(out.resolve())},
                                  stdout=log, stderr=subprocess.STDOUT)
        print(f"pytest exit status {done.returncode} after {time.perf_counter() - start:.0f} s; log {out / 'run.log'}",
              file=sys.stderr)
        paths = [records_path]
    records, cases = [], {}
    try:
        for path in paths:
            records += read_json(path, "a --parity-json document", ("records",))["records"]
            cases.update(read_cases(path.parent))
    except InputFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in report_lines(worst_values(records), cases):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
