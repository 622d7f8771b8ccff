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

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from llama_spec.convert import interleaved_to_halves_last_axis
from reference.layers import intermediate_names, layer_weights


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Variant:
    """Switches for known deviations from Llama 3.1, for predicting what a deviating implementation computes
    (conformance/mutants.py names each one; parity/diagnosis.py compares). The default is exact math: every
    oracle function called without a variant computes what it always did. Config-level deviations (eps, theta,
    RoPE scaling) are not switches: pass the changed config. `dtype` is the activation dtype an "in the
    activation dtype" switch rounds at; `shards` the model-axis size M the tensor-parallel switches use."""
    dtype: str = "float32"
    shards: int = 1
    norm_in_dtype: bool = False        # RMSNorm without the float32 upcast: every step rounded at `dtype`
    norm_without_weight: bool = False
    norm_over_all_axes: bool = False   # mean square over the whole tensor, not per token
    rope_angles_bf16: bool = False     # position * frequency computed in bfloat16
    rope_tables_bf16: bool = False     # cos/sin tables rounded to bfloat16
    rope_rotate_half: bool = False     # HF's rotate-half pairing applied to the interleaved layout
    rope_permuted_twice: bool = False  # q/k head_dim in HF's permutation applied twice (a loader permuting again)
    rope_half_layout: bool = False     # rotated q/k handed over in HF's half layout (same math, head_dim permuted)
    kv_tile_order: bool = False        # local query head j reads local kv head j % kv (tile), not j // group
    scores_in_bf16: bool = False       # q.k scores rounded to bfloat16 whatever the dtype
    softmax_in_dtype: bool = False     # softmax steps rounded at `dtype`
    score_divisor_head_dim: bool = False
    causal_sees_next: bool = False     # each query also sees the next key
    silu_in_dtype: bool = False        # SiLU's sigmoid and product rounded at `dtype`
    gate_up_swapped: bool = False
    missing_reduce: str | None = None  # 'wo' | 'w2': the output is device 0's partial sum
    double_reduce: str | None = None   # 'wo' | 'w2': the output is summed again, M times too large
    vocab_shards_reversed: bool = False  # the embedding reads vocab shard M-1-b for tokens of shard b


EXACT = Variant()


def _round(x, dtype: str) -> np.ndarray:
    """x rounded to `dtype` (float32 or bfloat16) and back to float64."""
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return np.asarray(x).astype(numpy_dtype).astype(np.float64)


def _reduced(partial_sums, variant: Variant, site: str) -> np.ndarray:
    """The all-reduce at `site` of per-device partial sums (M, ...), under the variant's reduce deviations."""
    total = partial_sums.sum(axis=0)
    if variant.missing_reduce == site:
        return partial_sums[0]
    return total * variant.shards if variant.double_reduce == site else total


def _split_contraction(x, w, shards: int) -> np.ndarray:
    """x @ w.T as M partial sums over equal slices of the contracted axis (row-parallel), (M, ..., out)."""
    if shards == 1:
        return (x @ w.T)[None]
    xs, ws = np.split(x, shards, axis=-1), np.split(w, shards, axis=-1)
    return np.stack([a @ b.T for a, b in zip(xs, ws)])


# ---- pieces ------------------------------------------------------------------------------------


def rms_norm(x, weight, eps: float, variant: Variant = EXACT) -> np.ndarray:
    x = _f64(x)
    axis = None if variant.norm_over_all_axes else -1
    weight = 1.0 if variant.norm_without_weight else _f64(weight)
    if variant.norm_in_dtype:
        r = functools.partial(_round, dtype=variant.dtype)
        inverse = r(1 / np.sqrt(r(r(np.mean(r(x * x), axis=axis, keepdims=True)) + eps)))
        return r(r(x * inverse) * weight)
    return x / np.sqrt(np.mean(x * x, axis=axis, keepdims=True) + eps) * weight


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


def hf_permutation_twice(head_dim: int) -> np.ndarray:
    """Index map of HF's q/k row permutation (Meta's interleaved pair (2i, 2i+1) -> rows i and i + head_dim/2)
    applied twice: what a loader that permutes an already permuted HF checkpoint hands the interleaved RoPE."""
    once = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return once[once]


