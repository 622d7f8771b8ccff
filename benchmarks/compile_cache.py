"""Compile cost of the JAX model: a first generation versus the steady state, without and with JAX's
persistent compilation cache (tp_llama.compile_cache).

A process keeps what it compiled in memory, so only a new process shows what a user's next run pays: each
scenario runs in a fresh Python process. 'off': the persistent cache disabled. 'cold': an empty cache
directory (everything compiles and is written). 'warm': the directory 'cold' filled (executables are loaded).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.throughput import CompileCounter, JaxRunner
from llama_spec.config import preset as get_preset
from llama_spec.synthetic import make_weights
from parity.compiles import CACHE_HIT_EVENT
from tp_llama.compile_cache import enable_compilation_cache

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("off", "cold", "warm")


def worker(preset: str, meshes: Sequence[str], dtype: str, batch: int, prompt_len: int, new_tokens: int,
           repeats: int, cache_dir: str | None) -> list[dict]:
    """In a fresh process: per mesh, the first greedy generation (trace, compile or cache load, run) and the
    median of `repeats` more, with the compilations and cache hits JAX reported during the first."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    if cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        enable_compilation_cache(cache_dir)

    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(1) if event == CACHE_HIT_EVENT else None)

    import numpy as np


    config = get_preset(preset)
    weights = make_weights(config, seed=0)
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    counter = CompileCounter()
    rows = []
    for mesh in meshes:
        runner = JaxRunner(config, weights, mesh, dtype)
        compiles, hit_count = counter.count, len(hits)
        first = runner.generate(prompt, new_tokens)
        compiles, hit_count = counter.count - compiles, len(hits) - hit_count
        steady = [runner.generate(prompt, new_tokens) for _ in range(repeats)]
        rows.append({"mesh": mesh, "first_call_s": _seconds(first),
                     "steady_s": statistics.median(_seconds(t) for t in steady),
                     "compiles": compiles, "cache_hits": hit_count})
    return rows


def _seconds(timing) -> float:
    return timing.prefill_s + sum(timing.step_s)


def measure(preset: str, meshes: Sequence[str], dtype: str, batch: int, prompt_len: int, new_tokens: int,
            repeats: int, log: Callable[[str], None] = print) -> list[dict]:
    """Run the three scenarios, each in its own process, sharing one temporary cache directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("TP_LLAMA_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    records = []
    with tempfile.TemporaryDirectory(prefix="tp_llama_compile_cache_") as cache_dir:
        for scenario in SCENARIOS:
            log(f"compile: scenario {scenario} ({', '.join(meshes)}, {preset}, {dtype})")
            spec = dict(preset=preset, meshes=list(meshes), dtype=dtype, batch=batch, prompt_len=prompt_len,
                        new_tokens=new_tokens, repeats=repeats, cache_dir=None if scenario == "off" else cache_dir)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "benchmarks.compile_cache", json.dumps(spec)], cwd=ROOT,
                                  env=env, capture_output=True, text=True)
            process_s = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"compile benchmark worker ({scenario}) exited {done.returncode}:\n"
                                   f"{done.stderr[-3000:]}")
            entries = len(list(Path(cache_dir).glob("*-cache")))
            for row in json.loads(done.stdout.strip().splitlines()[-1]):
                records.append({"scenario": scenario, **row, "process_s": process_s,
                                "cache_entries": entries if scenario != "off" else None})
    return records


if __name__ == "__main__":
    print(json.dumps(worker(**json.loads(sys.argv[1]))))
