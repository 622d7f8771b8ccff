"""Greedy generation with the tensor-parallel model: one prefill, then a jit-compiled decode step.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention and
each row's RoPE positions start at 0 at its first real token.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from tp_llama.model import TPLlama, to_numpy


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]            # new tokens per prompt
    step_logits: list[np.ndarray]      # (batch, vocab) float32 logits that chose each new token


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(batch, longest) int32 tokens and the number of padding slots of each row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    pads = np.array([longest - len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), longest), pad_id, np.int32)
    for row, (prompt, pad) in enumerate(zip(prompts, pads)):
        tokens[row, pad:] = prompt
    return tokens, pads


def greedy_generate(model: TPLlama, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    on_token: Callable[[int, np.ndarray], None] | None = None) -> Generation:
    """Greedy decoding of every prompt in one batch; `on_token(step, tokens)` reports progress."""
    tokens, pads = left_pad(prompts)
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len {model.config.max_seq_len}; shorten the prompt or ask for fewer tokens")
    slots = np.arange(total)
    valid = slots[None, :] >= pads[:, None]                         # (batch, total)
    positions = np.maximum(slots[None, :prompt_len] - pads[:, None], 0)
    cache = model.init_cache(batch, total)
    logits, cache = model.step(params, tokens, positions, cache, 0, valid & (slots < prompt_len))
    new_tokens, step_logits = [], []
    for step in range(max_new_tokens):
        last = to_numpy(logits[:, -1])
        chosen = last.argmax(-1).astype(np.int32)
        new_tokens.append(chosen)
        step_logits.append(last)
        if on_token:
            on_token(step, chosen)
        if step == max_new_tokens - 1:
            break
        slot = prompt_len + step
        pos = (slot - pads)[:, None]
        logits, cache = model.step(params, chosen[:, None], pos, cache, slot, valid & (slots <= slot))
    out = np.stack(new_tokens, axis=1) if new_tokens else np.zeros((batch, 0), np.int32)
    return Generation(tokens=[row.tolist() for row in out], step_logits=step_logits)
