"""Implementations planted with one fault of the kind a check exists for, each the built-in model otherwise: the
suite's own checks must fail them (conformance/test_build_invariance.py, test_position.py, test_pooled.py), as
they would any --impl with that fault.

- `UnscaledRoPEAdapter` — ignores the config's Llama 3.1 RoPE scaling (rope_scaling=None): at bfloat16 each
  failing record alone sits near the rounding noise; the pooled diagnosis (parity.pooled) names it.
- `ContextScaledRoPEAdapter` — applies the RoPE scaling only when built for more positions than the original
  context (max_seq_len > original_max_position_embeddings), with Meta ModelArgs' default max_seq_len 2048: the
  same weights built for 2048 or 8192 positions compute other logits than built for 131072.
- `PreallocatedCacheAdapter` — allocates a KV cache of max_batch_size x max_seq_len slots at build (as Meta's
  Transformer does): right numbers, but a build for 131,072 positions holds 2 x 4 x 131072 x 2 x 16 x 2 values.
"""
from __future__ import annotations

from tp_llama.adapter import TPLlamaAdapter

META_DEFAULT_MAX_SEQ_LEN = 2048  # llama_models.llama3.args.ModelArgs.max_seq_len


class UnscaledRoPEAdapter(TPLlamaAdapter):
    @classmethod
    def build(cls, config, weights, mesh, dtype):
        return super().build(config.replace(rope_scaling=None), weights, mesh, dtype)


class ContextScaledRoPEAdapter(TPLlamaAdapter):
    @classmethod
    def build(cls, config, weights, mesh, dtype, *, max_batch_size=1, max_seq_len=META_DEFAULT_MAX_SEQ_LEN):
        scaling = config.rope_scaling
        if scaling is not None and max_seq_len <= scaling.original_max_position_embeddings:
            config = config.replace(rope_scaling=None)
        return super().build(config, weights, mesh, dtype)


class PreallocatedCacheAdapter(TPLlamaAdapter):
    preallocated: object = None  # the cache allocated at build, kept alive with the adapter

    @classmethod
    def build(cls, config, weights, mesh, dtype, *, max_batch_size=1, max_seq_len=META_DEFAULT_MAX_SEQ_LEN):
        built = super().build(config, weights, mesh, dtype)
        adapter = cls(built.model, built.params)
        adapter.preallocated = adapter.init_cache(max_batch_size, max_seq_len)
        return adapter
