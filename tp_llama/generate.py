"""Greedy generation with the tensor-parallel model: one prefill, then a jit-compiled decode step.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention and
each row's RoPE positions start at 0 at its first real token.

Command line (synthetic weights unless --checkpoint-dir is given; `--reference` runs an oracle instead):

    python -m tp_llama.generate --mesh 1x4 --prompt "The capital of France is" --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Collection, Sequence

import numpy as np

from llama_spec.generation import Generation, check_prompts, greedy, left_pad
from tp_llama.adapter import TPLlamaAdapter
from tp_llama.model import TPLlama, to_numpy


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
        return to_numpy(logits[:, -1]), cache

    cache = model.init_cache(len(prompts), tokens.shape[1] + max_new_tokens)
    return greedy(step, cache, tokens, max_new_tokens, stops=stop_tokens, teacher=teacher, on_token=on_token)


# ---- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Progress:
    """'token k/n, tokens per second' on one rewritten stderr line, for runs long enough to wait on.

    The rate counts decode steps from the first token on, so loading and the prefill do not skew it."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream, self.first = total, stream or sys.stderr, None

    def begin(self, what: str) -> None:
        self.stream.write(f"{what}...\n")
        self.stream.flush()

    def __call__(self, step: int, tokens=None) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        rate = f"  {step / (now - self.first):.1f} tokens/s" if now > self.first else ""
        self.stream.write(f"\rtoken {step + 1}/{self.total}{rate}")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    from llama_spec.config import PRESETS

    p = _Parser(prog="python -m tp_llama.generate",
                description="Greedy generation with the tensor-parallel Llama 3.1 (or a reference); prints the "
                            "new text and the token ids.")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text, encoded with Meta's Llama 3 tokenizer (BOS first); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt (default %(default)s)")
    p.add_argument("--mesh", default="1x4", help="DxM, data x model parallel (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reference", choices=("hf", "meta"), default=None,
                   help="run Hugging Face generate, or Meta's model over its own KV cache, instead of the JAX model")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="real weights: a Meta (params.json, consolidated.*.pth, tokenizer.model) or HF checkpoint; "
                        "without it, synthetic weights")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="synthetic weights: model shape, with the tokenizer's vocabulary (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic weights: seed (default %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress line on stderr (default: when stderr is a terminal)")
    return p


def _simulate_cpu_devices(count: int) -> None:
    """On the CPU platform, expose enough simulated devices for the mesh before JAX starts a backend (a caller
    that already configured more, such as the test suite, is left alone)."""
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        import jax

        if jax.config.jax_num_cpu_devices < count:
            jax.config.update("jax_num_cpu_devices", count)


def _model_and_tokenizer(args):
    """(config, weights loader, Meta tokenizer): the checkpoint's (its weights read lazily), or synthetic weights
    of the preset's shape with the vocabulary of the tokenizer llama-models ships, made only when loaded (after
    the request has been checked)."""
    from llama_spec.tokenizer import meta_tokenizer

    if args.checkpoint_dir is None:
        from fixtures.weights import make_weights
        from llama_spec.config import preset

        tokenizer = meta_tokenizer()
        config = preset(args.preset).replace(vocab_size=tokenizer.n_words)
        return config, lambda: make_weights(config, args.seed), tokenizer
    from llama_spec.checkpoint import load_for_generation

    config, weights, tokenizer = load_for_generation(args.checkpoint_dir)
    if tokenizer is None:  # an HF checkpoint ships none; Llama 3's own fits if the vocabulary is Llama 3's
        tokenizer = meta_tokenizer()
        if tokenizer.n_words != config.vocab_size:
            raise ValueError(f"{args.checkpoint_dir}: no tokenizer.model, and vocab_size={config.vocab_size} is not "
                             f"that of Llama 3's tokenizer ({tokenizer.n_words}); add the checkpoint's tokenizer.model")
    return config, lambda: weights, tokenizer


def _run(args, prompts, config, weights, stops, progress) -> Generation:
    options = dict(on_token=progress, stop_tokens=stops)
    if args.reference == "meta":
        from reference.generation import meta_generate
        from reference.meta import MetaReference

        engine = MetaReference(config, weights, args.dtype, max_batch_size=len(prompts),
                               max_seq_len=max(map(len, prompts)) + args.max_new_tokens)
        return meta_generate(engine, prompts, args.max_new_tokens, **options)
    if args.reference == "hf":
        from reference.generation import hf_generate
        from reference.hf import HFReference

        return hf_generate(HFReference(config, weights, args.dtype), prompts, args.max_new_tokens, **options)
    from tp_llama.convert import meta_to_jax

    model = TPLlama.on_mesh(config, args.mesh, args.dtype)
    params = model.place(meta_to_jax(weights))
    return greedy_generate(model, params, prompts, args.max_new_tokens, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "python -m tp_llama.generate"
    try:
        from tp_llama.shardings import parse_mesh

        data, model_axis = parse_mesh(args.mesh)
        for i, text in enumerate(args.prompt):
            if not text:
                raise ValueError(f"prompt {i} is empty; give some text to continue")
        config, load_weights, tokenizer = _model_and_tokenizer(args)
        prompts = [tokenizer.encode(text, bos=True, eos=False) for text in args.prompt]
        check_prompts(prompts, args.max_new_tokens, config.max_seq_len, config.vocab_size)
        _simulate_cpu_devices(data * model_axis)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        progress = Progress(args.max_new_tokens) if show else None
        if progress:
            progress.begin(f"{args.reference or 'tp_llama ' + args.mesh} {args.dtype}: prefill of "
                           f"{max(map(len, prompts))} tokens, then {args.max_new_tokens} decode steps")
        result = _run(args, prompts, config, load_weights(), tuple(tokenizer.stop_tokens), progress)
        if progress:
            progress.end()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    for text, prompt, new in zip(args.prompt, prompts, result.tokens):
        print(f"prompt: {text!r}")
        print(f"prompt ids ({len(prompt)}): {prompt}")
        print(f"new ids ({len(new)}): {new}")
        print(f"text: {tokenizer.decode(new)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
