"""Greedy generation by the references, each with its own decoding loop, for generation parity.

Meta: `MetaReference.forward` over Meta's own KV cache, driven in the order of `Llama3.generate` at temperature 0
(which itself cannot be imported without torchvision). HF: `LlamaForCausalLM.generate(do_sample=False)` on
left-padded prompts. Both return `llama_spec.generation.Generation`, the type the model under test returns, and
stop by each reference's own rule, which conformance/test_stop_tokens.py compares with the suite's. `start_pos`
shifts every prompt's positions with nothing before it: docs/internals.md#greedy-generation-by-the-references.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from llama_spec import generation_cli
from llama_spec.generation import Generation, check_prompts, left_pad
from llama_spec.tokenizer import meta_tokenizer
from reference.hf import HFReference
from reference.meta import MetaReference, freqs_cis
from reference.torch_utils import to_numpy


def meta_stop_tokens() -> tuple[int, ...]:
    """The ids at which Meta's `Llama3.generate` ends a row (end of text, end of message, end of turn), for the
    tokenizer llama-models ships; a checkpoint with its own tokenizer passes that one's `stop_tokens`."""
    return tuple(int(t) for t in meta_tokenizer().stop_tokens)


def hf_stop_tokens(directory) -> tuple[int, ...]:
    """The ids at which transformers' `generate` ends a row for the checkpoint in `directory`: `eos_token_id` of
    `GenerationConfig.from_pretrained(directory)` (its generation_config.json), as a tuple (one id or a list)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(directory).eos_token_id
    return tuple(int(t) for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos))


def _limits(reference) -> tuple[int, int]:
    """(max_seq_len, vocab_size) of a reference, from the suite's config or, for one built by `from_checkpoint`
    (config None), from what its own library read."""
    if reference.config is not None:
        return reference.config.max_seq_len, reference.config.vocab_size
    if isinstance(reference, HFReference):
        return reference.hf_config.max_position_embeddings, reference.hf_config.vocab_size
    return reference.model.params.max_seq_len, reference.model.params.vocab_size


def _truncate(row: list[int], stops: Sequence[int], limit: int) -> list[int]:
    """A row's new tokens up to and including its first stop token, at most `limit`."""
    row = row[:limit]
    for i, token in enumerate(row):
        if token in stops:
            return row[:i + 1]
    return row


def _check_teacher(teacher, prompts) -> None:
    """One teacher row per prompt, or no teacher."""
    if teacher is not None and len(teacher) != len(prompts):
        raise ValueError(f"teacher has {len(teacher)} rows for {len(prompts)} prompts; give one per prompt")


@contextlib.contextmanager
def _meta_rope_from(reference: MetaReference, start_pos: int):
    """Meta's model with cache slot s at RoPE position start_pos + s (its own table, sliced); restored on exit."""
    model, config = reference.model, reference.config
    original = model.freqs_cis
    if start_pos:
        model.freqs_cis = freqs_cis(config, start_pos + 2 * reference.max_seq_len)[start_pos:]
    try:
        yield
    finally:
        model.freqs_cis = original


@contextlib.contextmanager
def _hf_rope_from(reference: HFReference, start_pos: int):
    """HF's model with every position id shifted by start_pos inside its rotary embedding; restored on exit."""
    rotary = reference.model.model.rotary_emb
    if start_pos:
        original = rotary.forward
        rotary.forward = lambda x, position_ids: original(x, position_ids + start_pos)
    try:
        yield
    finally:
        if start_pos:
            del rotary.forward  # back to the class's method


