"""`llama-conformance init-adapter --style linen|nnx|jnp --out PATH`: a commented skeleton adapter to start from.

The skeleton imports and builds as written; every capability is a commented block to fill in, so the doctor
reports each one "missing" until it is written. Its capture table (adapters/capture.py `Taps`) maps the model's
own paths to the suite's intermediate names and converts q/k from HF's rotate-half layout if asked. An existing
file is kept unless `--force`; a usage error is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE_ERROR = 2
STYLES = ("linen", "nnx", "jnp")

HEADER = '''"""Adapter skeleton for the Llama 3.1 conformance suite: {what} (`llama-conformance init-adapter`).

Fill in the blocks marked TODO and uncomment the capabilities your model has, then:

    llama-conformance doctor --impl MODULE:{name}      # seconds: each capability ok / missing / wrong
    pytest -n 2 -rs --impl MODULE:{name}               # the battery; a missing capability ends "not checked"

What `build` receives and what each method returns: the adapter contract (docs/contract.md). Inputs are NumPy;
outputs may be NumPy or jax.Arrays of any sharding, in the dtype `build` was given (logits may be float32).
"""
from __future__ import annotations

import functools  # noqa: F401 - used by the commented capabilities

import jax  # noqa: F401 - used by the commented capabilities
import jax.numpy as jnp
from adapters.capture import {helpers}  # noqa: F401 - used by the commented forward
{imports}
# The model's own paths (dot-joined; `{{i}}` is the layer index) -> the suite's intermediate names. Paths not listed
# are left out and their checks end "not checked". halves_qk=True if your q/k after RoPE are in HF's rotate-half
# layout (pairs (i, i + head_dim/2)); the suite compares Meta's interleaved layout (pairs (2i, 2i+1)).
TAPS = Taps({{
    "{embedding}": "embedding",
    "{layer}.attention_norm": "layers.{{i}}.attention_norm",
    "{layer}.q_rope": "layers.{{i}}.q_rope",
    "{layer}.k_rope": "layers.{{i}}.k_rope",
    "{layer}.attention_out": "layers.{{i}}.attention_out",
    "{layer}.ffn_norm": "layers.{{i}}.ffn_norm",
    "{layer}.mlp_out": "layers.{{i}}.mlp_out",
    "{layer}.block_out": "layers.{{i}}.block_out",
    "{final}": "final_norm",
}}, halves_qk=False)


class {name}:
    """Your model on the mesh the suite gives it."""

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        """config: llama_spec.config.LlamaConfig; weights: {{Meta name: float32 NumPy (out, in)}}, RoPE pairs
        interleaved; mesh: a jax Mesh with axes ('data', 'model'); dtype: 'float32' or 'bfloat16'."""
        adapter = cls()
        adapter.config, adapter.mesh, adapter.dtype = config, mesh, jnp.dtype(dtype)
{build}
        return adapter
'''

BUILD = {
    "linen": """\
        # TODO: your linen module and its variables, each weight placed on `mesh` in `dtype`, e.g.
        # adapter.module = MyLlama(config, dtype=adapter.dtype)
        # adapter.variables = jax.device_put(my_variables(weights), my_shardings(mesh))  # NamedShardings""",
    "nnx": """\
        # TODO: your NNX model, each nnx.Param placed on `mesh` in `dtype` (jax.device_put, a NamedSharding),
        # then split once so that jitted programs take the state as an argument:
        # adapter.graph, adapter.state = nnx.split(MyLlama(config, weights, mesh, adapter.dtype))""",
    "jnp": """\
        # TODO: your parameters as a pytree, each weight placed on `mesh` in `dtype`, e.g.
        # adapter.params = jax.device_put(my_params(weights), my_shardings(mesh))  # NamedShardings""",
}

# How the forward runs the model and collects its intermediates, per style (the commented forward's body).
FORWARD = {
    "linen": """\
    #         # in the module of block i (linen names it layers_i): self.sow('intermediates', 'q_rope', q);
    #         # capture_intermediates also keeps each method's output ('layers_0.__call__')
    #         logits, named = linen_intermediates(self.module, state, tokens, start_pos, taps=TAPS)""",
    "nnx": """\
    #         # in the module of block i (self.layers[i]): self.sow(nnx.Intermediate, 'q_rope', q)
    #         logits, named = nnx_intermediates(nnx.merge(self.graph, state), tokens, start_pos, taps=TAPS)""",
    "jnp": """\
    #         # your model calls recorder.record(f'layers.{i}.q_rope', q) where it computes q after RoPE
    #         recorder = Recorder()
    #         logits = my_forward(state, tokens, start_pos, recorder)
    #         named = TAPS.rename(recorder.taps)""",
}
STATE = {"linen": "self.variables", "nnx": "self.state", "jnp": "self.params"}

