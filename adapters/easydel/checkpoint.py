"""What EasyDeL is given: its LlamaConfig arguments for a suite config, and the suite's Meta weights as EasyDeL's
parameter paths. No easydel or jax import here: the mapping is plain data and NumPy, readable and testable anywhere.

EasyDeL 0.3.0's Llama keeps one kernel per Meta tensor, in HF's naming with (in, out) kernels, and rotates halves
as HF does, so wq and wk get HF's row permutation (llama_spec.convert.meta_to_hf) before the transpose. The path
and shape table: docs/adapter-internals.md#easydel-parameters.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from adapters.hf_checkpoint import rope_scaling_of, tied
from llama_spec.config import LlamaConfig
from llama_spec.convert import meta_to_hf

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def config_kwargs(config: LlamaConfig, dtype: str) -> dict[str, Any]:
    """easydel.LlamaConfig's arguments for a suite config: every Llama 3.1 field, the RoPE scaling in HF's
    llama3 form, and the attention in `dtype` (EasyDeL's `attn_dtype` defaults to bfloat16 whatever the model's
    dtype; a float32 user sets it, as the docstring of EasyDeLBaseConfig says)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=tied(config), attn_dtype=dtype, attn_softmax_dtype="float32")
    scaling = rope_scaling_of(config)
    if scaling is not None:
        kwargs["rope_scaling"] = {"rope_type": "llama3", **scaling}
    return kwargs


def easydel_path(hf_name: str) -> str:
    """The EasyDeL parameter path ('/'-joined nnx state path) of an HF LlamaForCausalLM tensor name."""
    top = {"model.embed_tokens.weight": "model/embed_tokens/embedding", "lm_head.weight": "lm_head/kernel",
           "model.norm.weight": "model/norm/kernel"}
    if hf_name in top:
        return top[hf_name]
    m = _HF_LAYER.fullmatch(hf_name)
    if not m:
        raise KeyError(f"{hf_name}: not an HF Llama parameter name")
    return f"model/layers/{m.group(1)}/{m.group(2).replace('.', '/')}/kernel"


def easydel_weights(weights: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Meta state dict -> {EasyDeL parameter path: float32 value}; Linear weights transposed to (in, out). With
    tied embeddings, output.weight is not a parameter."""
    out = {}
    for name, value in meta_to_hf(weights, config).items():
        if name == "lm_head.weight" and tied(config):
            continue
        value = np.asarray(value, np.float32)
        out[easydel_path(name)] = value if name.endswith(("norm.weight", "embed_tokens.weight")) else value.T
    return out
