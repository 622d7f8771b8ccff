"""Hugging Face transformers' LlamaForCausalLM as an oracle (eager attention, PyTorch), run as users run it.

Built from `config.to_hf()` the way `from_pretrained(dtype=...)` builds it and loaded with
`llama_spec.convert.meta_to_hf(weights)`; inputs and outputs are NumPy in Meta's conventions (q and k after RoPE
converted back to the interleaved layout). The numerics HF decides (bfloat16 RoPE phases, an additive finfo.min
mask, logits at the run dtype) are kept, since this oracle is HF as users run it. `forward(tokens, start_pos)` is
a fresh forward at shifted positions, with no cache: docs/internals.md#hugging-face-transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import transformers
from transformers.masking_utils import create_causal_mask
from transformers.models.llama import modeling_llama

from llama_spec.config import LlamaConfig
from llama_spec.convert import halves_to_interleaved_last_axis, interleaved_to_halves_last_axis, meta_to_hf
from reference.layers import ATTENTION_KEYS, captured, layer_state
from reference.torch_utils import capture, load_module, to_numpy, to_torch, torch_dtype


def hf_config(config: LlamaConfig) -> transformers.LlamaConfig:
    """transformers.LlamaConfig for `config`, eager attention."""
    return transformers.LlamaConfig(**config.to_hf(), attn_implementation="eager")


def _positions(start_pos: int, seqlen: int) -> torch.Tensor:
    return (start_pos + torch.arange(seqlen, dtype=torch.long))[None, :]


def _to_hf_heads(x, td: torch.dtype) -> torch.Tensor:
    """(B, S, heads, hd) Meta interleaved -> (B, heads, S, hd) HF halves, at dtype."""
    return to_torch(interleaved_to_halves_last_axis(np.asarray(x)), td).transpose(1, 2)


def _from_hf_heads(t: torch.Tensor) -> np.ndarray:
    """(B, heads, S, hd) HF halves -> (B, S, heads, hd) Meta interleaved, float32 NumPy."""
    return halves_to_interleaved_last_axis(to_numpy(t.transpose(1, 2)))


def _hf_layer_state(layer_weights: Mapping[str, np.ndarray], config: LlamaConfig, keys=None) -> dict:
    """Short-key Meta weights of one layer -> HF names relative to a LlamaDecoderLayer (q/k rows permuted)."""
    state = meta_to_hf(layer_state(layer_weights, 0, keys), config)
    return {name[len("model.layers.0."):]: value for name, value in state.items()}


def _build(cls, hc: transformers.LlamaConfig, td: torch.dtype, *args):
    """Construct an HF module with parameters created at dtype (as from_pretrained does; float32 buffers such as
    inv_freq stay float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(td)
    try:
        return cls(hc, *args)
    finally:
        torch.set_default_dtype(previous)


# ---- the full model ------------------------------------------------------------------------------


class HFReference:
    """HF LlamaForCausalLM at `dtype`, loaded with Meta-layout weights converted by `meta_to_hf` (or, by
    `from_checkpoint`, from a checkpoint directory by transformers itself)."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, np.ndarray], dtype: str):
        if config.tie_word_embeddings and not np.array_equal(weights["output.weight"],
                                                             weights["tok_embeddings.weight"]):
            raise ValueError("tie_word_embeddings=true but output.weight differs from tok_embeddings.weight: HF ties "
                             "them, so one would be silently dropped; pass weights whose output is the embedding")
        self.config = config
        self.dtype = str(dtype)
        self.torch_dtype = torch_dtype(dtype)
        self.hf_config = hf_config(config)
        model = transformers.LlamaForCausalLM._from_config(self.hf_config, dtype=self.torch_dtype)
        self.model = load_module(model, meta_to_hf(weights, config), self.torch_dtype, cast=False)
        self._check_inv_freq()

    def _check_inv_freq(self) -> None:
        inv_freq = self.model.model.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32:
            raise RuntimeError(f"HF rotary inv_freq is {inv_freq.dtype}; expected float32 as from_pretrained keeps it")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, dtype: str) -> "HFReference":
        """An HF checkpoint directory loaded by transformers alone: `LlamaForCausalLM.from_pretrained(directory,
        dtype=..., attn_implementation='eager')` reads config.json (either style), the safetensors (and index)
        and ties lm_head to the embedding when the config says so. `config` is None: the suite's parser is not
        consulted (`reference.config_check` compares the two readings)."""
        self = cls.__new__(cls)
        self.config, self.dtype, self.torch_dtype = None, str(dtype), torch_dtype(dtype)
        self.model = transformers.LlamaForCausalLM.from_pretrained(Path(directory), dtype=self.torch_dtype,
                                                                   attn_implementation="eager").eval()
        self.hf_config = self.model.config
        self._check_inv_freq()
        return self

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        """Logits (B, S, V) float32 of a fresh forward (no cache) at position_ids start_pos + arange(S), plus the
        named intermediates (reference/layers.py, q/k in Meta's interleaved layout) when `capture`."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
        kwargs = dict(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                      position_ids=_positions(start_pos, tokens.shape[1]), use_cache=False)
        if not capture:
            with torch.inference_mode():
                return to_numpy(self.model(**kwargs).logits)
        with self._capture() as store, torch.inference_mode():
            logits = to_numpy(self.model(**kwargs).logits)
        return logits, captured(store, self.hf_config.num_hidden_layers, "HF")

    __call__ = forward

    def _capture(self):
        """Hooks on HF's modules, and modeling_llama.apply_rotary_pos_emb wrapped while the forward runs (q and k
        come back in Meta's interleaved layout)."""
        inner = self.model.model
        outputs = {"embedding": inner.embed_tokens, "final_norm": inner.norm, "logits": self.model.lm_head}
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            outputs.update({p + "attention_norm": layer.input_layernorm, p + "attention_out": layer.self_attn.o_proj,
                            p + "ffn_norm": layer.post_attention_layernorm, p + "mlp_out": layer.mlp.down_proj,
                            p + "block_out": layer})
        return capture(outputs, [layer.self_attn for layer in inner.layers], modeling_llama, "apply_rotary_pos_emb",
                       _from_hf_heads)


# ---- components, for isolated tests ----------------------------------------------------------------


def hf_embedding(tokens, weight, dtype: str) -> np.ndarray:
    """LlamaModel's `embed_tokens` (a torch.nn.Embedding) with `weight` (vocab, dim) at dtype."""
    td = torch_dtype(dtype)
    vocab, dim = np.shape(weight)
    table = load_module(torch.nn.Embedding(vocab, dim), {"weight": weight}, td)
    with torch.inference_mode():
        return to_numpy(table(torch.from_numpy(np.asarray(tokens, np.int64))))


def hf_rms_norm(x, weight, eps: float, dtype: str) -> np.ndarray:
    td = torch_dtype(dtype)
    norm = load_module(modeling_llama.LlamaRMSNorm(np.shape(weight)[0], eps=eps), {"weight": weight}, td)
    with torch.inference_mode():
        return to_numpy(norm(to_torch(x, td)))


def hf_rope(q, k, config: LlamaConfig, dtype: str, start_pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LlamaRotaryEmbedding + apply_rotary_pos_emb at positions start_pos .. start_pos+S-1. q (B,S,H,hd) and
    k (B,S,KV,hd) in and out in Meta's interleaved layout (converted to HF's halves and back)."""
    td = torch_dtype(dtype)
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_config(config))  # float32 inv_freq, as in the model
    q_t, k_t = _to_hf_heads(q, td), _to_hf_heads(k, td)
    with torch.inference_mode():
        cos, sin = rotary(q_t, _positions(start_pos, q_t.shape[2]))
        q_out, k_out = modeling_llama.apply_rotary_pos_emb(q_t, k_t, cos, sin)
    return _from_hf_heads(q_out), _from_hf_heads(k_out)


def _run_layer(module, hc: transformers.LlamaConfig, x_chunks: Sequence, td: torch.dtype, start_pos: int,
               attention_only: bool) -> list[np.ndarray]:
    """Feed chunks through one LlamaAttention or LlamaDecoderLayer (layer_idx 0) sharing a DynamicCache, with
    the mask LlamaModel builds (create_causal_mask) and RoPE at start_pos + tokens before the chunk."""
    rotary = modeling_llama.LlamaRotaryEmbedding(hc)
    cache = transformers.DynamicCache(config=hc) if len(x_chunks) > 1 else None
    outputs, offset = [], 0
    with torch.inference_mode():
        for x in x_chunks:
            h = to_torch(x, td)
            positions = _positions(start_pos + offset, h.shape[1])
            # the mask is sized from the cache (offsets by cache length, not by position): build it before the
            # layer appends this chunk, as LlamaModel does
            mask = create_causal_mask(config=hc, inputs_embeds=h, attention_mask=None, cache=cache,
                                      position_ids=positions)
            embeddings = rotary(h, positions)
            if attention_only:
                out, _ = module(h, position_embeddings=embeddings, attention_mask=mask, cache=cache)
            else:
                out = module(h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None,
                             position_embeddings=embeddings)
            outputs.append(to_numpy(out))
            offset += h.shape[1]
    return outputs


def hf_attention(x_chunks: Sequence, layer_weights: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str,
                 start_pos: int = 0) -> list[np.ndarray]:
    """HF LlamaAttention (eager) with wq..wo from Meta-layout `layer_weights`; chunks one after another through
    a DynamicCache (one chunk: no cache). Returns o_proj's output per chunk."""
    td = torch_dtype(dtype)
    hc = hf_config(config)
    attention = _build(modeling_llama.LlamaAttention, hc, td, 0)
    state = {name[len("self_attn."):]: v for name, v in _hf_layer_state(layer_weights, config, ATTENTION_KEYS).items()}
    load_module(attention, state, td, cast=False)
    return _run_layer(attention, hc, x_chunks, td, start_pos, attention_only=True)


def hf_feed_forward(x, w1, w2, w3, dtype: str) -> np.ndarray:
    """HF LlamaMLP, down(silu(gate x) * up x), with Meta-layout (out, in) weights w1=gate, w3=up, w2=down."""
    td = torch_dtype(dtype)
    hidden, dim = np.shape(w1)
    hc = transformers.LlamaConfig(hidden_size=dim, intermediate_size=hidden, num_attention_heads=1,
                                  num_key_value_heads=1, hidden_act="silu", mlp_bias=False)
    mlp = load_module(modeling_llama.LlamaMLP(hc), {"gate_proj.weight": w1, "up_proj.weight": w3,
                                                    "down_proj.weight": w2}, td)
    with torch.inference_mode():
        return to_numpy(mlp(to_torch(x, td)))


def hf_block(x, layer_weights: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str,
             start_pos: int = 0) -> np.ndarray:
    """HF LlamaDecoderLayer on x (B,S,D), first token at position start_pos, no earlier context."""
    td = torch_dtype(dtype)
    hc = hf_config(config)
    layer = _build(modeling_llama.LlamaDecoderLayer, hc, td, 0)
    load_module(layer, _hf_layer_state(layer_weights, config), td, cast=False)
    return _run_layer(layer, hc, [x], td, start_pos, attention_only=False)[0]


def hf_head(x, norm_weight, output_weight, eps: float, dtype: str) -> np.ndarray:
    """LlamaModel's final LlamaRMSNorm, then LlamaForCausalLM's lm_head, at dtype."""
    td = torch_dtype(dtype)
    norm = load_module(modeling_llama.LlamaRMSNorm(np.shape(norm_weight)[0], eps=eps), {"weight": norm_weight}, td)
    vocab, dim = np.shape(output_weight)
    lm_head = load_module(torch.nn.Linear(dim, vocab, bias=False), {"weight": output_weight}, td)
    with torch.inference_mode():
        return to_numpy(lm_head(norm(to_torch(x, td))))
