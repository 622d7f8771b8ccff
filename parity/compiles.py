"""pytest plugin: how many XLA programs the run compiled, summed over pytest-xdist workers, in the end-of-run summary.

Every process that runs tests (each xdist worker, or pytest itself without xdist) listens to JAX's monitoring
events from configure on: `/jax/core/compile/backend_compile_duration` fires once per program handed to the
backend, whether XLA compiles it or it is loaded from the persistent compilation cache
(`/jax/compilation_cache/cache_hits`). Programs JAX already holds in memory fire neither. Workers send their
counts to the controller in `workeroutput`, as parity.plugin does with the device info.
"""
from __future__ import annotations

from typing import Any

import pytest

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_KEY = "xla_compilations"


class CompileCounter:
    """Counts this process's backend compilations (disk-cache loads included) and persistent-cache hits."""

    def __init__(self):
        import jax

        self.programs = self.cache_hits = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.programs += 1
            self.seconds += duration

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def counts(self) -> dict[str, float]:
        return {"programs": self.programs, "cache_hits": self.cache_hits, "seconds": round(self.seconds, 3)}

    def close(self) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


def summary_line(per_process: list[dict[str, float]]) -> str:
    """'XLA compilations: 412 programs (300 compiled, 112 loaded from the persistent cache), 95.1 s, 2 workers'."""
    programs = sum(c["programs"] for c in per_process)
    hits = sum(c["cache_hits"] for c in per_process)
    seconds = sum(c["seconds"] for c in per_process)
    where = f", {len(per_process)} workers" if len(per_process) > 1 else ""
    return (f"XLA compilations: {programs} programs ({programs - hits} compiled, {hits} loaded from the persistent "
            f"compilation cache), {seconds:.1f} s{where}")


class _Controller:
    """On the xdist controller: collect the workers' counts and print their sum."""

    def __init__(self):
        self.per_worker: list[dict[str, float]] = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        counts = getattr(node, "workeroutput", {}).get(_KEY)
        if counts:
            self.per_worker.append(counts)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.per_worker:
            terminalreporter.write_line(summary_line(self.per_worker))


class _Runner:
    """In a process that runs tests: count, then report (xdist worker) or print (no xdist)."""

    def __init__(self, config: pytest.Config):
        self.config, self.counter = config, CompileCounter()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[_KEY] = self.counter.counts()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(summary_line([self.counter.counts()]))

    def pytest_unconfigure(self) -> None:
        self.counter.close()


def pytest_configure(config: pytest.Config) -> None:
    """xdist controller: collect; worker or plain pytest: count (after conftest has set the devices up)."""
    if config.option.collectonly:
        return
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Controller(), "xla-compilations")
    else:
        config.pluginmanager.register(_Runner(config), "xla-compilations")