def apply_rope(x, positions, config, variant: Variant = EXACT) -> np.ndarray:
    """Rotate pairs (2i, 2i+1) of x (B, S, heads, head_dim) by angle position * freq_i."""
    x = _f64(x)
    if variant.rope_permuted_twice:
        x = x[..., hf_permutation_twice(x.shape[-1])]
    freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    if variant.rope_angles_bf16:
        angles = _round(_round(positions, "bfloat16")[:, None] * _round(freqs, "bfloat16")[None, :], "bfloat16")
    else:
        angles = _f64(positions)[:, None] * freqs[None, :]       # (S, hd/2)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    if variant.rope_tables_bf16:
        cos, sin = _round(cos, "bfloat16"), _round(sin, "bfloat16")
    if variant.rope_rotate_half:
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return interleaved_to_halves_last_axis(out) if variant.rope_half_layout else out


def query_order(config, variant: Variant = EXACT) -> np.ndarray:
    """The query head in each attention slot; slot p reads kv head p // (h // kv) (Meta's repeat_kv) and its
    output goes to slot p. Exact: slot p holds head p. With `kv_tile_order`, each device's local query heads are
    grouped in jnp.tile order: local slot kv_i * group + g holds local head g * kv_local + kv_i (so head j reads
    kv head j % kv_local) and its output stays in that slot."""
    h, kv, m = config.n_heads, config.n_kv_heads, variant.shards
    if not variant.kv_tile_order:
        return np.arange(h)
    local_h, local_kv = h // m, max(1, kv // m)
    group = local_h // local_kv
    device, slot = np.divmod(np.arange(h), local_h)
    kv_i, g = np.divmod(slot, group)
    return device * local_h + g * local_kv + kv_i


def _softmax(scores, variant: Variant) -> np.ndarray:
    if not variant.softmax_in_dtype:
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return scores / scores.sum(axis=-1, keepdims=True)
    r = functools.partial(_round, dtype=variant.dtype)
    scores = r(scores)
    e = r(np.exp(r(scores - scores.max(axis=-1, keepdims=True))))
    return r(e / r(e.sum(axis=-1, keepdims=True)))


def attention(x, lw: Mapping[str, np.ndarray], config, positions, variant: Variant = EXACT):
    """Causal GQA self-attention over the whole sequence x (B, T, D). Returns (wo output, q_rope, k_rope)."""
    x = _f64(x)
    b, t, _ = x.shape
    h, kv, hd = config.n_heads, config.n_kv_heads, config.head_dim
    q = (x @ _f64(lw["wq"]).T).reshape(b, t, h, hd)
    k = (x @ _f64(lw["wk"]).T).reshape(b, t, kv, hd)
    v = (x @ _f64(lw["wv"]).T).reshape(b, t, kv, hd)
    q, k = apply_rope(q, positions, config, variant), apply_rope(k, positions, config, variant)
    # query head j reads kv head j // (h // kv)
    k_all, v_all = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q[:, :, query_order(config, variant)] if variant.kv_tile_order else q,
                       k_all)
    if variant.scores_in_bf16:
        scores = _round(scores, "bfloat16")
    scores = scores / (hd if variant.score_divisor_head_dim else math.sqrt(hd))
    if variant.scores_in_bf16:
        scores = _round(scores, "bfloat16")
    scores = np.where(np.tril(np.ones((t, t), dtype=bool), k=int(variant.causal_sees_next)), scores, -np.inf)
    probs = _softmax(scores, variant)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v_all).reshape(b, t, h * hd)
    return _reduced(_split_contraction(out, _f64(lw["wo"]), variant.shards), variant, "wo"), q, k


def feed_forward(x, w1, w2, w3, variant: Variant = EXACT) -> np.ndarray:
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    x = _f64(x)
    gate, up = x @ _f64(w1).T, x @ _f64(w3).T
    if variant.gate_up_swapped:
        gate, up = up, gate
    if variant.silu_in_dtype:
        r = functools.partial(_round, dtype=variant.dtype)
        hidden = r(r(gate) * r(1 / (1 + np.exp(-gate)))) * up
    else:
        hidden = gate / (1 + np.exp(-gate)) * up
    return _reduced(_split_contraction(hidden, _f64(w2), variant.shards), variant, "w2")


