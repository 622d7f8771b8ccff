"""penzai 0.2.5's Llama (`penzai.models.transformer.variants.llama`), converted from transformers' PyTorch
`LlamaForCausalLM`, behind the adapter protocol (adapters/protocol.py).

Two factories, because penzai's documented converter refuses every Llama 3 model under transformers 5:
- `PenzaiLlama`: `llama.llama_from_huggingface_model(hf_model)`, the documented path. It compares
  `model.config.to_dict()` with `transformers.LlamaConfig()` and refuses any attribute it does not handle or ignore
  (variants/llama.py:65-98). Under transformers 5 that includes `rope_parameters` (where rope_theta now lives) and
  `dtype` (transformers 4's `torch_dtype`), so even an unscaled Llama 3 is refused, and Llama 3.1's llama3 scaling
  with it: building raises penzai's ValueError, which the suite records on every check
  (docs/findings/penzai-transformers-5-config.md).
- `PenzaiLlamaUnchecked`: what a user does to get past that check: `llamalike_common.llamalike_from_huggingface_model`
  (the converter llama.py delegates to, documented as doing no checks), after giving the HF config back the
  `rope_theta` attribute it reads (llamalike_common.py:600, `hf_config.rope_theta`; transformers 5 keeps it in
  `rope_parameters`). penzai's Llama has no llama3 RoPE scaling, so a scaled config runs unscaled: the suite
  measures it.

Sharding: penzai's own `toolshed.sharding_util.name_to_name_device_put`, its named axes mapped to the mesh:
'vocabulary' (embedding and lm_head), 'neurons' (gate/up/down) and the attention head axis ('heads' without GQA,
else 'head_groups' when the kv heads split evenly, else 'query_heads', k/v then replicated) on 'model', each only
when the axis divides; tokens' 'batch' on 'data' when it divides. XLA partitions the rest.

Intermediates: the model body is a `pz.nn.Sequential` (EmbeddingLookup, TransformerBlock per layer, RMSLayerNorm,
Linear), run sublayer by sublayer inside the jitted forward: 'embedding', 'layers.{i}.block_out' and 'final_norm'.
The finer taps (norms, q/k after RoPE, attention and MLP outputs) and the components are not offered; neither is
decode (penzai's sampling_mode cache is not wired into this adapter).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llama, llamalike_common
from penzai.toolshed import sharding_util

from adapters.hf_torch import from_pretrained, from_suite_config
from llama_spec.config import LlamaConfig

DATA, MODEL = "data", "model"


def checked_conversion(hf_model):
    """penzai's documented converter (raises its own ValueError on what it does not handle)."""
    return llama.llama_from_huggingface_model(hf_model)


def unchecked_conversion(hf_model):
    """penzai's llama-like converter without the attribute check, the HF config given back `rope_theta`."""
    config = hf_model.config
    if getattr(config, "rope_theta", None) is None:
        config.rope_theta = (config.rope_parameters or {})["rope_theta"]
    return llamalike_common.llamalike_from_huggingface_model(hf_model)


def axis_to_mesh(metadata: model_parts.TransformerMetadata, mesh) -> dict[str, str]:
    """penzai's named axes -> the mesh axis they are split on (module doc); an axis the mesh does not divide is
    left out (replicated)."""
    m = mesh.shape[MODEL]
    heads = metadata.common_head_axes | metadata.query_only_head_axes
    sizes = {"vocabulary": metadata.vocab_size, "neurons": metadata.mlp_hidden_dim}
    for name in ("heads", "head_groups", "query_heads"):
        if name in heads and heads[name] % m == 0:
            sizes[name] = heads[name]
            break
    return {name: MODEL for name, size in sizes.items() if size % m == 0}


