"""The adapter that lets the conformance suite run examples.simple_llama (see adapters/protocol.py), with every
capability of the protocol:

    pytest --impl examples.simple_llama.adapter:SimpleLlamaAdapter
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from examples.simple_llama import model
from examples.simple_llama.model import CACHE, HEADS, HIDDEN, LOGITS, TOKENS, Layout
from llama_spec.checkpoint import load_checkpoint


class SimpleLlamaAdapter:
    """examples.simple_llama on the mesh it is given: weights placed by model.RULES, programs jitted over them."""

    rules = model.RULES  # a subclass may lay the weights out otherwise (examples/broken does)

    def __init__(self, config, layout: Layout, params, dtype):
        self.config, self.layout, self.params, self.dtype = config, layout, params, jnp.dtype(dtype)
        shard = layout.sharding
        params_in = layout.param_shardings(params)
        run = functools.partial(model.run, config, layout)
        self._logits = jax.jit(lambda p, t, pos, pad: run(p, t, pos, pad)[0],
                               in_shardings=(params_in, shard(TOKENS), shard(TOKENS), shard(P(model.DATA))),
                               out_shardings=shard(LOGITS))
        self._capture = jax.jit(lambda p, t, pos, pad: _logits_and_taps(*run(p, t, pos, pad)))
        self._step = jax.jit(lambda p, t, pos, pad, slot0, cache: run(p, t, pos, pad, slot0, cache)[:2],
                             out_shardings=(shard(LOGITS), (shard(CACHE), shard(CACHE))), donate_argnums=(5,))

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        layout = cls.layout_for(mesh)
        host = model.from_meta(config, weights, layout.kv_copies(config))
        return cls(config, layout, model.place(host, layout, jnp.dtype(dtype)), dtype)

    @classmethod
    def layout_for(cls, mesh) -> Layout:
        return Layout(mesh, cls.rules)

    # ---- forward and decode ------------------------------------------------------------------

    def _fresh(self, tokens, start_pos):
        """tokens, their RoPE positions and no padding, for a fresh sequence starting at start_pos."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return tokens, _positions(tokens.shape, start_pos), jnp.zeros(tokens.shape[0], jnp.int32)

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype, format):
        """A checkpoint directory (format 'meta' or 'hf', either config.json style) through the suite's loader,
        llama_spec.checkpoint, which detects the format itself and hands over Meta-layout weights."""
        config, weights = load_checkpoint(path)
        return cls.build(config, weights, mesh, dtype)

    def forward(self, tokens, start_pos=0, capture=False):
        args = self._fresh(tokens, start_pos)
        if not capture:
            return self._logits(self.params, *args)
        return self._capture(self.params, *args)

    def init_cache(self, batch, length):
        c = self.config
        kv = c.n_kv_heads * self.layout.kv_copies(c)
        shape = (c.n_layers, batch, length, kv, c.head_dim)
        return self._zeros(shape, self.dtype), self._zeros(shape, self.dtype)

    @functools.cached_property
    def _zeros(self):
        return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=self.layout.sharding(CACHE))

    def step(self, tokens, start_pos, cache, *, pad=None, offset=0):
        """Slot s of row i holds RoPE position offset + s - pad[i]; row i's first pad[i] slots are never read."""
        tokens = jnp.asarray(tokens, jnp.int32)
        b, s = tokens.shape
        pad = jnp.zeros(b, jnp.int32) if pad is None else jnp.asarray(pad, jnp.int32)
        positions = offset + start_pos + jnp.arange(s, dtype=jnp.int32)[None, :] - pad[:, None]
        return self._step(self.params, tokens, jnp.maximum(positions, 0), pad, jnp.int32(start_pos), cache)

    # ---- components: each jitted over the same placed weights, inputs pinned like the model's ------

    @functools.cached_property
    def _components(self):
        c, lay = self.config, self.layout
        layer_of = lambda p, i: jax.tree.map(lambda w: w[i], p["layers"])  # noqa: E731 - static i, inside jit

        def norm(p, x, layer, which):
            w = p["norm"] if which == "norm" else layer_of(p, layer)[which]
            return model.rms_norm(lay.pin(x, HIDDEN), w, c.norm_eps)

        def rope(q, k, positions, copies):
            inv = model.inverse_frequencies(c)
            q = model.rotate(lay.pin(model.interleaved_to_halves(q), HEADS), positions, inv)
            k = model.rotate(lay.pin(model.interleaved_to_halves(jnp.repeat(k, copies, axis=2)), HEADS), positions,
                             inv)
            return model.halves_to_interleaved(q), model.halves_to_interleaved(k[:, :, ::copies])

        def attention(p, x, layer, positions, slot0, cache):
            visible = model.visibility(slot0 + jnp.arange(x.shape[1]), cache[0].shape[1], jnp.zeros(x.shape[0],
                                                                                                     jnp.int32))
            out, _, cache = model.attention(c, lay, layer_of(p, layer), lay.pin(x, HIDDEN), positions, visible,
                                            slot0, cache)
            return out, cache

        def feed_forward(p, x, layer):
            return model.feed_forward(lay, layer_of(p, layer), lay.pin(x, HIDDEN))

        def block(p, x, layer, positions):
            visible = model.visibility(jnp.arange(x.shape[1]), x.shape[1], jnp.zeros(x.shape[0], jnp.int32))
            return model.block(c, lay, layer_of(p, layer), lay.pin(x, HIDDEN), positions, visible)[0]

        def head(p, h):
            return model.head(c, lay, p, lay.pin(h, HIDDEN))[1]

        return {"norm": jax.jit(norm, static_argnums=(2, 3)), "rope": jax.jit(rope, static_argnums=(3,)),
                "attention": jax.jit(attention, static_argnums=(2,)),
                "feed_forward": jax.jit(feed_forward, static_argnums=(2,)),
                "block": jax.jit(block, static_argnums=(2,)), "head": jax.jit(head)}

    def _act(self, x):
        return jnp.asarray(x, self.dtype)

    def rms_norm(self, x, layer, which):
        return self._components["norm"](self.params, self._act(x), layer, which)

    def rope(self, q, k, start_pos):
        b, s = np.shape(q)[:2]
        positions = _positions((b, s), start_pos)
        return self._components["rope"](self._act(q), self._act(k), positions, self.layout.kv_copies(self.config))

    def attention(self, chunks, layer, start_pos):
        """Chunks after the first read the cache the earlier ones wrote (slot 0 = RoPE position start_pos)."""
        b = np.shape(chunks[0])[0]
        total = sum(np.shape(x)[1] for x in chunks)
        k, v = self.init_cache(b, total)
        cache, outputs, slot = (k[layer], v[layer]), [], 0
        for x in chunks:
            positions = _positions(np.shape(x)[:2], start_pos + slot)
            out, cache = self._components["attention"](self.params, self._act(x), layer, positions,
                                                       jnp.int32(slot), cache)
            outputs.append(out)
            slot += np.shape(x)[1]
        return outputs

    def feed_forward(self, x, layer):
        return self._components["feed_forward"](self.params, self._act(x), layer)

    def block(self, x, layer, start_pos):
        positions = _positions(np.shape(x)[:2], start_pos)
        return self._components["block"](self.params, self._act(x), layer, positions)

    def head(self, h):
        return self._components["head"](self.params, self._act(h))

    # ---- what the communication and sharding checks read -------------------------------------

    def compiled_forward(self, batch, seq):
        """The program forward(tokens) runs (no capture) for int32 tokens (batch, seq), compiled for the mesh."""
        spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        return self._logits.lower(self.params, spec, spec, jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()

    def parameters(self):
        """Meta names -> placed arrays; the stacked layer weights as 'layers.*.<name>' (see model.meta_parameters)."""
        return model.meta_parameters(self.params)


def _positions(shape, start_pos):
    b, s = shape
    return jnp.broadcast_to(start_pos + jnp.arange(s, dtype=jnp.int32), (b, s))


def _logits_and_taps(logits, _cache, taps):
    return logits, taps
