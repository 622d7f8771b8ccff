"""An independent float64 NumPy Llama 3 forward: exact math to compare every implementation against.

No torch, no jax; written from the model's definition, not from either reference's code. Weights are the
Meta layout (Linear weights (out, in), interleaved RoPE pairs (2i, 2i+1)); everything is computed in float64
and returned as float64.

Positions: a call covers a sequence of tokens at consecutive positions, attended causally by index.
- `oracle_forward(config, weights, tokens, start_pos)` puts tokens at start_pos, start_pos+1, ... with no
  earlier context (what HF computes when handed position_ids without a cache);
- `oracle_forward(..., start_pos=P, prefix_tokens=prefix)` with prefix (B, P) runs prefix + tokens as one
  sequence from position 0 and returns only the last S positions (what a KV-cache decode computes).
- the component functions `oracle_rope/attention/block` take `start_pos` as the position of the first token,
  with no earlier context; `oracle_attention` concatenates its chunks into one sequence.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from reference.layers import intermediate_names, layer_weights


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---- pieces ------------------------------------------------------------------------------------


def rms_norm(x, weight, eps: float) -> np.ndarray:
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * _f64(weight)


def rope_frequencies(head_dim: int, theta: float, scaling) -> np.ndarray:
    """Angular frequency of each rotated pair, (head_dim/2,), with Llama 3's scaling when `scaling` (a
    llama_spec.config.RopeScaling) is given: wavelengths shorter than original/high_freq_factor are kept, longer
    than original/low_freq_factor are slowed by `factor`, and in between the frequency blends linearly (in
    original/wavelength) between the two."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return freqs
    original = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    short = wavelen < original / high
    long = wavelen > original / low
    return np.where(short, freqs, np.where(long, freqs / factor, blended))


def apply_rope(x, positions, config) -> np.ndarray:
    """Rotate pairs (2i, 2i+1) of x (B, S, heads, head_dim) by angle position * freq_i."""
    x = _f64(x)
    freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = _f64(positions)[:, None] * freqs[None, :]           # (S, hd/2)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def attention(x, lw: Mapping[str, np.ndarray], config, positions):
    """Causal GQA self-attention over the whole sequence x (B, T, D). Returns (wo output, q_rope, k_rope)."""
    x = _f64(x)
    b, t, _ = x.shape
    h, kv, hd = config.n_heads, config.n_kv_heads, config.head_dim
    q = (x @ _f64(lw["wq"]).T).reshape(b, t, h, hd)
    k = (x @ _f64(lw["wk"]).T).reshape(b, t, kv, hd)
    v = (x @ _f64(lw["wv"]).T).reshape(b, t, kv, hd)
    q, k = apply_rope(q, positions, config), apply_rope(k, positions, config)
    # query head j reads kv head j // (h // kv)
    k_all, v_all = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k_all) / math.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v_all).reshape(b, t, h * hd)
    return out @ _f64(lw["wo"]).T, q, k


def feed_forward(x, w1, w2, w3) -> np.ndarray:
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    x = _f64(x)
    gate = x @ _f64(w1).T
    return (gate / (1 + np.exp(-gate)) * (x @ _f64(w3).T)) @ _f64(w2).T


def block(x, lw: Mapping[str, np.ndarray], config, positions, store: dict | None = None, prefix: str = ""):
    x = _f64(x)
    normed = rms_norm(x, lw["attention_norm"], config.norm_eps)
    attn, q, k = attention(normed, lw, config, positions)
    h = x + attn
    normed2 = rms_norm(h, lw["ffn_norm"], config.norm_eps)
    mlp = feed_forward(normed2, lw["w1"], lw["w2"], lw["w3"])
    out = h + mlp
    if store is not None:
        store.update({prefix + "attention_norm": normed, prefix + "q_rope": q, prefix + "k_rope": k,
                      prefix + "attention_out": attn, prefix + "ffn_norm": normed2, prefix + "mlp_out": mlp,
                      prefix + "block_out": out})
    return out


# ---- the full model ------------------------------------------------------------------------------


def oracle_forward(config, weights: Mapping[str, np.ndarray], tokens, start_pos: int = 0, prefix_tokens=None,
                   capture: bool = False):
    """float64 logits (B, S, V) for `tokens` (B, S) at positions start_pos .. start_pos+S-1, and the named
    intermediates (reference/layers.py) of those S positions when `capture`.

    Without `prefix_tokens` the tokens have no earlier context. With `prefix_tokens` (B, start_pos) they are the
    tokens at positions 0 .. start_pos-1 and are attended to, as with a KV cache; their outputs are dropped.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    seqlen = tokens.shape[1]
    if prefix_tokens is not None:
        prefix_tokens = np.asarray(prefix_tokens)
        if prefix_tokens.shape != (tokens.shape[0], start_pos):
            raise ValueError(f"prefix_tokens must be (batch, start_pos) = {(tokens.shape[0], start_pos)}, "
                             f"got {prefix_tokens.shape}")
        tokens = np.concatenate([prefix_tokens, tokens], axis=1)
        positions = np.arange(tokens.shape[1])
    else:
        positions = start_pos + np.arange(seqlen)

    store: dict = {}
    h = _f64(weights["tok_embeddings.weight"])[tokens]
    store["embedding"] = h
    for i in range(config.n_layers):
        h = block(h, layer_weights(weights, i), config, positions, store, f"layers.{i}.")
    store["final_norm"] = rms_norm(h, weights["norm.weight"], config.norm_eps)
    store["logits"] = store["final_norm"] @ _f64(weights["output.weight"]).T
    tail = {name: store[name][:, -seqlen:] for name in intermediate_names(config.n_layers)}
    return (tail["logits"], tail) if capture else tail["logits"]


# ---- components, same signatures as reference/meta.py minus dtype ---------------------------------


def oracle_rms_norm(x, weight, eps: float) -> np.ndarray:
    return rms_norm(x, weight, eps)


def oracle_rope(q, k, config, start_pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """q (B,S,H,hd) and k (B,S,KV,hd), interleaved layout, rotated for positions start_pos .. start_pos+S-1."""
    positions = start_pos + np.arange(np.shape(q)[1])
    return apply_rope(q, positions, config), apply_rope(k, positions, config)


def oracle_attention(x_chunks: Sequence, layer_weights: Mapping[str, np.ndarray], config,
                     start_pos: int = 0) -> list[np.ndarray]:
    """The chunks as one causal sequence from position start_pos; wo's output split back per chunk."""
    x = np.concatenate([_f64(c) for c in x_chunks], axis=1)
    out, _, _ = attention(x, layer_weights, config, start_pos + np.arange(x.shape[1]))
    bounds = np.cumsum([np.shape(c)[1] for c in x_chunks])[:-1]
    return np.split(out, bounds, axis=1)


def oracle_feed_forward(x, w1, w2, w3) -> np.ndarray:
    return feed_forward(x, w1, w2, w3)


def oracle_block(x, layer_weights: Mapping[str, np.ndarray], config, start_pos: int = 0) -> np.ndarray:
    return block(x, layer_weights, config, start_pos + np.arange(np.shape(x)[1]))


def oracle_head(x, norm_weight, output_weight, eps: float) -> np.ndarray:
    return rms_norm(x, norm_weight, eps) @ _f64(output_weight).T
