"""pytest plugin: gathers parity records and test outcomes, writes --parity-json, prints a verdict.

Records travel in each TestReport's user_properties, so under pytest-xdist the controller sees every record with
no side channel; device kind, count and seeds come from whichever process already started a JAX backend (the
controller never starts one: on an accelerator it would grab the workers' devices). The --parity-baseline verdict
comes first, so the JSON and HTML carry the final exit status (docs/internals.md#the-pytest-plugin).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.protocol import BUILTIN, describe
from parity import baseline as pb
from parity.check import NOT_CHECKED_KEY, RECORD_KEY
from parity.environment import cpu_info, device_info, json_safe, package_versions
from parity.pooled import pooled_diagnosis
from parity.report import write_report
from parity.summary import not_checked_lines, run_failures, scope_lines, summary_lines

_WORKER_KEY = "parity_devices"
_SEEDS_KEY = "parity_seeds"
_SEEDS = pytest.StashKey[dict]()
_SCOPE = pytest.StashKey[dict]()


def note_seed(config: pytest.Config, name: str, value: Any) -> None:
    """Declare a seed the run used (e.g. of the canonical weights) so the JSON and the report show it."""
    config.stash.setdefault(_SEEDS, {})[name] = value


def note_scope(config: pytest.Config, **fields: Any) -> None:
    """Declare what the run covers, for the JSON environment and the report's scope: the battery's modules
    (`battery`) and the option lists in force (`meshes`, `dtypes`, `references`), defaults included."""
    config.stash.setdefault(_SCOPE, {}).update(fields)


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
        self.not_checked: list[dict[str, Any]] = []
        self.tests: dict[str, dict[str, Any]] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self.devices: list[dict[str, Any]] = []
        self.seeds: dict[str, Any] = {}
        self.start = time.perf_counter()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.wall_time = None
        self.json_path = config.getoption("parity_json", default=None)
        self.report_path = config.getoption("parity_report", default=None)
        self.report_error: str | None = None
        self.baseline_path = config.getoption("parity_baseline", default=None)
        self.update_baseline = bool(config.getoption("parity_update_baseline", default=False))
        self.baseline = self._load_baseline()
        self.gate: pb.GateResult | None = None
        self.baseline_written: int | None = None

    def _load_baseline(self) -> dict[str, Any] | None:
        """The baseline to judge against, read before any test runs so a bad path fails in a second."""
        if self.update_baseline and not self.baseline_path:
            raise pytest.UsageError("--parity-update-baseline needs --parity-baseline PATH: the file to rewrite")
        if not self.baseline_path or self.update_baseline:
            return None
        try:
            return pb.load_baseline(self.baseline_path)
        except pb.BaselineError as exc:
            raise pytest.UsageError(str(exc)) from None

    # ---- collection -------------------------------------------------------------------------------------
    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Each phase's report carries every entry so far; keep only those not seen in an earlier phase."""
        for key, into in ((RECORD_KEY, self.records), (NOT_CHECKED_KEY, self.not_checked)):
            entries = [value for k, value in report.user_properties if k == key]
            seen = self._seen.get((key, report.nodeid), 0)
            into.extend(dict(e) for e in entries[seen:])
            self._seen[key, report.nodeid] = max(seen, len(entries))
        self._outcome(report)
        self._test_not_checked(report)

    def _test_not_checked(self, report: pytest.TestReport) -> None:
        """A test skipped as 'not checked' that noted no tensors of its own counts as one not-checked entry."""
        message = _message(report) if report.skipped and not hasattr(report, "wasxfail") else None
        if not message or not message.startswith("not checked"):
            return
        if any(entry["test"] == report.nodeid for entry in self.not_checked):
            return
        self.not_checked.append({"test": report.nodeid, "component": None, "name": None, "layer": None,
                                 "reference": None, "dtype": None, "mesh": None, "reason": message})

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
        output = getattr(node, "workeroutput", {})
        if output.get(_WORKER_KEY):
            self.devices.append(output[_WORKER_KEY])
        self.seeds.update(output.get(_SEEDS_KEY, {}))

    # ---- output -----------------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        devices = device_info()
        devices = devices or (self.devices[0] if self.devices else None)
        return {
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "implementation": self.implementation(),
            "platform": platform.platform(),
            "versions": package_versions(),
            "devices": devices,
            "cpu": cpu_info(),
            "tolerance_profile": self.config.getoption("tolerance_profile", default=None) or "default",
            **self.config.stash.get(_SCOPE, {}),
            "selection": {"markexpr": self.config.getoption("markexpr", default="") or "",
                          "keyword": self.config.getoption("keyword", default="") or ""},
            "mutant": self.config.getoption("mutant", default=None),
            "checkpoint_dir": self.config.getoption("checkpoint_dir", default=None),
            "seeds": self._seeds(),
            "xdist_workers": getattr(self.config.option, "numprocesses", None) or 0,
            "started_at": self.started_at,
            "wall_time_s": self.wall_time,
        }

    def implementation(self) -> dict[str, Any]:
        """The implementation under test (--impl): its factory, package and version."""
        spec = self.config.getoption("impl", default=None) or BUILTIN
        try:
            return describe(spec)
        except Exception:  # noqa: BLE001 - --impl was validated at configure; reporting must not break a run
            return {"factory": spec, "package": spec.partition(":")[0].split(".")[0], "version": None}

    def _seeds(self) -> dict[str, Any]:
        """Seeds noted by fixtures here or on the workers, and hypothesis's if one was given."""
        seeds = {**self.seeds, **self.config.stash.get(_SEEDS, {})}
        hypothesis_seed = self.config.getoption("hypothesis_seed", default=None)
        if hypothesis_seed is not None:
            seeds["hypothesis"] = hypothesis_seed
        return seeds

    def document(self, exitstatus: int) -> dict[str, Any]:
        return json_safe({"environment": self.environment(), "exitstatus": int(exitstatus),
                          "records": self.records, "not_checked": self.not_checked,
                          "tests": list(self.tests.values()),
                          "pooled_diagnosis": pooled_diagnosis(run_failures(self.records, self.tests.values()))})

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Runs before the terminal summary (the terminal reporter wraps this hook), so the files exist then.

        A baseline regression turns exit status 0 into 1 (tests failed) through session.exitstatus, which is
        what pytest returns. A report that cannot be written must not pass unnoticed: exit status 3.
        """
        self.wall_time = round(time.perf_counter() - self.start, 3)
        document = self.document(exitstatus)
        if self.baseline is not None:
            self.gate = pb.compare(self.baseline, document, self.baseline_path)
            if not self.gate.passed and session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path:
            self._write_report(session, {**document, "exitstatus": int(session.exitstatus)})
        document["exitstatus"] = int(session.exitstatus)
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.json_path, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=1, allow_nan=False)
        if self.update_baseline and session.exitstatus != pytest.ExitCode.INTERRUPTED:
            self.baseline_written = len(pb.write_baseline(self.baseline_path, document)["cases"])

    def _write_report(self, session: pytest.Session, document: dict[str, Any]) -> None:
        try:
            write_report(self.report_path, document, self.gate)
        except Exception as exc:  # noqa: BLE001 - said in the summary and the exit status, not an INTERNALERROR
            self.report_error = f"{type(exc).__name__}: {exc}"
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Every run that ran tests ends with the verdict, the worst case per component and where the report is."""
        if self.config.option.collectonly:
            return
        lines = summary_lines(self.records, list(self.tests.values()), self.json_path, self.gate)
        if self.not_checked:
            lines[4:4] = not_checked_lines(self.not_checked)
        lines[3:3] = scope_lines(self.environment(), self.records, list(self.tests.values()), self.not_checked)
        if self.report_error:
            lines.append(f"parity report NOT written to {self.report_path}: {self.report_error}")
        elif self.report_path:
            lines.append(f"parity report: {self.report_path}")
        else:
            lines.append("parity report: not written (add --parity-report PATH for the HTML report)")
        if self.baseline_written is not None:
            lines.append(f"parity baseline rewritten: {self.baseline_path} ({self.baseline_written} cases)")
        elif self.update_baseline:
            lines.append(f"parity baseline NOT rewritten: the run was interrupted, {self.baseline_path} is unchanged")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """xdist worker: hand the device info of this worker's backend (if it started one) and the seeds its
    fixtures noted to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        info = device_info()
        if info:
            workeroutput[_WORKER_KEY] = info
        workeroutput[_SEEDS_KEY] = dict(session.config.stash.get(_SEEDS, {}))


def pytest_configure(config: pytest.Config) -> None:
    """Register the collector on the controller only; workers just run tests and ship reports."""
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(ParityCollector(config), "parity-collector")
