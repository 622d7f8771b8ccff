"""Benchmarks: scripts that print figures and assert nothing (tests/test_benchmarks.py checks the machinery).

`python -m benchmarks --help`: throughput, decode roofline, compile cost and suite time, as Markdown and JSON.
Modules with their own entry point (`python -m benchmarks.NAME`) measure one more thing each.
"""
