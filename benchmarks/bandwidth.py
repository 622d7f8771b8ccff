"""This machine's memory bandwidth and the decode roofline it implies.

A decode step must stream every weight once (whatever the batch) plus each sequence's KV cache, so at batch B
no implementation can exceed B * bandwidth / bytes-per-step tokens per second. The bandwidth is measured
here, in the same run, on arrays far larger than any cache: a NumPy copy (read + write, counted as two
streams, STREAM's convention) and a NumPy sum (read only), on one thread and on one thread per core. The
roofline uses the fastest median of those kernels over every measurement of the run (before and after the
throughput section, since background load on a shared machine comes and goes): the most this machine was
seen to stream.
"""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llama_spec.config import LlamaConfig
from llama_spec.synthetic import meta_weight_shapes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _kernels(src: np.ndarray, dst: np.ndarray, threads: int):
    """name -> (function streaming its share of the arrays, bytes moved per call)."""
    chunks = [slice(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(src.size), threads)]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def run(work):
        if pool is None:
            work(slice(None))
        else:
            list(pool.map(work, chunks))

    def copy():
        run(lambda s: np.copyto(dst[s], src[s]))

    def total():
        run(lambda s: src[s].sum())

    return pool, {f"copy, {threads} thread(s)": (copy, 2 * src.nbytes),
                  f"sum, {threads} thread(s)": (total, src.nbytes)}


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Median GB/s (1e9 bytes per second) of each kernel over `repeats` timed calls after one warm-up, and
    the roofline bandwidth `gb_per_s` (the fastest median)."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"nbytes={nbytes}, repeats={repeats}: need at least one float32 and one repeat")
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    kernels = {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        pool, named = _kernels(src, dst, threads)
        try:
            for name, (fn, moved) in named.items():
                fn()  # warm-up: page faults and thread start-up
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn()
                    seconds.append(time.perf_counter() - start)
                kernels[name] = moved / statistics.median(seconds) / 1e9
        finally:
            if pool is not None:
                pool.shutdown()
    return {"array_bytes": src.nbytes, "repeats": repeats, "kernels_gb_per_s": kernels,
            "gb_per_s": max(kernels.values())}


def combine(runs: list[dict]) -> dict:
    """Several measurements of one run, and the roofline bandwidth: the fastest kernel median of any."""
    if not runs:
        raise ValueError("combine needs at least one bandwidth measurement")
    return {"runs": runs, "gb_per_s": max(run["gb_per_s"] for run in runs)}


def decode_bytes_per_step(config: LlamaConfig, dtype: str, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step must read, by part, for `batch` sequences attending `context` cached positions.

    - weights: every parameter of the checkpoint (all layers, norms, the output projection) except the token
      embedding table, at `dtype`;
    - embedding_rows: one embedding row per sequence (the lookup reads only the new token's row);
    - kv_cache: keys and values of every layer for `context` positions per sequence.
    Activations are ignored (kilobytes per token).
    """
    try:
        width = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPE_BYTES)}") from None
    shapes = meta_weight_shapes(config)
    weights = sum(int(np.prod(s)) for name, s in shapes.items() if name != "tok_embeddings.weight")
    kv_per_position = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    parts = {"weights": weights * width,
             "embedding_rows": batch * config.dim * width,
             "kv_cache": batch * kv_per_position * context * width}
    parts["total"] = sum(parts.values())
    return parts


def roofline_tokens_per_s(bytes_per_step: float, batch: int, gb_per_s: float) -> float:
    """Upper bound on decode tokens/s: `batch` tokens per step, a step no faster than its bytes allow."""
    if bytes_per_step <= 0 or gb_per_s <= 0:
        raise ValueError(f"bytes_per_step={bytes_per_step}, gb_per_s={gb_per_s}: both must be positive")
    return batch * gb_per_s * 1e9 / bytes_per_step
