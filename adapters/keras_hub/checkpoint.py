"""What keras-hub is given: its backbone arguments for a suite config and the suite's Meta weights in keras-hub's
variable layout (the HF checkpoint directories for its Hugging Face converter come from adapters.hf_checkpoint).

No keras or keras-hub import here: the mapping is plain data and NumPy, so it can be read and tested without them.
keras-hub keeps one variable per Meta tensor and rotates halves as HF does, so wq and wk get HF's row permutation
(llama_spec.convert.meta_to_hf) before the transpose. The name and shape table:
docs/adapter-internals.md#keras-hub-variables.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from adapters.hf_checkpoint import rope_scaling_of, tied
from llama_spec.config import LlamaConfig

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def backbone_kwargs(config: LlamaConfig) -> dict[str, Any]:
    """Llama3Backbone's arguments for a suite config: every field that keras-hub's backbone takes (head_dim it
    derives as hidden_dim / num_query_heads, which is the suite's definition too)."""
    kwargs = dict(vocabulary_size=config.vocab_size, num_layers=config.n_layers, num_query_heads=config.n_heads,
                  hidden_dim=config.dim, intermediate_dim=config.hidden_dim, num_key_value_heads=config.n_kv_heads,
                  rope_max_wavelength=config.rope_theta, layer_norm_epsilon=config.norm_eps,
                  tie_word_embeddings=tied(config))
    scaling = rope_scaling_of(config)
    if scaling is not None:
        kwargs.update(rope_frequency_adjustment_factor=scaling["factor"],
                      rope_low_freq_factor=scaling["low_freq_factor"],
                      rope_high_freq_factor=scaling["high_freq_factor"],
                      rope_pretraining_sequence_length=scaling["original_max_position_embeddings"])
    return kwargs


def _halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved RoPE rows of wq/wk -> the half layout keras-hub (and HF) rotate."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def keras_path(meta_name: str) -> str:
    """The keras-hub variable path (`variable.path`) holding a Meta tensor."""
    top = {"tok_embeddings.weight": "token_embedding/embeddings",
           "output.weight": "token_embedding/reverse_embeddings",
           "norm.weight": "sequence_output_layernorm/scale"}
    if meta_name in top:
        return top[meta_name]
    m = _LAYER.fullmatch(meta_name)
    per_layer = {"attention.wq.weight": "self_attention/query/kernel",
                 "attention.wk.weight": "self_attention/key/kernel",
                 "attention.wv.weight": "self_attention/value/kernel",
                 "attention.wo.weight": "self_attention/attention_output/kernel",
                 "feed_forward.w1.weight": "feedforward_gate_dense/kernel",
                 "feed_forward.w3.weight": "feedforward_intermediate_dense/kernel",
                 "feed_forward.w2.weight": "feedforward_output_dense/kernel",
                 "attention_norm.weight": "self_attention_layernorm/scale",
                 "ffn_norm.weight": "feedforward_layernorm/scale"}
    if not m or m.group(2) not in per_layer:
        raise KeyError(f"{meta_name}: not a Meta Llama parameter name")
    return f"transformer_layer_{m.group(1)}/{per_layer[m.group(2)]}"


def keras_value(meta_name: str, value: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """A Meta tensor (Linear weights (out, in), interleaved RoPE rows) as keras-hub's variable holds it."""
    value = np.asarray(value, np.float32)
    d, hd = config.dim, config.head_dim
    m = _LAYER.fullmatch(meta_name)
    rest = m.group(2) if m else meta_name
    if rest == "output.weight":
        return value.T
    if rest == "attention.wq.weight":
        return _halves(value, config.n_heads).T.reshape(d, config.n_heads, hd)
    if rest == "attention.wk.weight":
        return _halves(value, config.n_kv_heads).T.reshape(d, config.n_kv_heads, hd)
    if rest == "attention.wv.weight":
        return value.T.reshape(d, config.n_kv_heads, hd)
    if rest == "attention.wo.weight":
        return value.T.reshape(config.n_heads, hd, d)
    if rest.startswith("feed_forward."):
        return value.T
    return value  # embedding and norms


def keras_weights(weights: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Meta state dict -> {keras-hub variable path: value}. With tied embeddings, output.weight is not a variable."""
    return {keras_path(name): keras_value(name, value, config) for name, value in weights.items()
            if not (name == "output.weight" and tied(config))}
