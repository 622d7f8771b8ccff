"""pytest plugin: gathers parity records and test outcomes, writes --parity-json, prints a verdict.

Records are read on the controller from each TestReport's user_properties in pytest_runtest_logreport.
Under pytest-xdist the reports (user_properties included) travel from the workers, so the controller sees
every record without any side channel. A report of each phase (setup, call, teardown) carries the whole
user_properties list as it was then, so only records not yet seen for that node id are taken.

Device kind and count: the controller never starts a JAX backend for them (on an accelerator that would
grab the devices the workers need). They come from whichever process already initialised a backend: the
controller itself without xdist, or the xdist workers, which send them in `workeroutput` when they finish.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import sys
import time
from typing import Any

import pytest

from fixtures.tolerances import LOWER, UPPER, direction
from parity.check import RECORD_KEY, budget_used, format_value

VERSIONED = ("jax", "jaxlib", "flax", "torch", "transformers", "llama-models", "fairscale", "tiktoken", "numpy",
             "pytest", "pytest-xdist")
_WORKER_KEY = "parity_devices"


def package_versions(names=VERSIONED) -> dict[str, str | None]:
    """Installed distribution versions, None for those not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any] | None:
    """Backend, device kind and count, only if this process has already initialised a JAX backend."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        from jax._src import xla_bridge  # private, but the only way to ask without initialising

        if not xla_bridge.backends_are_initialized():
            return None
        devices = jax.devices()
        return {"platform": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
                "process_count": jax.process_count()}
    except Exception:  # noqa: BLE001 - environment reporting must never break a run
        return None


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings 'NaN', 'Infinity', '-Infinity'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _message(report: pytest.TestReport) -> str | None:
    """The short reason of a failure or skip: the exception text, or the skip reason."""
    longrepr = report.longrepr
    if longrepr is None:
        return None
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, lineno, 'Skipped: reason')
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    return crash.message if crash is not None else report.longreprtext


class ParityCollector:
    """Per-session state on the controller (or the only process without xdist)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.tests: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, int] = {}
        self.devices: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.wall_time = None
        self.json_path = config.getoption("parity_json", default=None)

    # ---- collection -------------------------------------------------------------------------------------
    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        records = [value for key, value in report.user_properties if key == RECORD_KEY]
        seen = self._seen.get(report.nodeid, 0)
        self.records.extend(dict(r) for r in records[seen:])
        self._seen[report.nodeid] = max(seen, len(records))
        self._outcome(report)

    def _outcome(self, report: pytest.TestReport) -> None:
        """Fold the phase reports of one test into passed / failed / error / skipped / xfailed / xpassed."""
        entry = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                      "message": None})
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                entry["outcome"] = "xfailed" if report.skipped else "xpassed"
                entry["message"] = report.wasxfail or None
            elif report.outcome in ("failed", "skipped"):
                entry["outcome"], entry["message"] = report.outcome, _message(report)
        elif report.failed:  # setup or teardown: an error, unless the test already failed
            if entry["outcome"] != "failed":
                entry["outcome"], entry["message"] = "error", _message(report)
        elif report.skipped:  # skipped (or xfailed) in setup
            entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            entry["message"] = getattr(report, "wasxfail", None) or _message(report)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: keep the device info a worker reported when it finished."""
        info = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if info:
            self.devices.append(info)

    # ---- output -----------------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        devices = device_info()
        devices = devices or (self.devices[0] if self.devices else None)
        return {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "versions": package_versions(),
            "devices": devices,
            "tolerance_profile": self.config.getoption("tolerance_profile", default=None) or "default",
            "xdist_workers": getattr(self.config.option, "numprocesses", None) or 0,
            "started_at": self.started_at,
            "wall_time_s": self.wall_time,
        }

    def document(self, exitstatus: int) -> dict[str, Any]:
        return json_safe({"environment": self.environment(), "exitstatus": int(exitstatus),
                          "records": self.records, "tests": list(self.tests.values())})

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Runs before the terminal summary (the terminal reporter wraps this hook), so the file exists then."""
        self.wall_time = round(time.perf_counter() - self.start, 3)
        if self.json_path:
            with open(self.json_path, "w", encoding="utf-8") as handle:
                json.dump(self.document(exitstatus), handle, indent=1, allow_nan=False)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.records and not self.json_path:
            return
        for line in summary_lines(self.records, list(self.tests.values()), self.json_path):
            terminalreporter.write_line(line)


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


def summary_lines(records: list[dict], tests: list[dict], json_path: str | None) -> list[str]:
    """The terminal summary: verdict, record counts, worst case per component, JSON path."""
    failed_records = [r for r in records if not r["passed"]]
    bad_tests = [t for t in tests if t["outcome"] in ("failed", "error")]
    verdict = "PASS" if not bad_tests else "FAIL"
    lines = ["", "=" * 20 + " parity summary " + "=" * 20,
             f"verdict: {verdict} ({len(bad_tests)} failed/error of {len(tests)} tests)",
             f"records: {len(records) - len(failed_records)} passed, {len(failed_records)} failed"]
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    caught = [r for r in failed_records if outcomes.get(r["test"]) in ("passed", "xfailed")]
    if caught:
        lines.append(f"  ({len(caught)} failed records belong to tests that passed or xfailed, "
                     f"e.g. planted-bug checks)")
    worst = worst_per_component(records)
    if worst:
        lines.append("worst per component (share of bound used; > 1 fails):")
    for component, (used, metric, record) in sorted(worst.items()):
        label = record["test"] + (f" [{record['name']}]" if record.get("name") else "")
        value, bound = format_value(metric, record["metrics"][metric]), format_value(metric, record["bounds"][metric])
        lines.append(f"  {component:<14} {metric} = {value} (bound {bound}, {used:.3g}x)  {label}")
    for record in [r for r in failed_records if r.get("error")][:5]:
        lines.append(f"  error in {record['test']} [{record.get('name')}]: {record['error'].splitlines()[0]}")
    if json_path:
        lines.append(f"parity JSON: {json_path}")
    return lines


@pytest.hookimpl
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """xdist worker: hand the device info of this worker's backend (if it started one) to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        info = device_info()
        if info:
            workeroutput[_WORKER_KEY] = info


def pytest_configure(config: pytest.Config) -> None:
    """Register the collector on the controller only; workers just run tests and ship reports."""
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(ParityCollector(config), "parity-collector")
