"""Weight-layout conversions between Meta's checkpoint, the JAX model's parameter tree and HF transformers.

Meta rotates interleaved pairs (2i, 2i+1); HF rotates halves (i, i + head_dim/2). HF's conversion script
permutes the rows of wq and wk inside every head so the two agree; `meta_to_hf` applies that permutation
and `hf_to_meta` undoes it.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from llama_spec.config import LlamaConfig

# ---- Meta <-> JAX ---------------------------------------------------------------------------
# Meta Linear weights are (out, in); the JAX kernels are (in, out). Embedding and norms keep their shape.

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _jax_path(meta_name: str) -> tuple[str, ...]:
    m = _LAYER.fullmatch(meta_name)
    if m:
        parts = m.group(2).split(".")
        path = (f"layers_{m.group(1)}", *parts)
    else:
        path = tuple(meta_name.split("."))
    leaf = path[-1]
    if leaf != "weight":
        raise KeyError(f"{meta_name}: not a Meta Llama parameter name")
    if path[0] == "tok_embeddings":
        return ("tok_embeddings", "embedding")
    if path[-2].endswith("norm") or path[0] == "norm":
        return path  # (..., 'attention_norm', 'weight')
    return (*path[:-1], "kernel")


def _is_linear(meta_name: str) -> bool:
    return not (meta_name.startswith("tok_embeddings") or meta_name.endswith("norm.weight"))


def meta_to_jax(state: Mapping[str, np.ndarray]) -> dict:
    """Meta state dict -> nested parameter tree of the JAX model (global, unsharded shapes)."""
    tree: dict = {}
    for name, value in state.items():
        path = _jax_path(name)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value).T if _is_linear(name) else np.asarray(value)
    return tree


def meta_name_of(path: tuple[str, ...]) -> str:
    """A JAX parameter path ('layers_0', 'attention', 'wq', 'kernel') -> its Meta name (inverse of `_jax_path`)."""
    if path[0].startswith("layers_"):
        return "layers." + path[0][len("layers_"):] + "." + ".".join(path[1:-1]) + ".weight"
    if path[0] == "tok_embeddings":
        return "tok_embeddings.weight"
    return ".".join(path[:-1]) + ".weight"


def jax_to_meta(tree: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `meta_to_jax`."""
    state = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*path, key))
                continue
            name = meta_name_of((*path, key))
            state[name] = np.asarray(value).T if _is_linear(name) else np.asarray(value)

    walk(tree, ())
    return state


# ---- Meta <-> HF ----------------------------------------------------------------------------

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


_META_TO_HF = {
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
_TOP_META_TO_HF = {
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
            out[_TOP_META_TO_HF[name]] = value
            continue
        layer, rest = m.groups()
        if rest == "attention.wq.weight":
            value = _interleaved_to_halves(value, config.n_heads)
        elif rest == "attention.wk.weight":
            value = _interleaved_to_halves(value, config.n_kv_heads)
        out[f"model.layers.{layer}.{_META_TO_HF[rest]}"] = value
    return out


def hf_to_meta(state: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of `meta_to_hf`."""
    top = {v: k for k, v in _TOP_META_TO_HF.items()}
    per_layer = {v: k for k, v in _META_TO_HF.items()}
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
