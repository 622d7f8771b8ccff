"""What greedy generation means, for the model under test and the references alike: the result of a run, the
stop rule, the requests no engine can serve, the left padding of prompts of different lengths into one batch, and
the one greedy decoding loop (`greedy`) that the suite drives any implementation with (adapters/decoding.py) and
the built-in model's own generation runs (tp_llama/generate.py), so both stop by this rule.

The stop rule is the suite's own statement of the published one (Llama 3.1 model card and chat format): a row
ends at the first of end of text, end of message or end of turn, and that token is kept. The references define
it for themselves (llama-models' `Tokenizer.stop_tokens`, `eos_token_id` of HF's generation_config.json);
conformance/test_stop_tokens.py compares this statement with both and runs streams that end at each id.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Sequence

import numpy as np


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]            # new tokens per prompt, up to and including its first stop token
    step_logits: list[np.ndarray]      # (batch, vocab) float32 logits that chose each new token


# Llama 3's stop tokens by name (ids of the Llama 3 tokenizer's special tokens).
STOP_TOKENS: dict[str, int] = {"<|end_of_text|>": 128001, "<|eom_id|>": 128008, "<|eot_id|>": 128009}


def stop_tokens() -> tuple[int, ...]:
    """The ids at which a greedy row ends, ascending."""
    return tuple(sorted(STOP_TOKENS.values()))


def ends(row: Sequence[int], stops: Collection[int]) -> bool:
    """Whether a row of new tokens is complete: its last token is a stop token (kept in the row). A decoding loop
    asks this after appending each token and feeds the row no further once it holds."""
    return bool(row) and int(row[-1]) in stops


# A decode step: (tokens (batch, seq) written at cache slot `slot`, cache) -> (the last position's logits on the
# host as (batch, vocab) float32, new cache).
Step = Callable[[np.ndarray, int, Any], tuple[np.ndarray, Any]]


def greedy(step: Step, cache, tokens: np.ndarray, max_new_tokens: int, *,
           stops: Collection[int] | None = None, teacher: Sequence[Sequence[int]] | None = None,
           on_token: Callable[[int, np.ndarray], None] | None = None) -> Generation:
    """Greedy decoding of a batch of left-padded prompts `tokens` (see `left_pad`) through `step`: one prefill,
    then one token per step, the argmax of the last position's logits.

    A row ends by `ends` at the ids `stops` (default `stop_tokens()`); decoding ends when every row has ended, or
    after max_new_tokens. `teacher` (teacher forcing): row i feeds teacher[i][t] at step t instead of its argmax
    while it has one, so step_logits are the logits after the teacher's tokens. `on_token(step, chosen)` reports
    each step's fed tokens (progress display).
    """
    batch, prompt_len = tokens.shape
    if teacher is not None and len(teacher) != batch:
        raise ValueError(f"teacher has {len(teacher)} rows for {batch} prompts; give one per prompt")
    stop_set = set(int(t) for t in (stop_tokens() if stops is None else stops))
    last, cache = step(tokens, 0, cache)
    rows: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    step_logits = []
    for index in range(max_new_tokens):
        chosen = last.argmax(-1).astype(np.int32)
        for i in range(batch):
            if teacher is not None and index < len(teacher[i]):
                chosen[i] = teacher[i][index]
            if not done[i]:
                rows[i].append(int(chosen[i]))
                done[i] = ends(rows[i], stop_set)
        step_logits.append(last)
        if on_token:
            on_token(index, chosen)
        if index == max_new_tokens - 1 or done.all():
            break
        last, cache = step(chosen[:, None], prompt_len + index, cache)
    return Generation(tokens=rows, step_logits=step_logits)


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int,
                  vocab_size: int | None = None, start_pos: int = 0) -> None:
    """Raise a one-line ValueError for a request no engine can serve (shared by the model and the references).

    The last position used is start_pos + longest prompt + max_new_tokens - 1; it must stay below max_seq_len.
    """
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(prompt) > max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than max_seq_len {max_seq_len}; "
                             f"shorten it")
        if vocab_size is not None:
            bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                                 f"encode it with the model's tokenizer")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token")
    if start_pos < 0:
        raise ValueError(f"start_pos={start_pos} must not be negative")
    longest = max(len(p) for p in prompts)
    end = start_pos + longest + max_new_tokens
    if end > max_seq_len:
        first = f"start_pos ({start_pos}) plus prompt" if start_pos else "prompt"
        raise ValueError(f"{first} ({longest} tokens) plus max_new_tokens ({max_new_tokens}) = {end} exceeds "
                         f"max_seq_len {max_seq_len}; shorten the prompt or ask for at most "
                         f"{max(max_seq_len - start_pos - longest, 0)} new tokens")


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
