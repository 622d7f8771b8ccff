"""The adapter that lets the conformance suite run examples.simple_llama (see adapters/protocol.py):

    pytest conformance/test_impl.py --impl examples.simple_llama.adapter:SimpleLlamaAdapter
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from examples.simple_llama import model


class SimpleLlamaAdapter:
    """Unsharded: the mesh is accepted and ignored; every process computes the whole model on its own device."""

    def __init__(self, config, params, dtype):
        self.config, self.params, self.dtype = config, params, jnp.dtype(dtype)
        self._run = jax.jit(functools.partial(model.run, config))

    @classmethod
    def build(cls, config, weights, mesh, dtype):
        return cls(config, model.from_meta(config, weights, dtype), dtype)

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype, format):
        """A checkpoint directory (format 'meta' or 'hf', either config.json style) through the suite's loader,
        llama_spec.checkpoint, which detects the format itself and hands over Meta-layout weights."""
        from llama_spec.checkpoint import load_checkpoint

        config, weights = load_checkpoint(path)
        return cls.build(config, weights, mesh, dtype)

    def forward(self, tokens, start_pos=0, capture=False):
        logits, _, named = self._run(self.params, jnp.asarray(tokens, jnp.int32), start_pos)
        return (logits, named) if capture else logits

    def init_cache(self, batch, length):
        c = self.config
        shape = (c.n_layers, batch, length, c.n_kv_heads, c.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def step(self, tokens, start_pos, cache):
        logits, cache, _ = self._run(self.params, jnp.asarray(tokens, jnp.int32), start_pos, cache)
        return logits, cache
