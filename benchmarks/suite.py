"""Wall time of the default `pytest -n 2`, cold and with a warm compilation cache, and its slowest tests.

Both runs point $TP_LLAMA_COMPILATION_CACHE at one new temporary directory: the first finds it empty (cold),
the second finds what the first wrote (warm). The cache only fills if the suite enables it (conftest.py calls
tp_llama.compile_cache.enable_compilation_cache); `cache_entries` after the cold run shows whether it did.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SLOWEST = 10
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s+(setup|call|teardown)\s+(\S.*?)\s*$")
_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|error|errors|skipped).*?) =+$")


def command(workers: int) -> list[str]:
    return [sys.executable, "-m", "pytest", "-n", str(workers), f"--durations={SLOWEST}"]


def parse_durations(output: str) -> list[dict]:
    """The --durations table: [{'seconds', 'phase', 'test'}] in the order pytest printed it (slowest first)."""
    rows, inside = [], False
    for line in output.splitlines():
        if "slowest" in line and "durations" in line and line.startswith("="):
            inside = True
            continue
        if inside:
            match = _DURATION.match(line)
            if match:
                rows.append({"seconds": float(match.group(1)), "phase": match.group(2), "test": match.group(3)})
            elif line.startswith("="):
                break
    return rows


def parse_summary(output: str) -> str | None:
    """pytest's closing line without its '=' rule, e.g. '120 passed, 2 skipped in 93.10s (0:01:33)'."""
    found = None
    for line in output.splitlines():
        match = _SUMMARY.match(line.strip())
        if match:
            found = match.group(1)
    return found


def run_once(cache_dir: str, workers: int) -> dict:
    env = {**os.environ, "TP_LLAMA_COMPILATION_CACHE": cache_dir}
    start = time.perf_counter()
    done = subprocess.run(command(workers), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    return {"wall_s": wall, "exit_code": done.returncode, "summary": parse_summary(output),
            "slowest": parse_durations(output), "cache_entries": len(list(Path(cache_dir).glob("*-cache")))}


def measure(workers: int = 2, log: Callable[[str], None] = print) -> dict:
    with tempfile.TemporaryDirectory(prefix="tp_llama_suite_cache_") as cache_dir:
        runs = {}
        for name in ("cold", "warm"):
            log(f"suite: {' '.join(command(workers)[1:])} ({name} compilation cache); takes minutes")
            runs[name] = run_once(cache_dir, workers)
    return {"command": "pytest " + " ".join(command(workers)[3:]), "workers": workers, **runs}
