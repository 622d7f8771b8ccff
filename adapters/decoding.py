"""Greedy decoding of any implementation through the protocol's Decode capability (adapters/protocol.py).

The suite's decoding loop for the implementation under test, the counterpart of Meta's and HF's own loops
(reference/generation.py), is `llama_spec.generation.greedy`, the loop the built-in model's own generation runs
too: prompts of different lengths are left-padded into one batch (`step(..., pad=)`), one prefill writes every
prompt, then one token per step, argmax of the last position's logits. A row ends by the suite's stop rule
(`llama_spec.generation.ends`: at its first stop token, kept; the stop ids default to
`llama_spec.generation.stop_tokens()`); with a teacher, row i is fed teacher[i][t] at step t instead of its argmax
while it has one. `start_pos` puts each prompt's first token at that RoPE position with nothing before it
(`step(..., offset=)`). `pad` and `offset` are passed only when a run needs them, so an adapter whose step takes
neither still decodes prompts of one length from position 0; `unsupported` says which runs it cannot serve.
"""
from __future__ import annotations

from typing import Collection, Sequence

from adapters import protocol
from llama_spec import generation as rules
from llama_spec.generation import Generation, left_pad
from llama_spec.host import host


def _needs(prompts: Sequence[Sequence[int]], start_pos: int) -> dict[str, str]:
    """The step keywords a run needs -> why."""
    needs = {}
    lengths = sorted({len(p) for p in prompts})
    if len(lengths) > 1:
        needs["pad"] = f"left padding of prompts of different lengths ({', '.join(map(str, lengths))} tokens)"
    if start_pos:
        needs["offset"] = f"a first token at RoPE position {start_pos} with nothing before it"
    return needs


def unsupported(adapter, prompts: Sequence[Sequence[int]], start_pos: int = 0) -> str | None:
    """None when `greedy` can decode these prompts on this adapter, else the 'not checked: ...' reason."""
    missing = protocol.missing(adapter, "decode")
    if missing:
        return missing
    lacking = [f"`{k}` (needed for {why})" for k, why in _needs(prompts, start_pos).items()
               if not protocol.step_accepts(adapter, k)]
    if lacking:
        return f"not checked: {type(adapter).__name__}.step takes no " + " and no ".join(lacking)
    return None


def greedy(adapter, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           stop_tokens: Collection[int] | None = None, teacher: Sequence[Sequence[int]] | None = None,
           start_pos: int = 0) -> Generation:
    """Greedy tokens and step logits of `adapter` over its own KV cache; see the module docstring."""
    reason = unsupported(adapter, prompts, start_pos)
    if reason:
        raise protocol.AdapterError(reason.removeprefix("not checked: "))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token")
    tokens, pads = left_pad(prompts)
    needs = _needs(prompts, start_pos)
    keywords = {**({"pad": pads} if "pad" in needs else {}), **({"offset": start_pos} if "offset" in needs else {})}

    def step(fed, slot, cache):
        logits, cache = adapter.step(fed, slot, cache, **keywords)
        return host(logits[:, -1]), cache

    cache = adapter.init_cache(len(prompts), tokens.shape[1] + max_new_tokens)
    return rules.greedy(step, cache, tokens, max_new_tokens, stops=stop_tokens, teacher=teacher)
