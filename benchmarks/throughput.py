"""Prefill and decode throughput of the JAX model (1x1 and 1x4 meshes), HF transformers eager and Meta's
reference, on the same weights and the same prompt.

Every implementation runs greedy generation: one prefill of the whole prompt (logits for every position),
then single-token decode steps, each choosing its token by argmax of the last logits. The JAX model runs the
product's own loop (`tp_llama.generate.greedy_generate`, which also gathers each step's logits to the host);
HF (LlamaForCausalLM, eager attention, a DynamicCache) and Meta (`Transformer.forward` over its own KV cache)
run the same loop written out in PyTorch. One untimed generation per implementation and batch comes first
(JAX compiles there); the timed repeats are interleaved across implementations, so a burst of background
load on a shared machine hits every implementation rather than one.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from benchmarks.bandwidth import decode_bytes_per_step, roofline_tokens_per_s
from llama_spec.config import LlamaConfig
from reference.hf import HFReference
from reference.meta import MetaReference
from tp_llama.convert import meta_to_jax
from tp_llama.generate import greedy_generate
from tp_llama.model import TPLlama

IMPLEMENTATIONS = ("jax 1x1", "jax 1x4", "hf eager", "meta")
# JAX reports every backend compilation (or persistent-cache load) under this monitoring event.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Timing:
    prefill_s: float          # prompt in, first token chosen
    step_s: list[float]       # each decode step, token choice included
    tokens: np.ndarray        # (batch, new tokens) greedy tokens


def _timed(run: Callable[[Callable[[], None]], np.ndarray]) -> Timing:
    """Call run(mark) where `mark()` is called once per chosen token; the marks split prefill from steps."""
    marks = [time.perf_counter()]
    tokens = run(lambda: marks.append(time.perf_counter()))
    gaps = np.diff(marks).tolist()
    return Timing(prefill_s=gaps[0], step_s=gaps[1:], tokens=np.asarray(tokens))


class CompileCounter:
    """Counts JAX backend compilations (persistent-cache loads included): a timed generation should need none."""

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.count += 1

    def close(self) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_event)


class JaxRunner:
    def __init__(self, config: LlamaConfig, weights, mesh: str, dtype: str):
        self.name = f"jax {mesh}"
        self.model = TPLlama.on_mesh(config, mesh, dtype)
        self.params = self.model.place(meta_to_jax(weights))

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Timing:
        prompts = prompt.tolist()
        # No stop tokens: every implementation times the same number of steps.
        return _timed(lambda mark: greedy_generate(self.model, self.params, prompts, new_tokens, stop_tokens=(),
                                                   on_token=lambda step, chosen: mark()).tokens)


class HFRunner:
    name = "hf eager"

    def __init__(self, config: LlamaConfig, weights, dtype: str):
        self.reference = HFReference(config, weights, dtype)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Timing:
        import torch
        import transformers

        model, hf_config = self.reference.model, self.reference.hf_config

        def run(mark):
            cache = transformers.DynamicCache(config=hf_config)
            logits = model(input_ids=torch.from_numpy(prompt.astype(np.int64)), cache=cache, use_cache=True).logits
            return _torch_greedy(lambda token, step: model(input_ids=token, cache=cache, use_cache=True).logits,
                                 logits, new_tokens, mark)

        with torch.inference_mode():
            return _timed(run)


class MetaRunner:
    name = "meta"

    def __init__(self, config: LlamaConfig, weights, dtype: str, max_batch_size: int, max_seq_len: int):
        self.reference = MetaReference(config, weights, dtype, max_batch_size=max_batch_size,
                                       max_seq_len=max_seq_len)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Timing:
        import torch

        model, prompt_len = self.reference.model, prompt.shape[1]

        def run(mark):
            logits = model.forward(torch.from_numpy(prompt.astype(np.int64)), 0)
            return _torch_greedy(lambda token, step: model.forward(token, prompt_len + step), logits, new_tokens,
                                 mark)

        return _timed(run)


def _torch_greedy(step_fn, logits, new_tokens: int, mark) -> np.ndarray:
    """argmax of the last logits, fed back through step_fn(token, step) until new_tokens are chosen."""
    chosen = []
    for step in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(token)
        mark()
        if step < new_tokens - 1:
            logits = step_fn(token, step)
    return np.concatenate([t.numpy() for t in chosen], axis=1)


def build_runners(config: LlamaConfig, weights, dtype: str, names: Sequence[str], max_batch_size: int,
                  max_seq_len: int) -> list:
    runners = []
    for name in names:
        if name.startswith("jax "):
            runners.append(JaxRunner(config, weights, name.split()[1], dtype))
        elif name == "hf eager":
            runners.append(HFRunner(config, weights, dtype))
        elif name == "meta":
            runners.append(MetaRunner(config, weights, dtype, max_batch_size, max_seq_len))
        else:
            raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")
    return runners


def summarize(timings: Sequence[Timing], batch: int, prompt_len: int) -> dict:
    """Medians over repeats: prefill tokens/s (batch x prompt_len per prefill), decode tokens/s (batch per step
    over all steps of a repeat) and the decode step in milliseconds."""
    if not timings or any(not t.step_s for t in timings):
        raise ValueError("summarize needs at least one repeat with at least one decode step")
    return {"prefill_tokens_per_s": statistics.median(batch * prompt_len / t.prefill_s for t in timings),
            "decode_tokens_per_s": statistics.median(batch * len(t.step_s) / sum(t.step_s) for t in timings),
            "decode_step_ms": statistics.median(1000 * sum(t.step_s) / len(t.step_s) for t in timings),
            "repeats": len(timings)}


def measure(config: LlamaConfig, weights, dtypes: Sequence[str], batches: Sequence[int], prompt_len: int,
            new_tokens: int, repeats: int, names: Sequence[str] = IMPLEMENTATIONS,
            log: Callable[[str], None] = print) -> list[dict]:
    """One record per (dtype, batch, implementation): throughput, bytes a decode step must read, the ratio to
    HF eager, token agreement with the first implementation, and JAX compilations per timed generation."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: need at least 2 (the first token comes from the prefill)")
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (max(batches), prompt_len), dtype=np.int32)
    # decode step k attends prompt_len + k + 1 positions, k = 0 .. new_tokens - 2
    mean_context = prompt_len + new_tokens / 2
    counter = CompileCounter()
    records = []
    try:
        for dtype in dtypes:
            log(f"throughput: building {', '.join(names)} at {dtype}")
            runners = build_runners(config, weights, dtype, names, max(batches), prompt_len + new_tokens)
            for batch in batches:
                rows = np.ascontiguousarray(prompt[:batch])
                warm = {}
                for runner in runners:
                    before = counter.count
                    runner.generate(rows, new_tokens)
                    warm[runner.name] = counter.count - before
                timings: dict[str, list[Timing]] = {r.name: [] for r in runners}
                timed_compiles = dict.fromkeys(timings, 0)
                for repeat in range(repeats):
                    log(f"throughput: {dtype} batch {batch} repeat {repeat + 1}/{repeats}")
                    for runner in runners:
                        before = counter.count
                        timings[runner.name].append(runner.generate(rows, new_tokens))
                        timed_compiles[runner.name] += counter.count - before
                records += _records(config, dtype, batch, prompt_len, new_tokens, mean_context, timings, warm,
                                    timed_compiles)
            del runners
            gc.collect()
    finally:
        counter.close()
    return records


