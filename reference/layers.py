"""Helpers shared by the three oracles (Meta, HF, float64 NumPy): per-layer weight views and the names of the
captured intermediates (pure NumPy, so the float64 oracle imports it without torch). The table below is data:
conformance/contract_page.py reads it into docs/contract.md#intermediate-names (B batch, S the tokens of the
current call, D dim, V vocab, H n_heads, KV n_kv_heads, hd head_dim).

    'embedding'                     (B, S, D)      output of the token embedding
    'layers.{i}.attention_norm'     (B, S, D)      output of the pre-attention RMSNorm
    'layers.{i}.q_rope'             (B, S, H, hd)  queries after RoPE, Meta's interleaved layout
    'layers.{i}.k_rope'             (B, S, KV, hd) keys after RoPE, Meta's interleaved layout (current chunk only)
    'layers.{i}.attention_out'      (B, S, D)      output of wo (before the residual add)
    'layers.{i}.ffn_norm'           (B, S, D)      output of the pre-MLP RMSNorm
    'layers.{i}.mlp_out'            (B, S, D)      output of w2 (before the residual add)
    'layers.{i}.block_out'          (B, S, D)      output of the transformer block (residual stream)
    'final_norm'                    (B, S, D)      output of the final RMSNorm
    'logits'                        (B, S, V)
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

# short key -> Meta checkpoint suffix inside `layers.{i}.`
LAYER_KEYS: dict[str, str] = {
    "wq": "attention.wq.weight",
    "wk": "attention.wk.weight",
    "wv": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "w1": "feed_forward.w1.weight",
    "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
    "attention_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}

ATTENTION_KEYS = ("wq", "wk", "wv", "wo")

PER_LAYER_NAMES = ("attention_norm", "q_rope", "k_rope", "attention_out", "ffn_norm", "mlp_out", "block_out")


def layer_weights(weights: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Layer `i` of a full Meta state dict, under the short keys of `LAYER_KEYS` (Meta layout, (out, in))."""
    prefix = f"layers.{i}."
    missing = [prefix + suffix for suffix in LAYER_KEYS.values() if prefix + suffix not in weights]
    if missing:
        raise KeyError(f"layer {i}: missing weight(s) {missing}")
    return {short: np.asarray(weights[prefix + suffix]) for short, suffix in LAYER_KEYS.items()}


def layer_state(layer: Mapping[str, np.ndarray], i: int = 0, keys=None) -> dict[str, np.ndarray]:
    """Inverse of `layer_weights`: short keys -> full Meta names of layer `i` (only `keys`, default all present)."""
    keys = [k for k in LAYER_KEYS if k in layer] if keys is None else keys
    return {f"layers.{i}.{LAYER_KEYS[k]}": np.asarray(layer[k]) for k in keys}


def intermediate_names(n_layers: int) -> list[str]:
    """Every captured intermediate name, in forward order."""
    names = ["embedding"]
    for i in range(n_layers):
        names += [f"layers.{i}.{n}" for n in PER_LAYER_NAMES]
    return names + ["final_norm", "logits"]


def captured(store: Mapping[str, np.ndarray], n_layers: int, who: str) -> dict[str, np.ndarray]:
    """The named intermediates of one forward, in order; a name the hooks missed is the reference's bug."""
    names = intermediate_names(n_layers)
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"{who} reference: intermediates not captured: {missing}")
    return {n: store[n] for n in names}
