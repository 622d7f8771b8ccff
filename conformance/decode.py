"""The decode check shared by the battery's tests: an implementation's prefill plus one-token steps against one
full forward of the same tokens (its own cache-free path)."""
from __future__ import annotations

import numpy as np

from llama_spec.config import preset
from llama_spec.host import host
from llama_spec.synthetic import make_tokens
from parity import assert_parity

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
