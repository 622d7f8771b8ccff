"""Greedy generation with the tensor-parallel model: one prefill, then a jit-compiled decode step.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention and
each row's RoPE positions start at 0 at its first real token.

Command line (synthetic weights unless --checkpoint-dir is given; `python -m reference.generation` takes the same
options and runs Meta's or HF's model instead):

    python -m tp_llama.generate --mesh 1x4 --prompt "The capital of France is" --max-new-tokens 32
"""
from __future__ import annotations

import sys
from typing import Callable, Collection, Sequence

import numpy as np

from llama_spec import generation_cli
from llama_spec.generation import Generation, check_prompts, greedy, left_pad
from llama_spec.host import host
from tp_llama.adapter import TPLlamaAdapter
from tp_llama.convert import meta_to_jax
from tp_llama.model import TPLlama


def greedy_generate(model: TPLlama, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    on_token: Callable[[int, np.ndarray], None] | None = None, *,
                    stop_tokens: Collection[int] | None = None, teacher: Sequence[Sequence[int]] | None = None,
                    start_pos: int = 0) -> Generation:
    """Greedy decoding of every prompt in one batch by the suite's own loop (`llama_spec.generation.greedy`) over
    this model's decode step, so the command line stops as generation parity checks; `on_token(step, tokens)`
    reports progress.

    A row ends at its first token in `stop_tokens` (kept; default Llama 3's `llama_spec.generation.stop_tokens()`);
    decoding ends when every row has ended. `teacher` (teacher forcing): row i feeds teacher[i][t] back at step t
    instead of its argmax while it has one. `start_pos`: RoPE position of each prompt's first token, with nothing
    before it (long-context positions without a long prefix).
    """
    check_prompts(prompts, max_new_tokens, model.config.max_seq_len, model.config.vocab_size, start_pos)
    adapter = TPLlamaAdapter(model, params)
    tokens, pads = left_pad(prompts)

    def step(fed, slot, cache):
        logits, cache = adapter.step(fed, slot, cache, pad=pads, offset=start_pos)
        return host(logits[:, -1]), cache

    cache = model.init_cache(len(prompts), tokens.shape[1] + max_new_tokens)
    return greedy(step, cache, tokens, max_new_tokens, stops=stop_tokens, teacher=teacher, on_token=on_token)


# ---- command line ------------------------------------------------------------------------------

PROG = "python -m tp_llama.generate"


def _parser():
    p = generation_cli.parser(PROG, "Greedy generation with the tensor-parallel Llama 3.1; prints the new text and "
                                    "the token ids (`python -m reference.generation` runs Meta's or HF's model).")
    p.add_argument("--mesh", default="1x4", help="DxM, data x model parallel (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def engine(prompts, config, weights, stops, progress) -> Generation:
        model = TPLlama.on_mesh(config, args.mesh, args.dtype)
        params = model.place(meta_to_jax(weights))
        return greedy_generate(model, params, prompts, args.max_new_tokens, on_token=progress, stop_tokens=stops)

    return generation_cli.main(PROG, args, engine, f"tp_llama {args.mesh}", mesh=args.mesh)


if __name__ == "__main__":
    sys.exit(main())
