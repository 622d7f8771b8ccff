"""What the generation commands share: their options, prompts and weights, progress line, output and errors.

`python -m tp_llama.generate` (the built-in model) and `python -m reference.generation` (Meta's model or HF's
`generate`) take the same prompts and weights and print the same four lines per prompt, so their outputs can be
compared line by line; each brings only its own engine (`run`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

from llama_spec.checkpoint import load_for_generation
from llama_spec.config import PRESETS, LlamaConfig, preset
from llama_spec.generation import Generation, check_prompts
from llama_spec.layout import parse_mesh
from llama_spec.synthetic import make_weights
from llama_spec.tokenizer import meta_tokenizer


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Progress:
    """'token k/n, tokens per second' on one rewritten stderr line, for runs long enough to wait on.

    The rate counts decode steps from the first token on, so loading and the prefill do not skew it."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.first: float | None = None

    def begin(self, what: str) -> None:
        self.stream.write(f"{what}...\n")
        self.stream.flush()

    def __call__(self, step: int, tokens=None) -> None:
        now = time.perf_counter()
        first = self.first = now if self.first is None else self.first
        rate = f"  {step / (now - first):.1f} tokens/s" if now > first else ""
        self.stream.write(f"\rtoken {step + 1}/{self.total}{rate}")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every generation command takes; a command adds its own engine's options."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text, encoded with Meta's Llama 3 tokenizer (BOS first); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="real weights: a Meta (params.json, consolidated.*.pth, tokenizer.model) or HF checkpoint; "
                        "without it, synthetic weights")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="synthetic weights: model shape, with the tokenizer's vocabulary (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic weights: seed (default %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress line on stderr (default: when stderr is a terminal)")
    return p


def simulate_cpu_devices(count: int) -> None:
    """On the CPU platform, expose enough simulated devices for the mesh before JAX starts a backend (a caller
    that already configured more, such as the test suite, is left alone)."""
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        import jax  # only a command that runs a mesh pays for it

        if jax.config.jax_num_cpu_devices < count:
            jax.config.update("jax_num_cpu_devices", count)


def model_and_tokenizer(args):
    """(config, weights loader, Meta tokenizer): the checkpoint's (its weights read lazily), or synthetic weights
    of the preset's shape with the vocabulary of the tokenizer llama-models ships, made only when loaded (after
    the request has been checked)."""
    if args.checkpoint_dir is None:
        tokenizer = meta_tokenizer()
        config = preset(args.preset).replace(vocab_size=tokenizer.n_words)
        return config, lambda: make_weights(config, args.seed), tokenizer
    config, weights, tokenizer = load_for_generation(args.checkpoint_dir)
    if tokenizer is None:  # an HF checkpoint ships none; Llama 3's own fits if the vocabulary is Llama 3's
        tokenizer = meta_tokenizer()
        if tokenizer.n_words != config.vocab_size:
            raise ValueError(f"{args.checkpoint_dir}: no tokenizer.model, and vocab_size={config.vocab_size} is not "
                             f"that of Llama 3's tokenizer ({tokenizer.n_words}); add the checkpoint's tokenizer.model")
    return config, lambda: weights, tokenizer


Engine = Callable[[list[list[int]], LlamaConfig, dict, tuple[int, ...], "Progress | None"], Generation]


def main(prog: str, args, engine: Engine, what: str, mesh: str | None = None) -> int:
    """Check the request, run `engine(prompts, config, weights, stop tokens, progress)`, print per prompt its
    text, ids, new ids and new text. A bad request or file is one line on stderr and exit status 2."""
    try:
        if mesh is not None:
            data, model_axis = parse_mesh(mesh)
        for i, text in enumerate(args.prompt):
            if not text:
                raise ValueError(f"prompt {i} is empty; give some text to continue")
        config, load_weights, tokenizer = model_and_tokenizer(args)
        prompts = [tokenizer.encode(text, bos=True, eos=False) for text in args.prompt]
        check_prompts(prompts, args.max_new_tokens, config.max_seq_len, config.vocab_size)
        if mesh is not None:
            simulate_cpu_devices(data * model_axis)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        progress = Progress(args.max_new_tokens) if show else None
        if progress:
            progress.begin(f"{what} {args.dtype}: prefill of {max(map(len, prompts))} tokens, then "
                           f"{args.max_new_tokens} decode steps")
        result = engine(prompts, config, load_weights(), tuple(tokenizer.stop_tokens), progress)
        if progress:
            progress.end()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print_result(args.prompt, prompts, result, tokenizer)
    return 0


def print_result(texts: Sequence[str], prompts, result: Generation, tokenizer) -> None:
    for text, prompt, new in zip(texts, prompts, result.tokens):
        print(f"prompt: {text!r}")
        print(f"prompt ids ({len(prompt)}): {prompt}")
        print(f"new ids ({len(new)}): {new}")
        print(f"text: {tokenizer.decode(new)!r}")
