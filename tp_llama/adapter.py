"""The adapter protocol: how the suite runs any JAX Llama 3.1 implementation (`pytest --impl MODULE:ATTR`).

`ATTR` is a factory: any object with `build(config, weights, mesh, dtype)` (a class with a classmethod `build`
is the usual shape). It receives
- `config`: a `llama_spec.config.LlamaConfig` (Meta's params.json fields; `head_dim`, `hidden_dim` derived);
- `weights`: Meta's checkpoint layout as float32 NumPy arrays keyed by Meta's names ('tok_embeddings.weight',
  'layers.0.attention.wq.weight', ...; Linear weights (out, in); RoPE pairs interleaved (2i, 2i+1));
- `mesh`: a `jax.sharding.Mesh` with axes ('data', 'model'), possibly spanning processes;
- `dtype`: 'float32' or 'bfloat16', for weights and activations,
and returns an adapter with

    forward(tokens, start_pos=0, capture=False)
        tokens: int32 NumPy (batch, seq), a fresh sequence at positions start_pos.. with no earlier context.
        Returns logits (batch, seq, vocab); with capture, (logits, intermediates) where intermediates maps
        names of reference/layers.py ('embedding', 'layers.{i}.q_rope', ..., 'final_norm') to arrays in Meta's
        layout. Any subset may be given: the names left out are reported as not checked.

and optionally a decode path (both methods, or neither):

    init_cache(batch, length) -> cache            an opaque KV cache for `length` positions
    step(tokens, start_pos, cache) -> (logits, cache)
        writes tokens (batch, seq) at positions start_pos.. and attends to every position before them.

Outputs may be NumPy or jax.Arrays of any sharding; the suite brings them to the host itself (across
processes in a multi-process run). `TPLlamaAdapter` is the built-in implementation of this protocol.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from llama_spec.config import LlamaConfig

BUILTIN = "tp_llama.adapter:TPLlamaAdapter"


@runtime_checkable
class LlamaAdapter(Protocol):
    def forward(self, tokens: np.ndarray, start_pos: int = 0, capture: bool = False) -> Any: ...


@runtime_checkable
class DecodingAdapter(Protocol):
    def init_cache(self, batch: int, length: int) -> Any: ...

    def step(self, tokens: np.ndarray, start_pos: int, cache: Any) -> tuple[Any, Any]: ...


class AdapterError(ValueError):
    """An --impl that cannot be loaded or does not follow the protocol; the message says what to fix."""


def load(spec: str):
    """'MODULE:ATTR' -> the factory object; AdapterError with the fix when it cannot be used."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AdapterError(f"--impl {spec!r}: expected MODULE:ATTR, for example {BUILTIN}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AdapterError(f"--impl {spec!r}: cannot import {module_name} ({err}); run pytest from a directory "
                           "where it is importable or install it") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise AdapterError(f"--impl {spec!r}: {module_name} has no attribute {attr}")
    if not callable(getattr(factory, "build", None)):
        raise AdapterError(f"--impl {spec!r}: {attr} has no build(config, weights, mesh, dtype); see "
                           "tp_llama/adapter.py for the protocol")
    return factory


def build(factory, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str):
    """factory.build(...), checked against the protocol."""
    adapter = factory.build(config, weights, mesh, dtype)
    name = getattr(factory, "__name__", type(factory).__name__)
    if not isinstance(adapter, LlamaAdapter):
        raise AdapterError(f"{name}.build returned {type(adapter).__name__}, which has no "
                           "forward(tokens, start_pos=0, capture=False)")
    partial = [m for m in ("init_cache", "step") if callable(getattr(adapter, m, None))]
    if len(partial) == 1:
        raise AdapterError(f"{type(adapter).__name__} has {partial[0]} but not "
                           f"{({'init_cache', 'step'} - set(partial)).pop()}; a decode path needs both")
    return adapter


def host(x) -> np.ndarray:
    """An adapter's output on this host as float32 (or its integer type), gathered across processes."""
    from tp_llama.distributed import to_host

    x = to_host(x)
    return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x


def forward(adapter, tokens: np.ndarray, start_pos: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and whatever intermediates the adapter captures, on the host; a bad return shape is an
    AdapterError."""
    out = adapter.forward(tokens, start_pos=start_pos, capture=True)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise AdapterError(f"{type(adapter).__name__}.forward(..., capture=True) must return (logits, dict of "
                           f"intermediates), got {type(out).__name__}")
    logits, taps = out
    return host(logits), {name: host(value) for name, value in taps.items()}


class TPLlamaAdapter:
    """The built-in tensor-parallel model (tp_llama.model.TPLlama) behind the protocol."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> "TPLlamaAdapter":
        from reference.convert import meta_to_jax
        from tp_llama.model import TPLlama

        model = TPLlama(config, mesh, dtype)
        return cls(model, model.place(meta_to_jax(weights)))

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        return self.model.forward(self.params, tokens, start_pos=start_pos, capture=capture)

    def init_cache(self, batch: int, length: int):
        return self.model.init_cache(batch, length)

    def step(self, tokens, start_pos: int, cache):
        tokens = np.asarray(tokens)
        batch, seq = tokens.shape
        length = cache[0][0].shape[1]
        positions = np.broadcast_to(start_pos + np.arange(seq), (batch, seq))
        valid = np.broadcast_to(np.arange(length) < start_pos + seq, (batch, length))
        return self.model.step(self.params, tokens, positions, cache, start_pos, valid)