CAPABILITIES = '''
    # ---- forward (required): returns logits (batch, seq, vocab); with capture, (logits, {{suite name: tensor}}) --
    # @functools.cached_property
    # def _forward(self):  # jitted once; the placed parameters are its argument, start_pos a traced int
    #     def run(state, tokens, start_pos):
{forward}
    #         return logits, named
    #
    #     return jax.jit(run)
    #
    # def forward(self, tokens, start_pos=0, capture=False):
    #     logits, named = self._forward({state}, jnp.asarray(tokens, jnp.int32), start_pos)
    #     return (logits, named) if capture else logits

    # ---- decode (optional): slot s of row i holds RoPE position offset + s - pad[i] ------------------------
    # def init_cache(self, batch, length):
    #     ...  # an empty KV cache of `length` slots, placed on self.mesh
    #
    # def step(self, tokens, start_pos, cache, *, pad=None, offset=0):
    #     ...  # write tokens into slots start_pos.., attend to every written slot; return (logits, new cache)

    # ---- components (optional, each its own capability); inputs in Meta's layout ---------------------------
    # def embed(self, tokens): ...                     # (batch, seq) int32 -> (batch, seq, dim)
    # def rms_norm(self, x, layer, which): ...         # which: 'attention_norm' | 'ffn_norm' | 'norm'
    # def rope(self, q, k, start_pos): ...             # -> (q, k) rotated, Meta's interleaved layout
    # def attention(self, chunks, layer, start_pos): ...   # -> one output per chunk; later chunks read the cache
    # def feed_forward(self, x, layer): ...            # SwiGLU, no norm, no residual
    # def block(self, x, layer, start_pos): ...        # a whole block, both norms and residuals
    # def head(self, h): ...                           # final norm + output projection -> logits

    # ---- what the communication and sharding checks read (optional) ----------------------------------------
    # def compiled_forward(self, batch, seq):
    #     ...  # the jitted forward lowered for int32 (batch, seq) tokens and compiled: a jax.stages.Compiled
    #
    # def parameters(self):
    #     ...  # {{Meta name ('layers.0.attention.wq.weight', ...): placed jax.Array}}, any orientation

    # ---- loading a checkpoint directory with your own loader (optional, on the factory) --------------------
    # @classmethod
    # def build_from_checkpoint(cls, path, mesh, dtype, format):
    #     ...  # format 'meta' (params.json + consolidated.NN.pth) or 'hf' (config.json + safetensors)
'''

STYLE_PARTS = {
    "linen": {"what": "a Flax linen model", "imports": "from flax import linen as nn  # noqa: F401\n",
              "helpers": "Taps, linen_intermediates", "embedding": "embedding.__call__",
              "layer": "layers_{i}", "final": "norm.__call__"},
    "nnx": {"what": "a Flax NNX model", "imports": "from flax import nnx  # noqa: F401\n",
            "helpers": "Taps, nnx_intermediates", "embedding": "embedding", "layer": "layers.{i}",
            "final": "final_norm"},
    "jnp": {"what": "a plain jax.numpy model", "imports": "",
            "helpers": "Recorder, Taps", "embedding": "embedding", "layer": "layers.{i}",
            "final": "final_norm"},
}


def skeleton(style: str, name: str) -> str:
    """The skeleton's source text for `style` ('linen', 'nnx' or 'jnp'), its factory class called `name`."""
    parts = STYLE_PARTS[style]
    text = HEADER.format(name=name, build=BUILD[style], **parts)
    return text + CAPABILITIES.format(forward=FORWARD[style], state=STATE[style])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-conformance init-adapter", allow_abbrev=False,
        description="Write a commented skeleton adapter for a Flax linen, Flax NNX or jax.numpy Llama.")
    parser.add_argument("--style", choices=STYLES, required=True, help="how your model is written")
    parser.add_argument("--out", metavar="PATH", required=True, help="the Python file to write (e.g. mypkg/adapter.py)")
    parser.add_argument("--name", default="MyLlamaAdapter", help="the factory class's name (default: MyLlamaAdapter)")
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    parser.error = lambda message: sys.exit(_fail(message))  # type: ignore[method-assign]  # one line, not usage
    return parser


def _fail(message: str) -> int:
    print(f"llama-conformance init-adapter: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: Sequence[str]) -> int:
    options = _parser().parse_args(list(argv))
    out = Path(options.out)
    if not options.name.isidentifier():
        return _fail(f"--name {options.name!r} is not a Python identifier; give a class name such as MyLlamaAdapter")
    if out.suffix != ".py":
        return _fail(f"--out {out} must end in .py (the adapter is a Python module)")
    if out.is_dir():
        return _fail(f"--out {out} is a directory; give a file path such as {out / 'adapter.py'}")
    if out.exists() and not options.force:
        return _fail(f"{out} exists; pass --force to overwrite it, or choose another --out")
    if not out.parent.is_dir():
        return _fail(f"the directory {out.parent} does not exist; create it first")
    out.write_text(skeleton(options.style, options.name))
    print(f"wrote {out} ({options.style}); next: llama-conformance doctor --impl MODULE:{options.name}")
    return 0
