"""The kill matrix: every planted deviation of the catalogue (conformance.mutants) against the suite, in child
pytest runs (`pytest --mutant NAME`), with the tests that killed it, the first killer's margin and the diagnosis
of its first failure; cells the catalogue declares below a dtype's resolution show as such.

    python -m conformance.kill_matrix                      # every mutant against the default selection
    python -m conformance.kill_matrix --matrix --markdown out/matrix.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conformance.mutants import BELOW_RESOLUTION, MUTANTS
from parity.check import budget_used

FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
DTYPES = ("float32", "bfloat16")
# The kill matrix's selection: every component module, the decode path and the full forward, against Meta on
# 1x1 (kv grouping is visible only where a device holds several kv heads) and 1x4 (the all-reduces).
MATRIX_SELECTION = ["conformance/test_rmsnorm.py", "conformance/test_rope.py", "conformance/test_attention.py",
                    "conformance/test_mlp.py", "conformance/test_block.py", "conformance/test_kv_cache.py",
                    "conformance/test_logits.py", "--reference", "meta", "--mesh", "1x1", "--mesh", "1x4"]
MIN_MARGIN = 2.0

@dataclasses.dataclass
class Cell:
    """One mutant at one dtype: the tests that failed, the first one's worst failing metric and its margin."""

    killers: list[str]
    elapsed: float
    problem: str = ""
    metric: str = ""
    value: float = math.nan
    bound: float = math.nan
    margin: float = math.nan  # value / bound of the failing metric (budget used), inf for a raised error
    record: str = ""
    diagnosis: str = ""  # the killer's top diagnosis (diagnosis_of)

    @property
    def killed(self) -> bool:
        return bool(self.killers)


def first_killer_margin(document: dict, killer: str) -> tuple[str, float, float, float, str]:
    """(metric, value, bound, margin, record name) of the worst failing metric among the killer test's failing
    records; margin = share of the bound used (value / bound, or distance from 1 for similarities). A record
    failed by an error (NaN, the implementation raised) has margin inf; so has a killer without a failing record,
    which failed an exact assertion (a token stream, a stop-token set: no bound to have a share of)."""
    if not any(r.get("test") == killer and not r.get("passed") for r in document.get("records", [])):
        return ("exact", math.nan, math.nan, math.inf, "an exact assertion, no parity record")
    best = ("", math.nan, math.nan, -1.0, "")
    for record in document.get("records", []):
        if record.get("test") != killer or record.get("passed"):
            continue
        name = record.get("name") or record.get("component")
        if record.get("error") and not record.get("failed_metrics"):
            return ("error", math.nan, math.nan, math.inf, f"{name}: {record['error'][:60]}")
        for metric in record.get("failed_metrics", []):
            value, bound = float(record["metrics"][metric]), float(record["bounds"][metric])
            used = budget_used(metric, value, bound)
            if used > best[3]:
                best = (metric, value, bound, used, name)
    return best


def run_one(name: str, pytest_args: list[str], all_killers: bool,
            dtype: str | None = None) -> tuple[list[str], float, str, list[dict]]:
    """Run pytest with the mutant planted (at `dtype` when given); the killers are the tests that failed, the
    records its parity JSON."""
    with tempfile.TemporaryDirectory() as scratch:
        json_path = Path(scratch) / "parity.json"
        command = [sys.executable, "-m", "pytest", "-q", "-rfE", "--mutant", name, "-p", "no:cacheprovider",
                   "--parity-json", str(json_path), *([] if all_killers else ["-x"]),
                   *(["--dtype", dtype] if dtype else []), *pytest_args]
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.monotonic() - start
        records = json.loads(json_path.read_text())["records"] if json_path.exists() else []
    killers = FAILED_LINE.findall(done.stdout)
    if done.returncode not in (0, 1) or (done.returncode == 1 and not killers):
        return [], elapsed, f"pytest exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", records
    return killers, elapsed, "", records


def diagnosis_of(killer: str, records: list[dict]) -> str:
    """The top diagnosis of the killing test's first diagnosed failing record: its cause, 'no known cause', or
    'not diagnosed' (a failure no check diagnoses: an error raised, a decode or sharding check)."""
    failing = [r for r in records if r["test"] == killer and not r["passed"]]
    diagnosed = [r["diagnosis"] for r in failing if r.get("diagnosis")]
    if not diagnosed:
        return "not diagnosed"
    return diagnosed[0]["cause"] or "no known cause"


def run_cell(name: str, dtype: str, pytest_args: list[str], all_killers: bool) -> Cell:
    killers, elapsed, problem, records = run_one(name, pytest_args, all_killers, dtype)
    cell = Cell(killers, elapsed, problem)
    if killers:
        cell.metric, cell.value, cell.bound, cell.margin, cell.record = first_killer_margin({"records": records},
                                                                                            killers[0])
        cell.diagnosis = diagnosis_of(killers[0], records)
    return cell


def verdict(name: str, dtype: str, cell: Cell) -> str:
    if cell.problem and not cell.killed:
        return "ERROR"
    if not cell.killed:
        return "below-res" if (name, dtype) in BELOW_RESOLUTION else "SURVIVED"
    if cell.margin < MIN_MARGIN:
        return "weak"
    return "killed"