def block(x, lw: Mapping[str, np.ndarray], config, positions, store: dict | None = None, prefix: str = "",
          variant: Variant = EXACT):
    x = _f64(x)
    normed = rms_norm(x, lw["attention_norm"], config.norm_eps, variant)
    attn, q, k = attention(normed, lw, config, positions, variant)
    h = x + attn
    normed2 = rms_norm(h, lw["ffn_norm"], config.norm_eps, variant)
    mlp = feed_forward(normed2, lw["w1"], lw["w2"], lw["w3"], variant)
    out = h + mlp
    if store is not None:
        store.update({prefix + "attention_norm": normed, prefix + "q_rope": q, prefix + "k_rope": k,
                      prefix + "attention_out": attn, prefix + "ffn_norm": normed2, prefix + "mlp_out": mlp,
                      prefix + "block_out": out})
    return out


# ---- the full model ------------------------------------------------------------------------------


def oracle_forward(config, weights: Mapping[str, np.ndarray], tokens, start_pos: int = 0, prefix_tokens=None,
                   capture: bool = False, variant: Variant = EXACT):
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
    h = oracle_embedding(tokens, weights["tok_embeddings.weight"], variant)
    store["embedding"] = h
    for i in range(config.n_layers):
        h = block(h, layer_weights(weights, i), config, positions, store, f"layers.{i}.", variant)
    store["final_norm"] = rms_norm(h, weights["norm.weight"], config.norm_eps, variant)
    store["logits"] = store["final_norm"] @ _f64(weights["output.weight"]).T
    tail = {name: store[name][:, -seqlen:] for name in intermediate_names(config.n_layers)}
    return (tail["logits"], tail) if capture else tail["logits"]


# ---- components, same signatures as reference/meta.py minus dtype ---------------------------------


def oracle_embedding(tokens, weight, variant: Variant = EXACT) -> np.ndarray:
    """The table's rows for the tokens; `vocab_shards_reversed` reads the rows of the mirror vocab shard."""
    table = _f64(weight)
    if variant.vocab_shards_reversed:
        table = np.concatenate(np.split(table, variant.shards)[::-1])
    return table[np.asarray(tokens)]


def oracle_rms_norm(x, weight, eps: float, variant: Variant = EXACT) -> np.ndarray:
    return rms_norm(x, weight, eps, variant)


def oracle_rope(q, k, config, start_pos: int = 0, variant: Variant = EXACT) -> tuple[np.ndarray, np.ndarray]:
    """q (B,S,H,hd) and k (B,S,KV,hd), interleaved layout, rotated for positions start_pos .. start_pos+S-1."""
    positions = start_pos + np.arange(np.shape(q)[1])
    return apply_rope(q, positions, config, variant), apply_rope(k, positions, config, variant)


def oracle_attention(x_chunks: Sequence, layer_weights: Mapping[str, np.ndarray], config,
                     start_pos: int = 0, variant: Variant = EXACT) -> list[np.ndarray]:
    """The chunks as one causal sequence from position start_pos; wo's output split back per chunk."""
    x = np.concatenate([_f64(c) for c in x_chunks], axis=1)
    out, _, _ = attention(x, layer_weights, config, start_pos + np.arange(x.shape[1]), variant)
    bounds = np.cumsum([np.shape(c)[1] for c in x_chunks])[:-1]
    return np.split(out, bounds, axis=1)


def oracle_feed_forward(x, w1, w2, w3, variant: Variant = EXACT) -> np.ndarray:
    return feed_forward(x, w1, w2, w3, variant)


def oracle_block(x, layer_weights: Mapping[str, np.ndarray], config, start_pos: int = 0,
                 variant: Variant = EXACT) -> np.ndarray:
    return block(x, layer_weights, config, start_pos + np.arange(np.shape(x)[1]), variant=variant)


def oracle_head(x, norm_weight, output_weight, eps: float, variant: Variant = EXACT) -> np.ndarray:
    return rms_norm(x, norm_weight, eps, variant) @ _f64(output_weight).T
