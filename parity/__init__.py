"""Parity engine: metrics, the assertion helpers tests call, and (in parity.plugin) the reporting plugin."""
from parity.check import assert_parity, assert_parity_many
from parity.metrics import compute_metrics

__all__ = ["assert_parity", "assert_parity_many", "compute_metrics"]