def margin_text(cell: Cell) -> str:
    if not cell.killed:
        return "-"
    if math.isinf(cell.margin):
        return "exact" if cell.metric == "exact" else "error"
    if cell.margin < 0:
        return "?"
    return f"{cell.margin:.3g}x {cell.metric}"


def short_test(nodeid: str) -> str:
    return nodeid.replace("conformance/", "").replace(".py::", "::")


def matrix(names: list[str], dtypes: list[str], pytest_args: list[str], all_killers: bool,
           markdown: str | None, run_exempt: bool = False) -> int:
    print(f"{'mutant':24} {'dtype':9} {'verdict':10} {'margin':>20} {'time':>7}  {'diagnosis':24} "
          "first killer [tensor]", flush=True)
    rows, bad = [], 0
    for name in names:
        for dtype in dtypes:
            if (name, dtype) in BELOW_RESOLUTION and not run_exempt:
                cell = Cell([], 0.0)  # not run: the statement beside the catalogue says why (--run-exempt runs it)
            else:
                cell = run_cell(name, dtype, pytest_args, all_killers)
            v = verdict(name, dtype, cell)
            bad += v in ("SURVIVED", "ERROR", "weak")
            first = (short_test(cell.killers[0]) + (f" [{cell.record}]" if cell.record else "")) if cell.killed \
                else (BELOW_RESOLUTION.get((name, dtype)) or (cell.problem.splitlines()[0] if cell.problem else "-"))
            print(f"{name:24} {dtype:9} {v:10} {margin_text(cell):>20} {cell.elapsed:6.1f}s  "
                  f"{cell.diagnosis or '-':24} {first}", flush=True)
            if cell.problem:
                print(cell.problem, file=sys.stderr)
            rows.append((name, dtype, v, cell, first))
    print(f"{len(rows) - bad} of {len(rows)} cells killed with margin >= {MIN_MARGIN:g}x or below resolution")
    if markdown:
        lines = ["| mutant | dtype | verdict | margin (value / bound) | diagnosis | first killer [tensor] |",
                 "|---|---|---|---|---|---|"]
        for name, dtype, v, cell, first in rows:
            detail = (f"{margin_text(cell)} ({cell.value:.3g} / {cell.bound:.3g})"
                      if cell.killed and cell.margin == cell.margin and not math.isinf(cell.margin) and cell.metric
                      else margin_text(cell))
            lines.append(f"| {name} | {dtype} | {v} | {detail} | {cell.diagnosis or '-'} | {first.replace('|', '/')} |")
        with open(markdown, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        print(f"markdown table: {markdown}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.kill_matrix",
                                     description="Run the suite once per planted bug and report which tests "
                                                 "killed it and the diagnosis of the first kill. Exit 1 when any "
                                                 "bug survives.")
    parser.add_argument("--only", action="append", choices=sorted(MUTANTS), help="mutants to run (repeatable)")
    parser.add_argument("--all-killers", action="store_true",
                        help="run every test per mutant instead of stopping at the first failure")
    parser.add_argument("--matrix", action="store_true",
                        help="mutant x dtype: run each mutant at --dtype float32 and at --dtype bfloat16 (default "
                             "selection: the component modules, test_kv_cache and test_logits against meta on 1x1 "
                             "and 1x4) and print per cell killed / weak (margin < 2x) / SURVIVED / below-res, "
                             "the first killer and its margin (value / bound of its worst failing metric, from "
                             "the run's --parity-json)")
    parser.add_argument("--matrix-dtype", action="append", choices=DTYPES, help="with --matrix: dtypes (repeatable)")
    parser.add_argument("--markdown", metavar="PATH", help="with --matrix: also write the table as Markdown")
    parser.add_argument("--run-exempt", action="store_true",
                        help="with --matrix: also run the cells BELOW_RESOLUTION explains (skipped by default)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the default test selection; "
                                                       "with --matrix: MATRIX_SELECTION)")
    args = parser.parse_args(argv)
    names = args.only or list(MUTANTS)
    if args.matrix:
        return matrix(names, args.matrix_dtype or list(DTYPES), args.pytest_args or MATRIX_SELECTION,
                      args.all_killers, args.markdown, args.run_exempt)
    print(f"{'mutant':24} {'verdict':9} {'time':>7}  {'diagnosis':24} killed by")
    survivors = 0
    for name in names:
        killers, elapsed, problem, records = run_one(name, args.pytest_args, args.all_killers)
        verdict = "killed" if killers else ("ERROR" if problem else "SURVIVED")
        survivors += not killers
        first = killers[0] if killers else (problem.splitlines()[0] if problem else "-")
        more = f" (+{len(killers) - 1} more)" if len(killers) > 1 else ""
        diagnosis = diagnosis_of(killers[0], records) if killers else "-"
        print(f"{name:24} {verdict:9} {elapsed:6.1f}s  {diagnosis:24} {first}{more}", flush=True)
        if problem:
            print(problem, file=sys.stderr)
    print(f"{len(names) - survivors} of {len(names)} planted bugs killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
