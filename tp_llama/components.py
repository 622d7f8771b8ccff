"""Single components of the tensor-parallel model run in isolation on its mesh, for layer-by-layer checks.

Each function feeds the given (replicated) input through the same Flax module the full model uses, inside
the same shard_map, with the layer's parameters sharded by the contract. Inputs are cast to the model's
dtype; outputs come back gathered as float32 NumPy arrays.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_spec.host import host
from tp_llama import layers
from tp_llama.model import Attention, Block, FeedForward, RMSNorm, TPLlama, VocabParallelEmbed, shared_program
from tp_llama.shardings import ACTIVATION_AXES, kv_replication, param_specs, replicate_kv_heads, spec

HIDDEN = spec(ACTIVATION_AXES["hidden"])
TOKENS = spec(ACTIVATION_AXES["tokens"])


def _run(model: TPLlama, key: tuple, local_fn, in_specs, out_specs, *args):
    """Run `local_fn` in shard_map on the model's mesh, jitted once per config, mesh, dtype and `key` (the component
    and what its closure holds besides the model: tp_llama.model.shared_program), so repeated calls, and models
    built again on the same config, reuse the traced program."""
    program = shared_program(model, ("component", *key), lambda: jax.jit(
        jax.shard_map(local_fn, mesh=model.mesh, in_specs=in_specs, out_specs=out_specs)))
    return program(*args)


def _layer(params, layer: int):
    return params[f"layers_{layer}"]


def _rope_tables(model: TPLlama, positions):
    c = model.config
    return layers.rope_angles(positions, layers.rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))


def _positions(batch: int, seq: int, start_pos: int) -> np.ndarray:
    """Host-side (NumPy) like every index input here: eager jnp ops would compile a program per new shape."""
    return np.broadcast_to(start_pos + np.arange(seq, dtype=np.int32), (batch, seq))


def embed(model: TPLlama, params, tokens) -> np.ndarray:
    """The vocab-parallel embedding lookup: each model shard looks up its rows of the vocabulary, then one
    all-reduce sums the shards' partial results."""
    module = VocabParallelEmbed(model.dims)
    out = _run(model, ("embed",), lambda w, t: module.apply({"params": w}, t, model.dtype),
               (param_specs(model.config)["tok_embeddings"], TOKENS), HIDDEN, params["tok_embeddings"],
               np.asarray(tokens, np.int32))
    return host(out)


def rms_norm(model: TPLlama, params, x, layer: int = 0, which: str = "attention_norm") -> np.ndarray:
    """One of the layer's RMSNorms (or the final 'norm' with which='norm')."""
    weights = params["norm"] if which == "norm" else _layer(params, layer)[which]
    module = RMSNorm(model.config.dim, model.config.norm_eps)
    out = _run(model, ("rms_norm",), lambda w, h: module.apply({"params": w}, h),
               (param_specs(model.config)["norm"], HIDDEN), HIDDEN, weights, jnp.asarray(x, model.dtype))
    return host(out)


def rope(model: TPLlama, q, k, start_pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RoPE on q (B,S,H,hd) and k (B,S,KV,hd), heads sharded over the model axis as in attention."""
    copies = kv_replication(model.config, model.model_parallel)
    b, s, kv, hd = np.shape(k)
    k_wide = replicate_kv_heads(np.asarray(k).reshape(b * s, kv * hd), hd, copies).reshape(b, s, kv * copies, hd)

    def local(q, k, positions):
        cos, sin = _rope_tables(model, positions)
        return layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)

    heads = spec(ACTIVATION_AXES["q_heads"])
    q_out, k_out = _run(model, ("rope",), local, (heads, heads, TOKENS), (heads, heads),
                        jnp.asarray(q, model.dtype), jnp.asarray(k_wide, model.dtype), _positions(b, s, start_pos))
    return host(q_out), host(k_out)[:, :, ::copies]


def attention(model: TPLlama, params, x_chunks: Sequence, layer: int = 0, start_pos: int = 0) -> list[np.ndarray]:
    """The layer's attention over consecutive chunks; chunks after the first read the KV cache.

    The first token sits at RoPE position start_pos and cache slot 0, with no earlier context.
    """
    b = np.shape(x_chunks[0])[0]
    total = sum(np.shape(x)[1] for x in x_chunks)
    module = Attention(model.dims)
    cache_spec = spec(ACTIVATION_AXES["kv_cache"])
    layer_specs = param_specs(model.config)[f"layers_{layer}"]["attention"]

    def local(w, x, positions, valid, slots, cache, index):
        cos, sin = _rope_tables(model, positions)
        return module.apply({"params": w}, x, cos, sin, layers.causal_mask(slots, valid), cache, index)

    cache = model.init_cache(b, total)[layer]
    outputs, slot = [], 0
    for x in x_chunks:
        s = np.shape(x)[1]
        valid = np.broadcast_to(np.arange(total) < slot + s, (b, total))
        out, cache = _run(model, ("attention", layer), local,
                          (layer_specs, HIDDEN, TOKENS, TOKENS, TOKENS, (cache_spec, cache_spec), spec(())),
                          (HIDDEN, (cache_spec, cache_spec)),
                          _layer(params, layer)["attention"], jnp.asarray(x, model.dtype),
                          _positions(b, s, start_pos + slot), valid, _positions(b, s, slot), cache, np.int32(slot))
        outputs.append(host(out))
        slot += s
    return outputs


def feed_forward(model: TPLlama, params, x, layer: int = 0) -> np.ndarray:
    module = FeedForward(model.dims)
    out = _run(model, ("feed_forward", layer), lambda w, h: module.apply({"params": w}, h),
               (param_specs(model.config)[f"layers_{layer}"]["feed_forward"], HIDDEN), HIDDEN,
               _layer(params, layer)["feed_forward"], jnp.asarray(x, model.dtype))
    return host(out)


def block(model: TPLlama, params, x, layer: int = 0, start_pos: int = 0) -> np.ndarray:
    """One transformer block on a fresh sequence at positions start_pos.. (no cache)."""
    b, s = np.shape(x)[:2]
    module = Block(model.dims)

    def local(w, h, positions):
        cos, sin = _rope_tables(model, positions)
        slots = jnp.broadcast_to(jnp.arange(positions.shape[1], dtype=jnp.int32), positions.shape)
        return module.apply({"params": w}, h, cos, sin, layers.causal_mask(slots, jnp.ones(positions.shape, bool)))[0]

    out = _run(model, ("block", layer), local, (param_specs(model.config)[f"layers_{layer}"], HIDDEN, TOKENS),
               HIDDEN, _layer(params, layer), jnp.asarray(x, model.dtype), _positions(b, s, start_pos))
    return host(out)


def head(model: TPLlama, params, h) -> np.ndarray:
    """The final norm and the vocab-parallel output projection, logits gathered."""
    config = model.config
    norm = RMSNorm(config.dim, config.norm_eps)

    def local(norm_w, out_w, x):
        return layers.linear(norm.apply({"params": norm_w}, x), out_w["kernel"]).astype(jnp.float32)

    specs = param_specs(config)
    out = _run(model, ("head",), local, (specs["norm"], specs["output"], HIDDEN),
               spec(ACTIVATION_AXES["logits"]), params["norm"], params["output"], jnp.asarray(h, model.dtype))
    return host(out)
