"""A tensor-parallel Llama 3.1 in Flax NNX, written for the adapter path of docs/results.md ("The adapter path, timed").

- NNX modules (`Llama` > `Block` > `Attention`, `FeedForward`, `RMSNorm`), weights as `nnx.Param`s placed on the
  mesh by `jax.sharding.NamedSharding`s (`SPECS`: Megatron's column/row/vocab split over 'model');
  `with_sharding_constraint` pins the activations and XLA's partitioner derives the all-reduces;
- Meta's interleaved RoPE (pairs (2i, 2i+1)) with Llama 3's frequency scaling, so q/k need no conversion;
- grouped-query attention by grouping queries per kv head; when the model axis exceeds n_kv_heads each kv head is
  stored once per device that reads it (`kv_copies`), so the grouping stays local;
- intermediates sown as `nnx.Intermediate` under the model's own paths (adapter.TAPS maps them);
- a KV cache of one (batch, length, kv heads, head_dim) pair per layer, passed in and returned (no state kept);
- the layers unrolled by a Python loop, an optimization barrier between blocks (see `Llama`).
Norms, RoPE and softmax in float32; matmuls accumulate in float32 and round once to the activation dtype.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

F32 = jnp.float32
# Finite, so that a query row with every key masked (a left-padding slot) stays finite instead of NaN.
MASK_VALUE = float(jnp.finfo(F32).min)
DATA, MODEL = "data", "model"
# Weights in (in, out) orientation: column-parallel wq wk wv w1 w3, row-parallel wo w2, vocab-parallel embed/output.
SPECS = {"embed": P(MODEL, None), "output": P(None, MODEL), "norm": P(), "wq": P(None, MODEL),
         "wk": P(None, MODEL), "wv": P(None, MODEL), "w1": P(None, MODEL), "w3": P(None, MODEL),
         "wo": P(MODEL, None), "w2": P(MODEL, None)}
HIDDEN, HEADS, FEATURES, LOGITS = P(DATA, None, None), P(DATA, None, MODEL, None), P(DATA, None, MODEL), \
    P(DATA, None, MODEL)
CACHE = P(DATA, None, MODEL, None)
# Each weight's Meta name, for loading and for the adapter's parameters().
META = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
        "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
        "attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def kv_copies(config, mesh: Mesh) -> int:
    """Copies of each kv head the model axis holds (one per device reading it when M > n_kv_heads)."""
    return max(1, mesh.shape[MODEL] // config.n_kv_heads)


def pin(mesh: Mesh, x: jax.Array, spec: P) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def placed(mesh: Mesh, w: np.ndarray, spec: P, dtype) -> nnx.Param:
    """A host weight as an nnx.Param on the mesh, each device receiving only its slice."""
    return nnx.Param(jax.device_put(np.asarray(w, np.float32).astype(dtype), NamedSharding(mesh, spec)))


def dense(x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    """x @ w accumulated in float32, rounded to x's dtype; `name` goes into the HLO's op_name."""
    with jax.named_scope(name):
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=F32).astype(x.dtype)


def inverse_frequencies(config) -> jax.Array:
    """(head_dim/2,) float32, with Llama 3's long-context scaling when the config has one."""
    hd = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    scaling = config.rope_scaling
    if scaling is not None:
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        ramp = np.clip((scaling.original_max_position_embeddings * inv / (2 * math.pi) - low) / (high - low), 0, 1)
        inv = (1 - ramp) * inv / scaling.factor + ramp * inv
    return jnp.asarray(inv, F32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Meta's interleaved RoPE of x (batch, seq, heads, head_dim) at positions (batch, seq), in float32."""
    angles = positions.astype(F32)[:, :, None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(F32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def visibility(q_slots: jax.Array, length: int, pad: jax.Array) -> jax.Array:
    """(batch, seq, length): key slot t is visible to query slot q_slots[j] of row i when t <= q_slots[j] and t is
    not one of row i's pad[i] left-padding slots."""
    t = jnp.arange(length)
    return (t[None, None, :] <= q_slots[None, :, None]) & (t[None, None, :] >= pad[:, None, None])


def _repeat_heads(w: np.ndarray, heads: int, copies: int) -> np.ndarray:
    """(dim, heads*head_dim) columns -> each head's columns `copies` times in a row (kv0, kv0, kv1, kv1, ...)."""
    dim, cols = w.shape
    return np.repeat(w.reshape(dim, heads, 1, cols // heads), copies, axis=2).reshape(dim, cols * copies)


class RMSNorm(nnx.Module):
    def __init__(self, weight: np.ndarray, eps: float, mesh: Mesh, dtype):
        self.weight, self.eps = placed(mesh, weight, SPECS["norm"], dtype), eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(F32)
        return (xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype) * self.weight


class Attention(nnx.Module):
    """q/k/v, RoPE, GQA, causal softmax over the cache and wo; kv heads stored `copies` times (see kv_copies)."""

    def __init__(self, config, w: Mapping[str, np.ndarray], mesh: Mesh, dtype):
        self.mesh, self.config, self.copies = mesh, config, kv_copies(config, mesh)
        kv = config.n_kv_heads
        self.wq = placed(mesh, w["wq"].T, SPECS["wq"], dtype)
        self.wk = placed(mesh, _repeat_heads(w["wk"].T, kv, self.copies), SPECS["wk"], dtype)
        self.wv = placed(mesh, _repeat_heads(w["wv"].T, kv, self.copies), SPECS["wv"], dtype)
        self.wo = placed(mesh, w["wo"].T, SPECS["wo"], dtype)

    def __call__(self, x, positions, visible, slot0, cache):
        c, mesh = self.config, self.mesh
        b, s, _ = x.shape
        h, hd, kv = c.n_heads, c.head_dim, c.n_kv_heads * self.copies
        inv = inverse_frequencies(c)
        q = rope(pin(mesh, dense(x, self.wq[...], "wq").reshape(b, s, h, hd), HEADS), positions, inv)
        k = rope(pin(mesh, dense(x, self.wk[...], "wk").reshape(b, s, kv, hd), HEADS), positions, inv)
        v = pin(mesh, dense(x, self.wv[...], "wv").reshape(b, s, kv, hd), HEADS)
        self.sow(nnx.Intermediate, "q", q)
        self.sow(nnx.Intermediate, "k", k[:, :, ::self.copies])
        keys, values = k, v
        if cache is not None:
            keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k, slot0, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cache[1], v, slot0, axis=1)
        grouped = q.reshape(b, s, kv, h // kv, hd)
        scores = jnp.einsum("bskgd,btkd->bkgst", grouped, keys, preferred_element_type=F32).astype(x.dtype)
        scores = jnp.where(visible[:, None, None], scores.astype(F32) / math.sqrt(hd), MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, values, preferred_element_type=F32).astype(x.dtype)
        out = pin(mesh, dense(out.reshape(b, s, h * hd), self.wo[...], "wo"), HIDDEN)
        return out, None if cache is None else (keys, values)


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), the features split over the model axis."""

    def __init__(self, w: Mapping[str, np.ndarray], mesh: Mesh, dtype):
        self.mesh = mesh
        self.w1, self.w2, self.w3 = (placed(mesh, w[n].T, SPECS[n], dtype) for n in ("w1", "w2", "w3"))

    def __call__(self, x):
        gate = pin(self.mesh, dense(x, self.w1[...], "w1"), FEATURES)
        up = pin(self.mesh, dense(x, self.w3[...], "w3"), FEATURES)
        return pin(self.mesh, dense(jax.nn.silu(gate.astype(F32)).astype(x.dtype) * up, self.w2[...], "w2"), HIDDEN)


class Block(nnx.Module):
    def __init__(self, config, w: Mapping[str, np.ndarray], mesh: Mesh, dtype):
        self.mesh = mesh
        self.attention_norm = RMSNorm(w["attention_norm"], config.norm_eps, mesh, dtype)
        self.attention = Attention(config, w, mesh, dtype)
        self.ffn_norm = RMSNorm(w["ffn_norm"], config.norm_eps, mesh, dtype)
        self.feed_forward = FeedForward(w, mesh, dtype)

    def __call__(self, x, positions, visible, slot0=0, cache=None):
        x = pin(self.mesh, x, HIDDEN)
        a_in = self.attention_norm(x)
        with jax.named_scope("attention"):
            attn, cache = self.attention(a_in, positions, visible, slot0, cache)
        mid = x + attn
        f_in = self.ffn_norm(mid)
        with jax.named_scope("feed_forward"):
            mlp = self.feed_forward(f_in)
        y = mid + mlp
        for name, value in (("attn_in", a_in), ("attn_out", attn), ("mlp_in", f_in), ("mlp_out", mlp), ("out", y)):
            self.sow(nnx.Intermediate, name, value)
        return y, cache


class Llama(nnx.Module):
    """The whole model on `mesh`, in `dtype`, from Meta-layout host weights. The layers are a Python loop, so XLA
    sees one program and may fuse across layers, skipping bfloat16 roundings (excess precision) in a way that
    depends on the mesh; an optimization barrier after each block keeps every mesh's residual stream rounded alike
    (without it a 1x4 bfloat16 run drifts from 1x1's past layer 0: conformance/test_tp_invariance.py)."""

    def __init__(self, config, weights: Mapping[str, np.ndarray], mesh: Mesh, dtype):
        self.config, self.mesh = config, mesh
        self.embed = placed(mesh, weights["tok_embeddings.weight"], SPECS["embed"], dtype)
        layer = lambda i: {k: np.asarray(weights[f"layers.{i}.{m}.weight"]) for k, m in META.items()}  # noqa: E731
        self.layers = nnx.List([Block(config, layer(i), mesh, dtype) for i in range(config.n_layers)])
        self.norm = RMSNorm(weights["norm.weight"], config.norm_eps, mesh, dtype)
        self.output = placed(mesh, np.asarray(weights["output.weight"]).T, SPECS["output"], dtype)

    def lookup(self, tokens):
        with jax.named_scope("tok_embeddings"):
            return pin(self.mesh, self.embed[...][tokens], HIDDEN)

    def head(self, h):
        """Final norm, then vocab-split logits (float32, as Meta's reference returns them)."""
        final = self.norm(pin(self.mesh, h, HIDDEN))
        self.sow(nnx.Intermediate, "final_norm", final)
        with jax.named_scope("output"):
            logits = dense(final, self.output[...], "output")
        return pin(self.mesh, logits.astype(F32), LOGITS)

    def __call__(self, tokens, positions, pad, slot0=0, cache=None):
        """tokens (b, s) in cache slots slot0.. at RoPE positions (b, s); row i's first pad[i] slots are never
        attended. With a cache (one (k, v) per layer) the new keys are written at slot0; without one the sequence
        is fresh. Returns (logits float32, new cache or None)."""
        s = tokens.shape[1]
        visible = visibility(slot0 + jnp.arange(s), s if cache is None else cache[0][0].shape[1], pad)
        h = self.lookup(tokens)
        self.sow(nnx.Intermediate, "embedding", h)
        new_cache = []
        for i, block in enumerate(self.layers):
            h, layer_cache = block(h, positions, visible, slot0, None if cache is None else cache[i])
            h = jax.lax.optimization_barrier(h)  # see Llama's docstring
            new_cache.append(layer_cache)
        return self.head(h), None if cache is None else new_cache
