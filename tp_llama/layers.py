"""Per-shard math of Llama 3.1 as small pure functions.

Each function sees only the local shard of a tensor-parallel layer; collectives live in `model.py`.
Numerics follow Meta's reference (llama_models/llama3/model.py): norms, RoPE and softmax in float32,
matmuls accumulated in float32 and rounded once to the activation dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_spec.config import RopeScaling

F32 = jnp.float32
# Masked scores take the smallest float32 instead of -inf so that a fully masked row (a padding query)
# gives a finite uniform distribution, not NaN that would leak through 0 * NaN into real rows.
MASK_VALUE = float(jnp.finfo(F32).min)


def matmul_f32(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel accumulated and returned in float32 (the caller rounds, after any all-reduce)."""
    return jnp.matmul(x, kernel, preferred_element_type=F32)


def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return matmul_f32(x, kernel).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, round to the activation dtype, then scale (Meta's order of operations)."""
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def scale_rope_frequencies(freqs: jax.Array, scaling: RopeScaling) -> jax.Array:
    """Llama 3 scaling (Meta's apply_scaling with the config's parameters instead of its hard-coded 8/1/4/8192):
    wavelengths above original/low slowed by `factor`, a smooth ramp down to original/high."""
    original = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / freqs
    new_freqs = jnp.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (original / wavelen - low) / (high - low)
    in_ramp = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(in_ramp, (1 - smooth) * new_freqs / factor + smooth * new_freqs, new_freqs)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies (head_dim/2,), always float32; scaled when the config has RoPE scaling."""
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    return freqs if scaling is None else scale_rope_frequencies(freqs, scaling)


def rope_angles(positions: jax.Array, freqs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency, (batch, seq, head_dim/2), in float32 whatever the dtype."""
    angles = positions.astype(F32)[..., None] * freqs
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (2i, 2i+1) of x (batch, seq, heads, head_dim): Meta's layout."""
    xf = x.astype(F32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def group_query_heads(q: jax.Array, n_kv_heads: int) -> jax.Array:
    """(b, s, heads, d) -> (b, s, kv_heads, group, d): query head h reads kv head h // group, as Meta's repeat_kv."""
    b, s, h, d = q.shape
    return q.reshape(b, s, n_kv_heads, h // n_kv_heads, d)


def causal_mask(q_slots: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """(b, s, t) True where query at cache slot q_slots[b, s] may read key slot t."""
    t = jnp.arange(kv_valid.shape[-1])
    return (t[None, None, :] <= q_slots[:, :, None]) & kv_valid[:, None, :]


def score_divisor(head_dim: int) -> float:
    """Scores are q.k / sqrt(head_dim)."""
    return math.sqrt(head_dim)


def attention_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax over keys, computed in float32 from scores at the activation dtype (as Meta does)."""
    return jax.nn.softmax(jnp.where(mask, scores.astype(F32), MASK_VALUE), axis=-1)


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """Store new keys or values (b, s, kv, d) at cache slots index .. index+s-1."""
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention on local heads. q (b, s, h, d); k, v (b, t, kv, d); mask (b, s, t). Returns (b, s, h*d)."""
    b, s, h, d = q.shape
    qg = group_query_heads(q, k.shape[2])
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=F32).astype(q.dtype)
    scores = scores / score_divisor(d)
    probs = attention_softmax(scores, mask[:, None, None, :, :]).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=F32).astype(q.dtype)
    return out.reshape(b, s, h * d)


def silu_f32(x: jax.Array) -> jax.Array:
    xf = x.astype(F32)
    return (xf * jax.nn.sigmoid(xf)).astype(x.dtype)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(x @ w1) * (x @ w3): the input of the down projection."""
    return silu_f32(gate) * up
