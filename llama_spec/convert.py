"""Weight layouts shared by every side: Meta's checkpoint names and HF transformers' names, and the q/k permutation.

Meta rotates interleaved pairs (2i, 2i+1); HF rotates halves (i, i + head_dim/2). HF's conversion script
permutes the rows of wq and wk inside every head so the two agree; `meta_to_hf` applies that permutation
and `hf_to_meta` undoes it. The per-head activation helpers do the same for q/k after RoPE.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from llama_spec.config import LlamaConfig

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

def _interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered from (pair, 2) to (2, pair): Meta's wq/wk rows -> HF's."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def interleaved_to_halves_last_axis(x: np.ndarray) -> np.ndarray:
    """Per-head activations (..., head_dim) from Meta's pair layout to HF's half layout."""
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def halves_to_interleaved_last_axis(x: np.ndarray) -> np.ndarray:
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(x.shape)


META_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def meta_to_hf(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Meta state dict -> HF LlamaForCausalLM state dict (the q/k row permutation applied)."""
    out = {}
    for name, value in state.items():
        value = np.asarray(value)
        m = _LAYER.fullmatch(name)
        if not m:
            out[TOP_META_TO_HF[name]] = value
            continue
        layer, rest = m.groups()
        if rest == "attention.wq.weight":
            value = _interleaved_to_halves(value, config.n_heads)
        elif rest == "attention.wk.weight":
            value = _interleaved_to_halves(value, config.n_kv_heads)
        out[f"model.layers.{layer}.{META_TO_HF[rest]}"] = value
    return out


def hf_to_meta(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of `meta_to_hf`."""
    top = {v: k for k, v in TOP_META_TO_HF.items()}
    per_layer = {v: k for k, v in META_TO_HF.items()}
    out = {}
    for name, value in state.items():
        value = np.asarray(value)
        if name in top:
            out[top[name]] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in per_layer:
            raise KeyError(f"{name}: not an HF Llama parameter name")
        layer, rest = m.group(1), per_layer[m.group(2)]
        if rest == "attention.wq.weight":
            value = _halves_to_interleaved(value, config.n_heads)
        elif rest == "attention.wk.weight":
            value = _halves_to_interleaved(value, config.n_kv_heads)
        out[f"layers.{layer}.{rest}"] = value
    return out
