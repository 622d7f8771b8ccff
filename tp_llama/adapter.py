"""The built-in tensor-parallel model behind the adapter protocol (adapters/protocol.py), with every capability:
the default subject of the suite (`--impl tp_llama.adapter:TPLlamaAdapter`)."""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from llama_spec.checkpoint import load_checkpoint
from llama_spec.config import LlamaConfig
from tp_llama import components
from tp_llama.convert import meta_name_of, meta_to_jax
from tp_llama.model import TPLlama
from tp_llama.shardings import tree_items


class TPLlamaAdapter:
    """tp_llama.model.TPLlama and its placed parameters."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> "TPLlamaAdapter":
        model = TPLlama(config, mesh, dtype)
        return cls(model, model.place(meta_to_jax(weights)))

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> "TPLlamaAdapter":
        """Through the suite's own loader (llama_spec.checkpoint), which detects the format itself."""
        config, weights = load_checkpoint(path)
        return cls.build(config, weights, mesh, dtype)

    # ---- forward and decode ------------------------------------------------------------------

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        return self.model.forward(self.params, tokens, start_pos=start_pos, capture=capture)

    def init_cache(self, batch: int, length: int):
        return self.model.init_cache(batch, length)

    def step(self, tokens, start_pos: int, cache, *, pad=None, offset: int = 0):
        tokens = np.asarray(tokens)
        batch, seq = tokens.shape
        length = cache[0][0].shape[1]
        pad = np.zeros(batch, np.int64) if pad is None else np.asarray(pad, np.int64)
        slots = np.arange(length)
        positions = offset + start_pos + np.arange(seq)[None, :] - pad[:, None]
        valid = (slots[None, :] >= pad[:, None]) & (slots[None, :] < start_pos + seq)
        return self.model.step(self.params, tokens, np.maximum(positions, 0), cache, start_pos, valid)

    # ---- components --------------------------------------------------------------------------

    def embed(self, tokens):
        return components.embed(self.model, self.params, tokens)

    def rms_norm(self, x, layer: int, which: str):
        return components.rms_norm(self.model, self.params, x, layer=layer, which=which)

    def rope(self, q, k, start_pos: int):
        return components.rope(self.model, q, k, start_pos=start_pos)

    def attention(self, chunks, layer: int, start_pos: int):
        return components.attention(self.model, self.params, chunks, layer=layer, start_pos=start_pos)

    def feed_forward(self, x, layer: int):
        return components.feed_forward(self.model, self.params, x, layer=layer)

    def block(self, x, layer: int, start_pos: int):
        return components.block(self.model, self.params, x, layer=layer, start_pos=start_pos)

    def head(self, h):
        return components.head(self.model, self.params, h)

    # ---- what the communication and sharding checks read -------------------------------------

    def compiled_forward(self, batch: int, seq: int):
        tokens = jnp.zeros((batch, seq), jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        return self.model._sharded(False, False).lower(self.params, tokens, slots, jnp.ones((batch, seq), bool),
                                                       slots, None, jnp.int32(0)).compile()

    def parameters(self):
        """Meta names -> placed arrays (JAX kernels are (in, out); wk/wv hold replicated kv heads when the model
        axis exceeds n_kv_heads)."""
        return {meta_name_of(path): array for path, array in tree_items(self.params)}
