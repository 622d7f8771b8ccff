"""The decode checks shared by the battery's tests: an implementation's prefill plus one-token steps against one
full forward of the same tokens (its own cache-free path), and prompts decoded in one left-padded batch against
each decoded alone."""
from __future__ import annotations

import numpy as np

from adapters import decoding
from llama_spec.config import preset
from llama_spec.host import host
from llama_spec.synthetic import make_tokens
from parity import assert_parity, assert_parity_many

# Prefill slots 0..15 at positions 8176..8191, then decode steps at 8192..8199: past Llama 3.1's original context.
PAST_8192 = 8192 - 16


TOKENS = make_tokens(preset("tiny"), 2, 24, seed=3)


def check_kv_cache(request, adapter, dtype, mesh, start_pos=0, prefill_len=16):
    """Logits of every position of TOKENS from a prefill of prefill_len then one-token steps, against one forward
    of them at positions start_pos.."""
    __tracebackhide__ = True
    tokens, total = TOKENS, TOKENS.shape[1]
    full = host(adapter.forward(tokens, start_pos=start_pos))
    keywords = {"offset": start_pos} if start_pos else {}
    cache = adapter.init_cache(2, total)
    logits, cache = adapter.step(tokens[:, :prefill_len], 0, cache, **keywords)
    stepped = [host(logits)]
    for slot in range(prefill_len, total):
        logits, cache = adapter.step(tokens[:, slot:slot + 1], slot, cache, **keywords)
        stepped.append(host(logits))
    assert_parity(request, component="kv_cache", name=f"logits, prefill {prefill_len} then steps from position "
                  f"{start_pos}", actual=np.concatenate(stepped, axis=1), expected=full, reference="self",
                  dtype=dtype, mesh=mesh, logits=True)


def batched_prompts(config) -> list[list[int]]:
    """Three prompts of different lengths (9, 3 and 14 tokens), so a batch of them needs left padding."""
    return [make_tokens(config, 1, n, seed=n)[0].tolist() for n in (9, 3, 14)]


def check_batched_prompts(request, adapter, prompts, dtype, mesh, start_pos=0, new_tokens=6):
    """Prompts decoded together (adapters.decoding.greedy, left-padded) against each decoded alone. Every row's
    step logits are recorded before any token is compared, so a batch that goes wrong (NaN, say) leaves a failed
    record per row, not only a token mismatch."""
    __tracebackhide__ = True
    together = decoding.greedy(adapter, prompts, new_tokens, start_pos=start_pos)
    alone = [decoding.greedy(adapter, [prompt], new_tokens, start_pos=start_pos) for prompt in prompts]
    whats = [f"prompt {row} ({len(prompt)} tokens) from position {start_pos}" for row, prompt in enumerate(prompts)]
    assert_parity_many(request, component="kv_cache", reference="self", dtype=dtype, mesh=mesh, logits=True,
                       actual={f"{what}, batched against alone": np.stack([s[row] for s in together.step_logits])
                               for row, what in enumerate(whats)},
                       expected={f"{what}, batched against alone": np.stack([s[0] for s in one.step_logits])
                                 for what, one in zip(whats, alone)})
    for what, tokens, one in zip(whats, together.tokens, alone):
        assert tokens == one.tokens[0], f"{what} decodes differently in a batch: {tokens} vs {one.tokens[0]}"
