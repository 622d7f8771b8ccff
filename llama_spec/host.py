"""Bringing a result to the host, the same way for every side: the built-in model, any adapter, the suite.

A jax.Array sharded over devices of other processes (a multi-process run) is gathered with a collective, so every
process must call these for the same array at the same point; anything else is copied from its devices.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
    """The full value of `x` on this host, in its own dtype."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def host(x) -> np.ndarray:
    """The full value of `x` on this host as float32 (bfloat16 widened exactly), or its integer type."""
    x = to_host(x)
    return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x