def meta_generate(reference: MetaReference, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  on_token: Callable[[int], None] | None = None, start_pos: int = 0,
                  teacher: Sequence[Sequence[int]] | None = None,
                  stop_tokens: Collection[int] | None = None) -> Generation:
    """Greedy tokens and step logits from Meta's model over its own KV cache, in `Llama3.generate`'s order.

    Each row keeps cache slots 0.. (Meta's right-padded layout). The first call is
    `forward(tokens[:, :shortest], 0)`; each later call feeds the column at `cur - 1` with `start_pos = cur - 1`,
    which holds a prompt token for rows whose prompt is not used up and the row's previous argmax otherwise
    (Meta's `torch.where(input_text_mask[:, cur_pos], ...)`). `on_token(step)` reports the new tokens of the
    longest prompt (progress display).
    `teacher` (teacher forcing): row i takes teacher[i][t] at step t instead of its argmax while it has one.
    """
    check_prompts(prompts, max_new_tokens, *_limits(reference), start_pos)
    if len(prompts) > reference.max_batch_size:
        raise ValueError(f"{len(prompts)} prompts exceed the Meta reference's max_batch_size "
                         f"{reference.max_batch_size}; build MetaReference with a larger one")
    lengths = np.array([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    if total > reference.max_seq_len:
        raise ValueError(f"longest prompt plus max_new_tokens = {total} slots exceed the Meta reference's KV cache "
                         f"({reference.max_seq_len}); build MetaReference with max_seq_len >= {total}")
    _check_teacher(teacher, prompts)
    tokens = np.zeros((len(prompts), total), np.int64)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
    in_prompt = np.arange(total)[None, :] < lengths[:, None]
    forced = np.zeros((len(prompts), total), bool)
    for i, row in enumerate(teacher or ()):
        row = list(row)[:max_new_tokens]
        tokens[i, len(prompts[i]):len(prompts[i]) + len(row)] = row
        forced[i, len(prompts[i]):len(prompts[i]) + len(row)] = True
    stops = set(meta_stop_tokens() if stop_tokens is None else stop_tokens)
    rows: list[list[int]] = [[] for _ in prompts]
    logits_of: list[list[np.ndarray]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    reference.reset_cache()
    prev, longest = 0, int(lengths.max())
    with _meta_rope_from(reference, start_pos):
        for cur in range(int(lengths.min()), total):
            last = reference.forward(tokens[:, prev:cur], prev)[:, -1]
            chosen = np.where(in_prompt[:, cur] | forced[:, cur], tokens[:, cur], last.argmax(-1))
            tokens[:, cur] = chosen
            for i in np.flatnonzero(~in_prompt[:, cur] & ~done):
                rows[i].append(int(chosen[i]))
                logits_of[i].append(last[i])
                done[i] = chosen[i] in stops or len(rows[i]) == max_new_tokens
            if on_token and cur >= longest:
                on_token(cur - longest)
            if done.all():
                break
            prev = cur
    zeros = np.zeros(_limits(reference)[1], np.float32)
    step_logits = [np.stack([row[step] if step < len(row) else zeros for row in logits_of])
                   for step in range(max(map(len, rows)))]
    return Generation(tokens=rows, step_logits=step_logits)


def hf_generate(reference: HFReference, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                on_token: Callable[[int], None] | None = None, start_pos: int = 0,
                teacher: Sequence[Sequence[int]] | None = None, stop_tokens: Collection[int] | None = None,
                pad_id: int = 0, own_generation_config: bool = False) -> Generation:
    """Greedy tokens and step logits from HF `generate(do_sample=False)`, stopping at Meta's stop tokens, or with
    `own_generation_config` at the model's own: no eos_token_id is passed, so `generate` stops at the
    `eos_token_id` of `model.generation_config` (what `from_pretrained` read from generation_config.json).

    Prompts are left-padded with `pad_id` (masked out; it must be a valid id, since HF still embeds it).
    `on_token(step)` is called at every step, from a logits processor. `teacher` (teacher forcing): a logits
    processor leaves only teacher[i][t] selectable for row i at step t while it has one; `output_logits` are
    HF's raw logits, taken before any processor.
    """
    from transformers import LogitsProcessorList

    check_prompts(prompts, max_new_tokens, *_limits(reference), start_pos)
    tokens, pads = left_pad(prompts, pad_id)
    mask = np.arange(tokens.shape[1])[None, :] >= pads[:, None]
    _check_teacher(teacher, prompts)
    if own_generation_config:
        if stop_tokens is not None:
            raise ValueError("give stop_tokens or own_generation_config, not both")
        eos = reference.model.generation_config.eos_token_id
        stops = sorted({int(t) for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos)})
        stop_option = {}
    else:
        stops = sorted(set(meta_stop_tokens() if stop_tokens is None else stop_tokens))
        stop_option = {"eos_token_id": list(stops) or None}

    def force(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the teacher's token is the only finite score of its row."""
        step, scores = input_ids.shape[1] - tokens.shape[1], scores.clone()
        for i, row in enumerate(teacher):
            if step < min(len(row), max_new_tokens):
                scores[i] = torch.where(torch.arange(scores.shape[1]) == row[step], 0.0, -torch.inf)
        return scores

    def report(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        on_token(input_ids.shape[1] - tokens.shape[1])
        return scores

    processors = ([force] if teacher is not None else []) + ([report] if on_token else [])
    with torch.inference_mode(), _hf_rope_from(reference, start_pos):
        out = reference.model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
            **stop_option, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList(processors),
            output_logits=True, return_dict_in_generate=True)
    rows = [_truncate(row, stops, max_new_tokens) for row in out.sequences[:, tokens.shape[1]:].tolist()]
    return Generation(tokens=rows, step_logits=[to_numpy(step) for step in out.logits])


# ---- command line ------------------------------------------------------------------------------

PROG = "python -m reference.generation"


def main(argv: Sequence[str] | None = None) -> int:
    """The references' side of `python -m tp_llama.generate`: the same options and output, Meta's or HF's model."""
    p = generation_cli.parser(PROG, "Greedy generation with a reference (Meta's model over its own KV cache, or "
                                    "Hugging Face generate); prints the new text and the token ids.")
    p.add_argument("--reference", choices=("hf", "meta"), required=True, help="which reference runs")
    args = p.parse_args(argv)

    def engine(prompts, config, weights, stops, progress) -> Generation:
        options = dict(on_token=progress, stop_tokens=stops)
        if args.reference == "meta":
            meta = MetaReference(config, weights, args.dtype, max_batch_size=len(prompts),
                                 max_seq_len=max(map(len, prompts)) + args.max_new_tokens)
            return meta_generate(meta, prompts, args.max_new_tokens, **options)
        return hf_generate(HFReference(config, weights, args.dtype), prompts, args.max_new_tokens, **options)

    return generation_cli.main(PROG, args, engine, args.reference)


if __name__ == "__main__":
    sys.exit(main())
