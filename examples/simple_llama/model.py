"""A minimal Llama 3.1 in plain jax.numpy, written unlike tp_llama on purpose.

- one device, no shard_map, no Flax: a dict of stacked per-layer weights and `jax.lax.scan` over the layers;
- Hugging Face's RoPE layout: each head's dims are rotated as halves (i, i + head_dim/2), so the query and key
  rows of the Meta checkpoint are permuted once when the weights are loaded (`from_meta`);
- grouped-query attention by reshaping the queries into (kv head, group) instead of repeating keys;
- a KV cache as one (layers, batch, length, kv heads, head_dim) array per side.

Numerics follow Meta's reference where it matters: RMSNorm, RoPE and softmax in float32, matmuls accumulated
in float32 and rounded once to the activation dtype.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
LAYER_WEIGHTS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


def _halves_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta's (heads*head_dim, dim) q/k rows, pairs (2i, 2i+1) per head -> rows (i, i + head_dim/2)."""
    rows, dim = w.shape
    return w.reshape(heads, rows // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def halves_to_interleaved(x: jax.Array) -> jax.Array:
    """(..., head_dim) in the halves layout -> Meta's interleaved layout (what the suite compares)."""
    *lead, hd = x.shape
    return x.reshape(*lead, 2, hd // 2).swapaxes(-1, -2).reshape(*lead, hd)


def from_meta(config, weights: Mapping[str, np.ndarray], dtype) -> dict:
    """Meta checkpoint tensors -> {'embed', 'norm', 'output', 'layers'}; 'layers' maps each name to all layers'
    weights stacked: (n_layers, in, out) for projections, (n_layers, dim) for norms."""
    def layer(i, name):
        if name.endswith("norm"):
            return weights[f"layers.{i}.{name}.weight"]
        group = "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward"
        w = weights[f"layers.{i}.{group}.{name}.weight"]
        if name in ("wq", "wk"):
            w = _halves_rows(w, config.n_heads if name == "wq" else config.n_kv_heads)
        return w.T  # (in, out): x @ w

    stacked = {name: np.stack([layer(i, name) for i in range(config.n_layers)]) for name in LAYER_WEIGHTS}
    tree = {"embed": weights["tok_embeddings.weight"], "norm": weights["norm.weight"],
            "output": weights["output.weight"].T, "layers": stacked}
    return jax.tree.map(lambda w: jnp.asarray(w, dtype), tree)


def inverse_frequencies(config) -> jax.Array:
    """(head_dim/2,) float32, with Llama 3's long-context scaling when the config has one (its rope_scaling)."""
    hd = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    scaling = config.rope_scaling
    if scaling is not None:
        factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
        original = scaling.original_max_position_embeddings
        wavelength = 2 * math.pi / inv
        ramp = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        inv = (1 - ramp) * inv / factor + ramp * inv
    return jnp.asarray(inv, F32)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Halves-layout RoPE of x (batch, seq, heads, head_dim) at positions (seq,), phases in float32."""
    angles = positions.astype(F32)[:, None] * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
    xf = x.astype(F32)
    first, second = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-second, first], axis=-1) * sin).astype(x.dtype)


def _dense(x, w):
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=F32).astype(x.dtype)


def _norm(x, w, eps):
    xf = x.astype(F32)
    return (xf / jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype) * w


def _attend(q, k, v, q_positions, k_positions):
    """q (b, s, kv, group, hd), k/v (b, t, kv, hd); a key is visible to queries at or after its position."""
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=F32) / math.sqrt(q.shape[-1])
    visible = k_positions[None, :] <= q_positions[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=F32).astype(q.dtype)


def run(config, params, tokens, start_pos, cache=None):
    """tokens (b, s) at positions start_pos..; with a cache (k, v) of (layers, b, length, kv, hd), the new keys
    are written at slot start_pos and every earlier slot is attended. Returns (logits float32, new cache or None,
    intermediates in Meta's names and layout)."""
    b, s = tokens.shape
    h, kv, hd, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    positions = start_pos + jnp.arange(s)
    inv_freq = inverse_frequencies(config)
    embedded = params["embed"][tokens]

    def layer(x, scanned):
        w, layer_cache = scanned
        a_in = _norm(x, w["attention_norm"], eps)
        q = rotate(_dense(a_in, w["wq"]).reshape(b, s, h, hd), positions, inv_freq)
        k = rotate(_dense(a_in, w["wk"]).reshape(b, s, kv, hd), positions, inv_freq)
        v = _dense(a_in, w["wv"]).reshape(b, s, kv, hd)
        if layer_cache is None:
            keys, values, key_positions = k, v, positions
        else:
            keys = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k, start_pos, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v, start_pos, axis=1)
            key_positions = jnp.arange(keys.shape[1])
        out = _attend(q.reshape(b, s, kv, h // kv, hd), keys, values, positions, key_positions)
        attn = _dense(out.reshape(b, s, h * hd), w["wo"])
        mid = x + attn
        f_in = _norm(mid, w["ffn_norm"], eps)
        mlp = _dense(jax.nn.silu(_dense(f_in, w["w1"])) * _dense(f_in, w["w3"]), w["w2"])
        y = mid + mlp
        taps = {"attention_norm": a_in, "q_rope": halves_to_interleaved(q), "k_rope": halves_to_interleaved(k),
                "attention_out": attn, "ffn_norm": f_in, "mlp_out": mlp, "block_out": y}
        return y, (taps, None if layer_cache is None else (keys, values))

    x, (taps, new_cache) = jax.lax.scan(layer, embedded, (params["layers"], cache))
    final = _norm(x, params["norm"], eps)
    logits = jnp.einsum("bsd,dv->bsv", final, params["output"], preferred_element_type=F32).astype(x.dtype)
    named = {"embedding": embedded, "final_norm": final}
    for i in range(config.n_layers):
        named.update({f"layers.{i}.{name}": value[i] for name, value in taps.items()})
    return logits.astype(F32), new_cache, named
