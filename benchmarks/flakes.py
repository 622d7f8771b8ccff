"""`python -m benchmarks.flakes`: run the suite N times, count failures per test, keep every run's log.

    python -m benchmarks.flakes                                  # the default `pytest -n 2`, 5 runs
    python -m benchmarks.flakes --runs 3 --load 6 -- conformance/test_properties.py conformance/test_metamorphic.py
    python -m benchmarks.flakes --ci                             # as CI runs it: CI=true, the derandomized `ci` profile
    python -m benchmarks.flakes --fresh-cache                    # run 1 cold, the rest warm, in a new cache directory

One run proves nothing about a flaky test, so this runs the same pytest command `--runs` times (`--load K` busy
processes beside them: a loaded machine is where the flakes showed) and prints, per test that ever failed, in how
many runs it failed and its first message; exit status 1 unless every run passed (docs/internals.md#flakes).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.suite import parse_summary

ROOT = Path(__file__).resolve().parents[1]
# One core's worth of work that never touches memory much: what another engineer's job looks like to us.
_BUSY = "import math\nx = 0.5\nwhile True:\n    x = math.sin(x) + 1.0\n"
_FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+?)(?: - (.*))?$")
_COMPILES = re.compile(r"^XLA compilations: .*$", re.M)
BAD = ("failed", "error")


def pytest_command(workers: int, json_path: Path, pytest_args: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-rfE", "--parity-json", str(json_path)]
    if workers:
        command += ["-n", str(workers)]
    return command + list(pytest_args)


def start_load(processes: int) -> list[subprocess.Popen]:
    """`processes` busy Python loops in their own process group each, at normal priority."""
    return [subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(processes)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for proc in load:
        proc.kill()
    for proc in load:
        proc.wait()


def outcomes_from_json(path: Path) -> dict[str, dict] | None:
    """nodeid -> {"outcome", "message"} from a parity JSON's `tests`; None if the run wrote none."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {t["nodeid"]: {"outcome": t["outcome"], "message": t.get("message")} for t in document.get("tests", [])}


def failures_from_log(output: str) -> dict[str, dict]:
    """The FAILED / ERROR lines of pytest's short summary (-rfE): what is left when no JSON was written."""
    found = {}
    for line in output.splitlines():
        match = _FAILED_LINE.match(line.strip())
        if match:
            found[match.group(2)] = {"outcome": "failed" if match.group(1) == "FAILED" else "error",
                                     "message": match.group(3)}
    return found


def code_version() -> str:
    """The commit the run tests, with '+dirty' when the working tree differs from it (the code may change
    between runs of a long stress run; each run says which it tested)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_once(index: int, out: Path, workers: int, pytest_args: Sequence[str], env: dict) -> dict:
    log_path, json_path = out / f"run-{index}.log", out / f"run-{index}.json"
    command = pytest_command(workers, json_path, pytest_args)
    load_before, version = os.getloadavg(), code_version()
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    output = log_path.read_text(encoding="utf-8", errors="replace")
    tests = outcomes_from_json(json_path)
    failed = ({k: v for k, v in tests.items() if v["outcome"] in BAD} if tests is not None
              else failures_from_log(output))
    compiles = _COMPILES.search(output)
    return {"run": index, "code": version, "exit_code": done.returncode, "wall_s": round(wall, 1),
            "summary": parse_summary(output), "tests": None if tests is None else len(tests), "failed": failed,
            "xla_compilations": compiles.group(0) if compiles else None,
            "load_average": {"start": [round(x, 2) for x in load_before],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "log": str(log_path), "json": str(json_path) if tests is not None else None}


def tally(runs: list[dict]) -> dict[str, dict]:
    """Per test that failed in any run: the runs it failed in and its first message."""
    per_test: dict[str, dict] = {}
    for run in runs:
        for nodeid, failure in run["failed"].items():
            entry = per_test.setdefault(nodeid, {"runs": [], "message": failure["message"]})
            entry["runs"].append(run["run"])
    return dict(sorted(per_test.items(), key=lambda item: (-len(item[1]["runs"]), item[0])))


def report_lines(runs: list[dict], per_test: dict[str, dict], load: int) -> list[str]:
    bad_runs = sum(1 for r in runs if r["exit_code"] != 0)
    lines = [f"flakes: {len(runs)} runs, {bad_runs} failed; {len(per_test)} tests failed at least once "
             f"(parallel load: {load} busy processes)"]
    for run in runs:
        load_avg = run["load_average"]["end"][0]
        lines.append(f"  run {run['run']} ({run.get('code', '?')}): exit {run['exit_code']}, {run['wall_s']:.0f} s, "
                     f"load {load_avg:.1f}, "
                     f"{run['summary'] or 'no pytest summary'}")
        if run["xla_compilations"]:
            lines.append(f"         {run['xla_compilations']}")
    if per_test:
        lines.append("failures per test:")
    for nodeid, entry in per_test.items():
        lines.append(f"  {len(entry['runs'])}/{len(runs)}  {nodeid}  (runs {', '.join(map(str, entry['runs']))})")
        if entry["message"]:
            lines.append(f"        {entry['message'].splitlines()[0][:200]}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flakes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, metavar="N", help="how many runs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="pytest-xdist workers, -n (default: %(default)s; 0 runs without xdist)")
    parser.add_argument("--load", type=int, default=0, metavar="K",
                        help="busy processes to run beside the suite, a parallel CPU load (default: none)")
    parser.add_argument("--ci", action="store_true",
                        help="run with CI=true (the derandomized `ci` hypothesis profile); else CI is unset (`dev`)")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="point $TP_LLAMA_COMPILATION_CACHE at a new directory under --out: run 1 starts cold, "
                             "later runs find what it wrote (warm), as `python -m benchmarks --only suite` measures")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the logs go (default: out/flakes/<date-time>)")
    parser.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                        help="passed to pytest after `--` (default: the default selection)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0 or args.workers < 0:
        parser.error("--runs needs at least 1; --load and --workers cannot be negative")
    return args


def main(argv=None, log: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "out" / "flakes" / stamp
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.fresh_cache:
        env["TP_LLAMA_COMPILATION_CACHE"] = str((out / "compilation_cache").resolve())
    if args.ci:
        env["CI"] = "true"
    else:
        env.pop("CI", None)
    load = start_load(args.load)
    runs: list[dict] = []

    def write_summary() -> dict[str, dict]:
        """summary.json after every run, so a stress run stopped early keeps what it measured."""
        per_test = tally(runs)
        summary = {"command": pytest_command(args.workers, out / "run-K.json", args.pytest_args)[1:],
                   "ci": args.ci, "fresh_cache": args.fresh_cache, "load_processes": args.load,
                   "cpu_count": os.cpu_count(), "runs": runs, "failures_per_test": per_test}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return per_test

    try:
        for index in range(1, args.runs + 1):
            shown = " ".join(pytest_command(args.workers, out / f"run-{index}.json", args.pytest_args)[3:])
            log(f"flakes: run {index}/{args.runs}: pytest {shown} (log {out / f'run-{index}.log'})")
            runs.append(run_once(index, out, args.workers, args.pytest_args, env))
            failed = runs[-1]["failed"]
            log(f"flakes: run {index}: {runs[-1]['summary']}; {runs[-1]['wall_s']:.0f} s"
                + (f"; failed: {', '.join(failed)}" if failed else ""))
            write_summary()
    finally:
        stop_load(load)
    per_test = write_summary()
    for line in report_lines(runs, per_test, args.load):
        log(line)
    log(f"flakes: logs and summary.json in {out}")
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