class PenzaiLlamaAdapter:
    """A converted penzai TransformerLM, its parameters placed on the mesh by penzai's sharding utility."""

    def __init__(self, lm: model_parts.TransformerLM, mesh, dtype: str, source: str):
        self.mesh, self.dtype, self.source = mesh, dtype, source
        self.metadata = lm.metadata
        self.unbound, params = pz.unbind_params(lm)
        values = [p.freeze() for p in params]
        self.axis_map = axis_to_mesh(lm.metadata, mesh)
        self.params = sharding_util.name_to_name_device_put(values, mesh, self.axis_map)
        self._programs: dict[Any, Any] = {}  # jax.jit-wrapped functions (.lower for compiled_forward)

    def parameters(self) -> dict[str, jax.Array]:
        """penzai's own labels ('transformer/block_0/attention/query.weights', ...) -> placed arrays (penzai's
        named-axis shapes, e.g. query (head_groups, query_heads, projection, embedding))."""
        return {p.label: p.value.data_array for p in self.params}

    def _tokens(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        spec = P(DATA, None) if tokens.shape[0] % self.mesh.shape[DATA] == 0 else P()
        return jax.device_put(jnp.asarray(tokens), NamedSharding(self.mesh, spec))

    def _program(self, capture: bool) -> Any:
        if capture not in self._programs:
            unbound = self.unbound

            def forward(params, tokens, start_pos):
                model = pz.bind_variables(unbound, params)
                batch, seq = tokens.shape
                positions = pz.nx.wrap(jnp.broadcast_to(start_pos + jnp.arange(seq), (batch, seq))).tag("batch", "seq")
                x = pz.nx.wrap(tokens).tag("batch", "seq")
                taps, blocks = {}, 0
                sublayers = model.body.sublayers
                for i, sublayer in enumerate(sublayers):
                    x = sublayer(x, token_positions=positions)
                    if isinstance(sublayer, pz.nn.EmbeddingLookup):
                        taps["embedding"] = x
                    elif isinstance(sublayer, model_parts.TransformerBlock):
                        taps[f"layers.{blocks}.block_out"] = x
                        blocks += 1
                    elif i == len(sublayers) - 2:
                        taps["final_norm"] = x
                logits = x.untag("batch", "seq", "vocabulary").unwrap()
                if not capture:
                    return logits
                return logits, {name: v.untag("batch", "seq", "embedding").unwrap() for name, v in taps.items()}

            self._programs[capture] = jax.jit(forward)
        return self._programs[capture]

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        """A fresh sequence at token_positions start_pos.. (penzai's causal mask reads the same positions)."""
        return self._program(bool(capture))(self.params, self._tokens(tokens), jnp.int32(start_pos))

    def compiled_forward(self, batch: int, seq: int):
        tokens = self._tokens(np.zeros((batch, seq)))
        spec = jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=tokens.sharding)
        return self._program(False).lower(self.params, spec, jnp.int32(0)).compile()


# ---- the factories ----------------------------------------------------------------------------------------

class PenzaiLlama:
    """The documented path: LlamaForCausalLM (from the suite's config and weights) -> llama_from_huggingface_model."""

    package = "penzai"  # the distribution under test, for the JSON environment and the report title
    convert = staticmethod(checked_conversion)

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> PenzaiLlamaAdapter:
        return PenzaiLlamaAdapter(cls.convert(from_suite_config(config, weights, dtype)), mesh, dtype, "direct")

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> PenzaiLlamaAdapter:
        """transformers' from_pretrained(DIR), then penzai's converter: Hugging Face directories only."""
        if fmt != "hf":
            raise NotImplementedError(f"penzai converts a transformers LlamaForCausalLM, which loads Hugging Face "
                                      f"directories (config.json + safetensors), not {fmt!r} checkpoints")
        return PenzaiLlamaAdapter(cls.convert(from_pretrained(path, dtype)), mesh, dtype, f"hf:{path}")


class PenzaiLlamaUnchecked(PenzaiLlama):
    """The converter without penzai's attribute check (module doc): Llama 3.1's RoPE scaling is not applied."""

    convert = staticmethod(unchecked_conversion)

