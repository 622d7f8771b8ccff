"""pytest plugin: gathers parity records and test outcomes, writes --parity-json, prints a verdict.

Records are read on the controller from each TestReport's user_properties in pytest_runtest_logreport.
Under pytest-xdist the reports (user_properties included) travel from the workers, so the controller sees
every record without any side channel. A report of each phase (setup, call, teardown) carries the whole
user_properties list as it was then, so only records not yet seen for that node id are taken.

Device kind and count: the controller never starts a JAX backend for them (on an accelerator that would
grab the devices the workers need). They come from whichever process already initialised a backend: the
controller itself without xdist, or the xdist workers, which send them in `workeroutput` when they finish.
Seeds that fixtures declare with `note_seed` travel the same way.

At the end the controller judges the run against --parity-baseline (parity.baseline), which can turn a
green run red, and only then writes --parity-json and the --parity-report HTML, so both carry the final
exit status.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pytest

from fixtures.tolerances import LOWER, UPPER, direction
from parity import baseline as pb
from parity.check import NOT_CHECKED_KEY, RECORD_KEY, budget_used, format_value
from parity.pooled import pooled_diagnosis

VERSIONED = ("jax", "jaxlib", "flax", "torch", "transformers", "llama-models", "fairscale", "tiktoken", "numpy",
             "pytest", "pytest-xdist")
_WORKER_KEY = "parity_devices"
_SEEDS_KEY = "parity_seeds"
_SEEDS = pytest.StashKey[dict]()


def note_seed(config: pytest.Config, name: str, value: Any) -> None:
    """Declare a seed the run used (e.g. of the canonical weights) so the JSON and the report show it."""
    config.stash.setdefault(_SEEDS, {})[name] = value


def package_versions(names=VERSIONED) -> dict[str, str | None]:
    """Installed distribution versions, None for those not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# The CPU features that change which kernels XLA and torch pick, and so the last bits of a result: a baseline's
# metric values hold only on a CPU with the same ones (parity/baseline.py).
NUMERIC_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                     "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")  # the last six: aarch64's "Features" line


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine type and its numerically relevant CPU flags (None where /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"machine": platform.machine(), "flags": None}
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
    have = set(line.partition(":")[2].split())
    return {"machine": platform.machine(), "flags": [f for f in NUMERIC_CPU_FLAGS if f in have]}


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
            "seeds": self._seeds(),
            "xdist_workers": getattr(self.config.option, "numprocesses", None) or 0,
            "started_at": self.started_at,
            "wall_time_s": self.wall_time,
        }

    def implementation(self) -> dict[str, Any]:
        """The implementation under test (--impl): its factory, package and version."""
        from adapters.protocol import BUILTIN, describe

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
        from parity.report import write_report

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
    from parity.report import probable_causes

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