def _records(config, dtype, batch, prompt_len, new_tokens, mean_context, timings, warm, timed_compiles
             ) -> list[dict]:
    bytes_per_step = decode_bytes_per_step(config, dtype, batch, mean_context)
    first = next(iter(timings))
    summaries = {name: summarize(runs, batch, prompt_len) for name, runs in timings.items()}
    hf = summaries.get("hf eager")
    records = []
    for name, summary in summaries.items():
        record = {"implementation": name, "dtype": dtype, "batch": batch, "prompt_len": prompt_len,
                  "new_tokens": new_tokens, **summary,
                  "decode_bytes_per_step": bytes_per_step,
                  "decode_vs_hf": summary["decode_tokens_per_s"] / hf["decode_tokens_per_s"] if hf else None,
                  "prefill_vs_hf": summary["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"] if hf else None,
                  "tokens_agree_with": first,
                  "tokens_agree": float(np.mean(timings[name][0].tokens == timings[first][0].tokens))}
        if name.startswith("jax "):
            record.update(compiles_in_warmup=warm[name],
                          compiles_per_timed_generation=timed_compiles[name] / len(timings[name]))
        records.append(record)
    return records


def add_roofline(records: list[dict], gb_per_s: float) -> None:
    """Each record's decode roofline (tokens/s) at `gb_per_s` and the share of it the implementation reached."""
    for record in records:
        roofline = roofline_tokens_per_s(record["decode_bytes_per_step"]["total"], record["batch"], gb_per_s)
        record.update(roofline_gb_per_s=gb_per_s, roofline_decode_tokens_per_s=roofline,
                      roofline_share=record["decode_tokens_per_s"] / roofline)
