"""The adapter that lets the conformance suite run examples.nnx_llama (a Flax NNX model), with every capability:

    llama-conformance doctor --impl examples.nnx_llama.adapter:NNXLlamaAdapter
    pytest -n 2 -rs --impl examples.nnx_llama.adapter:NNXLlamaAdapter

Started from `llama-conformance init-adapter --style nnx`. The model is split once (`nnx.split`) and every program
merges it inside `jax.jit`, so the jitted functions take the placed parameters as arguments and keep no state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from adapters.capture import Taps, nnx_intermediates
from examples.nnx_llama import model
from examples.nnx_llama.model import CACHE, HIDDEN, META, Llama
from llama_spec.checkpoint import load_checkpoint

# The model's sown paths -> the suite's intermediate names (docs/contract.md); q/k are already interleaved.
TAPS = Taps({"embedding": "embedding", "final_norm": "final_norm",
             "layers.{i}.attn_in": "layers.{i}.attention_norm", "layers.{i}.attention.q": "layers.{i}.q_rope",
             "layers.{i}.attention.k": "layers.{i}.k_rope", "layers.{i}.attn_out": "layers.{i}.attention_out",
             "layers.{i}.mlp_in": "layers.{i}.ffn_norm", "layers.{i}.mlp_out": "layers.{i}.mlp_out",
             "layers.{i}.out": "layers.{i}.block_out"}, halves_qk=False)


def _positions(shape, start_pos):
    b, s = shape
    return jnp.broadcast_to(start_pos + jnp.arange(s, dtype=jnp.int32), (b, s))


class NNXLlamaAdapter:
    """examples.nnx_llama.model.Llama built on the mesh it is given."""

    def __init__(self, config, mesh, dtype, llama: Llama):
        self.config, self.mesh, self.dtype = config, mesh, jnp.dtype(dtype)
        self.graph, self.state = nnx.split(llama)
        self.copies = model.kv_copies(config, mesh)

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        return cls(config, mesh, dtype, Llama(config, weights, mesh, jnp.dtype(dtype)))

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype, format):
        """A checkpoint directory ('meta' or 'hf', either config.json style) through llama_spec.checkpoint, which
        detects the format itself and hands over Meta-layout weights."""
        config, weights = load_checkpoint(path)
        return cls.build(config, weights, mesh, dtype)

    def _merged(self, state) -> Llama:
        return nnx.merge(self.graph, state)

    def _sharding(self, spec):
        return NamedSharding(self.mesh, spec)

    # ---- forward and decode ------------------------------------------------------------------

    @functools.cached_property
    def _programs(self):
        def logits(state, tokens, positions, pad):
            return nnx_intermediates(self._merged(state), tokens, positions, pad, taps=TAPS)[0][0]

        def captured(state, tokens, positions, pad):
            (out, _), named = nnx_intermediates(self._merged(state), tokens, positions, pad, taps=TAPS)
            return out, named

        def step(state, tokens, positions, pad, slot0, cache):
            return nnx_intermediates(self._merged(state), tokens, positions, pad, slot0, cache, taps=TAPS)[0]

        cache_sharding = [(self._sharding(CACHE),) * 2] * self.config.n_layers
        return {"logits": jax.jit(logits), "captured": jax.jit(captured),
                "step": jax.jit(step, out_shardings=(self._sharding(model.LOGITS), cache_sharding),
                                donate_argnums=(5,))}

    def _fresh(self, tokens, start_pos):
        tokens = jnp.asarray(tokens, jnp.int32)
        return tokens, _positions(tokens.shape, start_pos), jnp.zeros(tokens.shape[0], jnp.int32)

    def forward(self, tokens, start_pos=0, capture=False):
        program = self._programs["captured" if capture else "logits"]
        return program(self.state, *self._fresh(tokens, start_pos))

    def init_cache(self, batch, length):
        c = self.config
        shape = (batch, length, c.n_kv_heads * self.copies, c.head_dim)
        return [(self._zeros(shape, self.dtype), self._zeros(shape, self.dtype)) for _ in range(c.n_layers)]

    @functools.cached_property
    def _zeros(self):
        return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=self._sharding(CACHE))

    def step(self, tokens, start_pos, cache, *, pad=None, offset=0):
        """Slot s of row i holds RoPE position offset + s - pad[i]; row i's first pad[i] slots are never read."""
        tokens = jnp.asarray(tokens, jnp.int32)
        b, s = tokens.shape
        pad = jnp.zeros(b, jnp.int32) if pad is None else jnp.asarray(pad, jnp.int32)
        positions = offset + start_pos + jnp.arange(s, dtype=jnp.int32)[None, :] - pad[:, None]
        return self._programs["step"](self.state, tokens, jnp.maximum(positions, 0), pad, jnp.int32(start_pos),
                                      cache)

    # ---- components: each jitted over the same placed weights --------------------------------

    @functools.cached_property
    def _components(self):
        def layer(state, i) -> model.Block:
            return self._merged(state).layers[i]

        def norm(state, x, i, which):
            m = self._merged(state)
            module = m.norm if which == "norm" else getattr(m.layers[i], which)
            return module(model.pin(self.mesh, x, HIDDEN))

        def rope(q, k, positions):
            inv = model.inverse_frequencies(self.config)
            return model.rope(q, positions, inv), model.rope(k, positions, inv)

        def attention(state, x, i, positions, slot0, cache):
            visible = model.visibility(slot0 + jnp.arange(x.shape[1]), cache[0].shape[1],
                                       jnp.zeros(x.shape[0], jnp.int32))
            block = layer(state, i)
            out, cache = nnx.capture(block.attention, nnx.Intermediate)(
                model.pin(self.mesh, x, HIDDEN), positions, visible, slot0, cache)[0]
            return out, cache

        def feed_forward(state, x, i):
            return layer(state, i).feed_forward(model.pin(self.mesh, x, HIDDEN))

        def block(state, x, i, positions):
            visible = model.visibility(jnp.arange(x.shape[1]), x.shape[1], jnp.zeros(x.shape[0], jnp.int32))
            return nnx.capture(layer(state, i), nnx.Intermediate)(x, positions, visible)[0][0]

        def head(state, h):
            return nnx.capture(self._merged(state).head, nnx.Intermediate)(h)[0]

        def embed(state, tokens):
            return self._merged(state).lookup(tokens)

        return {"norm": jax.jit(norm, static_argnums=(2, 3)), "rope": jax.jit(rope),
                "attention": jax.jit(attention, static_argnums=(2,)),
                "feed_forward": jax.jit(feed_forward, static_argnums=(2,)),
                "block": jax.jit(block, static_argnums=(2,)), "head": jax.jit(head), "embed": jax.jit(embed)}

    def _act(self, x):
        return jnp.asarray(x, self.dtype)

    def embed(self, tokens):
        return self._components["embed"](self.state, jnp.asarray(tokens, jnp.int32))

    def rms_norm(self, x, layer, which):
        return self._components["norm"](self.state, self._act(x), layer, which)

    def rope(self, q, k, start_pos):
        return self._components["rope"](self._act(q), self._act(k), _positions(np.shape(q)[:2], start_pos))

    def attention(self, chunks, layer, start_pos):
        """Chunks after the first read the cache the earlier ones wrote (slot 0 = RoPE position start_pos)."""
        b = np.shape(chunks[0])[0]
        total = sum(np.shape(x)[1] for x in chunks)
        cache, outputs, slot = self.init_cache(b, total)[layer], [], 0
        for x in chunks:
            positions = _positions(np.shape(x)[:2], start_pos + slot)
            out, cache = self._components["attention"](self.state, self._act(x), layer, positions,
                                                       jnp.int32(slot), cache)
            outputs.append(out)
            slot += np.shape(x)[1]
        return outputs

    def feed_forward(self, x, layer):
        return self._components["feed_forward"](self.state, self._act(x), layer)

    def block(self, x, layer, start_pos):
        return self._components["block"](self.state, self._act(x), layer, _positions(np.shape(x)[:2], start_pos))

    def head(self, h):
        return self._components["head"](self.state, self._act(h))

    # ---- what the communication and sharding checks read -------------------------------------

    def compiled_forward(self, batch, seq):
        """The program forward(tokens) runs (no capture) for int32 tokens (batch, seq), compiled for the mesh."""
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        pad = jax.ShapeDtypeStruct((batch,), jnp.int32)
        return self._programs["logits"].lower(self.state, tokens, tokens, pad).compile()

    def parameters(self):
        """Meta names -> placed arrays, (in, out) orientation; wk/wv hold each kv head `copies` times."""
        m = self._merged(self.state)
        out = {"tok_embeddings.weight": m.embed[...], "norm.weight": m.norm.weight[...],
               "output.weight": m.output[...]}
        for i, block in enumerate(m.layers):
            modules = {"attention_norm": block.attention_norm.weight, "ffn_norm": block.ffn_norm.weight,
                       "wq": block.attention.wq, "wk": block.attention.wk, "wv": block.attention.wv,
                       "wo": block.attention.wo, "w1": block.feed_forward.w1, "w2": block.feed_forward.w2,
                       "w3": block.feed_forward.w3}
            out.update({f"layers.{i}.{META[k]}.weight": v[...] for k, v in modules.items()})
        return out
