"""A minimal tensor-parallel Llama 3.1 in plain jax.numpy, written unlike tp_llama on purpose.

No shard_map, no Flax, no hand-written collective: weights placed by a table of PartitionSpecs (`RULES`) and
pinned activations, so XLA's SPMD partitioner must derive the Megatron communication itself; stacked layers under
`lax.scan`, HF's rotate-half RoPE layout, grouped queries by reshape, one KV cache array per side. Numerics follow
Meta's reference where it matters (RMSNorm, RoPE and softmax in float32). The design, point by point:
docs/internals.md#the-jaxnumpy-example.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

F32 = jnp.float32
# Finite, so that a query row with every key masked (a left-padding slot) stays finite instead of NaN, which
# 0 * NaN in the next layer's value sum would carry into real rows.
MASK_VALUE = float(jnp.finfo(F32).min)
LAYER_WEIGHTS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")
DATA, MODEL = "data", "model"

# Where the mesh splits each weight: stacked layer weights are (layers, in, out), the embedding (vocab, dim), the
# output (dim, vocab). Column-parallel: wq wk wv w1 w3; row-parallel: wo w2; vocab-parallel: embed, output.
RULES: dict[str, P] = {
    "embed": P(MODEL, None), "output": P(None, MODEL), "norm": P(),
    "attention_norm": P(), "ffn_norm": P(),
    "wq": P(None, None, MODEL), "wk": P(None, None, MODEL), "wv": P(None, None, MODEL),
    "w1": P(None, None, MODEL), "w3": P(None, None, MODEL),
    "wo": P(None, MODEL, None), "w2": P(None, MODEL, None),
}
# Activations: batch over data; the residual stream whole on every model device; heads and features split.
HIDDEN, HEADS, FEATURES, LOGITS = P(DATA, None, None), P(DATA, None, MODEL, None), P(DATA, None, MODEL), \
    P(DATA, None, MODEL)
TOKENS, CACHE = P(DATA, None), P(None, DATA, None, MODEL, None)
# The Meta tensor behind each stacked layer weight, for `parameters()` ('layers.*.' = every layer, stacked first).
META_NAMES = {"attention_norm": "attention_norm", "ffn_norm": "ffn_norm", "wq": "attention.wq",
              "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo", "w1": "feed_forward.w1",
              "w2": "feed_forward.w2", "w3": "feed_forward.w3"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the PartitionSpec of every weight: where parameters live and how activations are pinned."""
    mesh: Mesh
    rules: Mapping[str, P]

    @property
    def model_parallel(self) -> int:
        return self.mesh.shape[MODEL]

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def pin(self, x: jax.Array, spec: P) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(spec))

    def kv_copies(self, config) -> int:
        """Copies of each kv head the model axis holds (one per device reading it when M > n_kv_heads)."""
        return max(1, self.model_parallel // config.n_kv_heads)

    def param_shardings(self, params) -> dict:
        """The NamedSharding of every weight, in the shape of the parameter dict."""
        return {name: ({k: self.sharding(self.rules[k]) for k in value} if name == "layers"
                       else self.sharding(self.rules[name])) for name, value in params.items()}


# ---- weights ---------------------------------------------------------------------------------

def _halves_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta's (heads*head_dim, dim) q/k rows, pairs (2i, 2i+1) per head -> rows (i, i + head_dim/2)."""
    rows, dim = w.shape
    return w.reshape(heads, rows // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def _repeat_heads(w: np.ndarray, heads: int, copies: int) -> np.ndarray:
    """(heads*head_dim, dim) rows -> each head's rows `copies` times in a row (kv0, kv0, kv1, kv1, ...)."""
    rows, dim = w.shape
    return np.repeat(w.reshape(heads, 1, rows // heads, dim), copies, axis=1).reshape(rows * copies, dim)


def interleaved_to_halves(x: jax.Array) -> jax.Array:
    """(..., head_dim) in Meta's interleaved layout -> the halves layout."""
    *lead, hd = x.shape
    return x.reshape(*lead, hd // 2, 2).swapaxes(-1, -2).reshape(*lead, hd)


def halves_to_interleaved(x: jax.Array) -> jax.Array:
    """(..., head_dim) in the halves layout -> Meta's interleaved layout (what the suite compares)."""
    *lead, hd = x.shape
    return x.reshape(*lead, 2, hd // 2).swapaxes(-1, -2).reshape(*lead, hd)


def from_meta(config, weights: Mapping[str, np.ndarray], kv_copies: int = 1) -> dict:
    """Meta checkpoint tensors -> host arrays {'embed', 'norm', 'output', 'layers'}; 'layers' maps each name to all
    layers' weights stacked: (n_layers, in, out) for projections, (n_layers, dim) for norms. Keys and values get
    `kv_copies` copies of each kv head (see Layout.kv_copies)."""
    def layer(i, name):
        if name.endswith("norm"):
            return weights[f"layers.{i}.{name}.weight"]
        w = weights[f"layers.{i}.{META_NAMES[name]}.weight"]
        if name in ("wq", "wk"):
            w = _halves_rows(w, config.n_heads if name == "wq" else config.n_kv_heads)
        if name in ("wk", "wv"):
            w = _repeat_heads(w, config.n_kv_heads, kv_copies)
        return w.T  # (in, out): x @ w

    stacked = {name: np.stack([layer(i, name) for i in range(config.n_layers)]) for name in LAYER_WEIGHTS}
    return {"embed": weights["tok_embeddings.weight"], "norm": weights["norm.weight"],
            "output": weights["output.weight"].T, "layers": stacked}


def place(host: dict, layout: Layout, dtype) -> dict:
    """Host arrays (global shapes) -> jax.Arrays on the layout's mesh; each device receives only its slice."""
    shardings = layout.param_shardings(host)
    return jax.tree.map(lambda w, s: jax.device_put(np.asarray(w).astype(dtype), s), host, shardings)


def meta_parameters(params: dict) -> dict:
    """The placed arrays under Meta's names; a stacked layer weight is 'layers.*.<name>' (layer axis first).
    Orientation (in, out), wq/wk rows in the halves layout, wk/wv with repeated kv heads."""
    out = {"tok_embeddings.weight": params["embed"], "norm.weight": params["norm"],
           "output.weight": params["output"]}
    out.update({f"layers.*.{META_NAMES[name]}.weight": value for name, value in params["layers"].items()})
    return out


# ---- math ------------------------------------------------------------------------------------

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
    """Halves-layout RoPE of x (batch, seq, heads, head_dim) at positions (batch, seq), phases in float32."""
    angles = positions.astype(F32)[..., None] * inv_freq
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(F32)
    first, second = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-second, first], axis=-1) * sin).astype(x.dtype)


def _dense(x, w, name):
    """x @ w accumulated in float32, rounded to x's dtype; `name` ('wq', ...) goes into the HLO's op_name."""
    with jax.named_scope(name):
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=F32).astype(x.dtype)


def rms_norm(x, w, eps):
    xf = x.astype(F32)
    return (xf / jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype) * w


def visibility(q_slots: jax.Array, length: int, pad: jax.Array) -> jax.Array:
    """(batch, seq, length): key slot t is visible to the query in slot q_slots[j] of row i when t <= q_slots[j]
    and t is not one of row i's pad[i] left-padding slots."""
    t = jnp.arange(length)
    return (t[None, None, :] <= q_slots[None, :, None]) & (t[None, None, :] >= pad[:, None, None])


def _attend(q, k, v, visible):
    """q (b, s, kv, group, hd), k/v (b, t, kv, hd), visible (b, s, t). Scores are rounded to the activation dtype
    before the float32 softmax, as Meta's reference computes them."""
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=F32).astype(q.dtype) / math.sqrt(q.shape[-1])
    masked = jnp.where(visible[:, None, None], scores.astype(F32), MASK_VALUE)
    probs = jax.nn.softmax(masked, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=F32).astype(q.dtype)


def attention(config, layout: Layout, w, x, positions, visible, slot0=0, cache=None):
    """The layer's attention on x (b, s, dim) at RoPE positions (b, s), writing its keys and values at cache slot
    slot0 when there is a cache. Returns (output, (q, k) after RoPE in the halves layout, new (k, v) or None)."""
    b, s, _ = x.shape
    h, hd = config.n_heads, config.head_dim
    kv = config.n_kv_heads * layout.kv_copies(config)
    inv_freq = inverse_frequencies(config)
    q = rotate(layout.pin(_dense(x, w["wq"], "wq").reshape(b, s, h, hd), HEADS), positions, inv_freq)
    k = rotate(layout.pin(_dense(x, w["wk"], "wk").reshape(b, s, kv, hd), HEADS), positions, inv_freq)
    v = layout.pin(_dense(x, w["wv"], "wv").reshape(b, s, kv, hd), HEADS)
    keys, values = k, v
    if cache is not None:
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), slot0, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), slot0, axis=1)
    out = _attend(q.reshape(b, s, kv, h // kv, hd), keys, values, visible)
    attn = layout.pin(_dense(out.reshape(b, s, h * hd), w["wo"], "wo"), HIDDEN)
    return attn, (q, k), None if cache is None else (keys, values)


def feed_forward(layout: Layout, w, x):
    gate = layout.pin(_dense(x, w["w1"], "w1"), FEATURES)
    up = layout.pin(_dense(x, w["w3"], "w3"), FEATURES)
    hidden = (jax.nn.silu(gate.astype(F32)).astype(x.dtype)) * up
    return layout.pin(_dense(hidden, w["w2"], "w2"), HIDDEN)


def block(config, layout: Layout, w, x, positions, visible, slot0=0, cache=None):
    """One transformer block; returns (output, intermediates in Meta's names and layout, new cache or None)."""
    eps = config.norm_eps
    a_in = rms_norm(x, w["attention_norm"], eps)
    with jax.named_scope("attention"):
        attn, (q, k), cache = attention(config, layout, w, a_in, positions, visible, slot0, cache)
    mid = x + attn
    f_in = rms_norm(mid, w["ffn_norm"], eps)
    with jax.named_scope("feed_forward"):
        mlp = feed_forward(layout, w, f_in)
    y = mid + mlp
    copies = layout.kv_copies(config)
    taps = {"attention_norm": a_in, "q_rope": halves_to_interleaved(q),
            "k_rope": halves_to_interleaved(k[:, :, ::copies]), "attention_out": attn, "ffn_norm": f_in,
            "mlp_out": mlp, "block_out": y}
    return y, taps, cache


def head(config, layout: Layout, params, h):
    """Final norm, then vocab-split logits (float32, as Meta's reference returns them)."""
    final = rms_norm(h, params["norm"], config.norm_eps)
    with jax.named_scope("output"):
        logits = jnp.einsum("bsd,dv->bsv", final, params["output"], preferred_element_type=F32).astype(h.dtype)
    return final, layout.pin(logits.astype(F32), LOGITS)


def embed(layout: Layout, params, tokens):
    with jax.named_scope("tok_embeddings"):
        return layout.pin(params["embed"][tokens], HIDDEN)


def run(config, layout: Layout, params, tokens, positions, pad, slot0=0, cache=None):
    """tokens (b, s) in cache slots slot0.. at RoPE positions (b, s); row i's first pad[i] slots are never
    attended. With a cache (k, v) of (layers, b, length, kv, hd) the new keys are written at slot0 and every
    visible slot is attended; without one the sequence is fresh. Returns (logits float32, new cache or None,
    intermediates in Meta's names and layout)."""
    s = tokens.shape[1]
    length = s if cache is None else cache[0].shape[2]
    visible = visibility(slot0 + jnp.arange(s), length, pad)
    x = embed(layout, params, tokens)

    def layer(h, scanned):
        w, layer_cache = scanned
        y, taps, layer_cache = block(config, layout, w, layout.pin(h, HIDDEN), positions, visible, slot0,
                                     layer_cache)
        return y, (taps, layer_cache)

    h, (taps, new_cache) = jax.lax.scan(layer, x, (params["layers"], cache))
    final, logits = head(config, layout, params, h)
    named = {"embedding": x, "final_norm": final}
    for i in range(config.n_layers):
        named.update({f"layers.{i}.{name}": value[i] for name, value in taps.items()})
    return logits, new_cache, named
