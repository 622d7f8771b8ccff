"""The adapter protocol: how the suite runs any JAX Llama 3.1 implementation (`pytest --impl MODULE:ATTR`).

`ATTR` names a factory whose `build(config, weights, mesh, dtype, ...)` returns an adapter (`FACTORY_CONTRACT`
says what it receives). The adapter declares what it can do by the methods it has, one typed Protocol per
capability; only `forward` is required, and a check whose capability is missing ends **not checked**, naming it.
Tensors are exchanged in Meta's layout. conformance/contract_page.py renders this module as docs/contract.md
(docs/contract.md#the-factory).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from llama_spec.config import LlamaConfig

BUILTIN = "tp_llama.adapter:TPLlamaAdapter"

# What a factory receives and what an adapter promises: the "factory" section of docs/contract.md.
FACTORY_CONTRACT = """\
The adapter protocol: how the suite runs any JAX Llama 3.1 implementation (`pytest --impl MODULE:ATTR`).

`ATTR` names a factory: any object with

    build(config, weights, mesh, dtype, *, max_batch_size=..., max_seq_len=...) -> adapter

(a class with a classmethod `build` is the usual shape). It receives
- `config`: a `llama_spec.config.LlamaConfig` (Meta's params.json fields; `head_dim`, `hidden_dim` derived);
- `weights`: Meta's checkpoint layout as float32 NumPy arrays keyed by Meta's names ('tok_embeddings.weight',
  'layers.0.attention.wq.weight', ...; Linear weights (out, in); RoPE pairs interleaved (2i, 2i+1));
- `mesh`: a `jax.sharding.Mesh` with axes ('data', 'model'), possibly spanning processes — the adapter must
  place its parameters and run its programs on exactly this mesh;
- `dtype`: 'float32' or 'bfloat16', for weights and activations;
- `max_batch_size`, `max_seq_len`: the largest batch and the longest sequence (positions included) the suite
  will ask for, for implementations that size caches or tables up front. Passed only when `build` accepts them.

A factory may also offer `build_from_checkpoint(path, mesh, dtype, format, *, max_batch_size, max_seq_len)`:
the suite writes a checkpoint directory ('meta': params.json + consolidated.NN.pth; 'hf': config.json +
safetensors, in either config style) and the implementation loads it with its own loader.

The adapter declares what it can do by the methods it has; each capability is one typed Protocol below. Only
`forward` is required. A check whose capability is missing ends **not checked**, naming the capability —
never passed, never run on another implementation. Inputs are NumPy arrays; outputs may be NumPy or
jax.Arrays of any sharding (the suite brings them to the host, across processes in a multi-process run).
Tensors are exchanged in Meta's layout: heads interleave RoPE pairs (2i, 2i+1), q/k are (batch, seq, heads,
head_dim), hidden states (batch, seq, dim). `tp_llama.adapter.TPLlamaAdapter` implements every capability.
"""


@runtime_checkable
class Forward(Protocol):
    """Required. tokens: int32 (batch, seq), a fresh sequence at positions start_pos.. with no earlier context.
    Returns logits (batch, seq, vocab); with capture, (logits, intermediates): names of reference/layers.py
    ('embedding', 'layers.{i}.q_rope', ..., 'final_norm') to arrays in Meta's layout, any subset (the names
    left out are reported as not checked)."""

    def forward(self, tokens: np.ndarray, start_pos: int = 0, capture: bool = False) -> Any: ...


@runtime_checkable
class Decode(Protocol):
    """A KV-cache decode path. `init_cache(batch, length)` gives an empty cache of `length` slots; `step` writes
    tokens (batch, seq) into slots start_pos.. and attends to every written slot up to them, returning
    (logits, new cache). Slot s of row i holds RoPE position `offset + s - pad[i]`:
    - `pad` (batch,) ints: row i's first pad[i] slots are left padding, never attended to (batches of prompts
      of different lengths);
    - `offset`: a sequence that starts at a RoPE position past 0 with no earlier context (long-context
      positions without a long prefix).
    Both are optional keywords: a step that does not accept one is not checked on the cases that need it."""

    def init_cache(self, batch: int, length: int) -> Any: ...

    def step(self, tokens: np.ndarray, start_pos: int, cache: Any, *, pad: np.ndarray | None = None,
             offset: int = 0) -> tuple[Any, Any]: ...


# One Protocol per component, so an adapter may offer any subset. Each runs that component of the built
# model, with its own loaded weights of layer `layer`, on the mesh, on the given (replicated) inputs.

@runtime_checkable
class EmbeddingComponent(Protocol):
    def embed(self, tokens: np.ndarray) -> Any:
        """The token embedding lookup: int32 tokens (batch, seq) -> hidden (batch, seq, dim), the vocabulary split
        over the model axis as the implementation splits it (each shard looks up its own rows)."""


@runtime_checkable
class RMSNormComponent(Protocol):
    def rms_norm(self, x: np.ndarray, layer: int, which: str) -> Any:
        """which: 'attention_norm' or 'ffn_norm' of `layer`, or 'norm' (the final norm; layer ignored)."""


@runtime_checkable
class RoPEComponent(Protocol):
    def rope(self, q: np.ndarray, k: np.ndarray, start_pos: int) -> tuple[Any, Any]:
        """q (batch, seq, n_heads, head_dim), k (batch, seq, n_kv_heads, head_dim) at positions start_pos..."""


@runtime_checkable
class AttentionComponent(Protocol):
    def attention(self, chunks: Sequence[np.ndarray], layer: int, start_pos: int) -> list[Any]:
        """The layer's attention (q/k/v, RoPE, GQA, causal softmax, wo and its all-reduce; no norm, no residual)
        over consecutive chunks of one sequence (batch, seq_i, dim): chunks after the first read the KV cache
        written by earlier ones. The first token sits at RoPE position start_pos with no earlier context."""


@runtime_checkable
class FeedForwardComponent(Protocol):
    def feed_forward(self, x: np.ndarray, layer: int) -> Any:
        """SwiGLU: w2(silu(w1 x) * w3 x), no norm, no residual."""


@runtime_checkable
class BlockComponent(Protocol):
    def block(self, x: np.ndarray, layer: int, start_pos: int) -> Any:
        """One whole transformer block (both norms and residuals) on a fresh sequence at positions start_pos.."""


@runtime_checkable
class HeadComponent(Protocol):
    def head(self, h: np.ndarray) -> Any:
        """Final RMSNorm then the output projection: hidden (batch, seq, dim) -> logits (batch, seq, vocab)."""


@runtime_checkable
class CompiledProgram(Protocol):
    def compiled_forward(self, batch: int, seq: int) -> Any:
        """The program `forward(tokens)` runs for int32 tokens of this shape, compiled for the mesh: a
        `jax.stages.Compiled` (or `Lowered`, or its optimised HLO text). The communication check reads it."""


@runtime_checkable
class Parameters(Protocol):
    def parameters(self) -> Mapping[str, Any]:
        """The placed parameters as jax.Arrays, keyed by Meta's names where the implementation has one tensor per
        Meta tensor (any orientation), else by its own names; the sharding check reads their placement."""


CAPABILITIES: dict[str, type] = {
    "forward": Forward,
    "decode": Decode,
    "embed": EmbeddingComponent,
    "rms_norm": RMSNormComponent,
    "rope": RoPEComponent,
    "attention": AttentionComponent,
    "feed_forward": FeedForwardComponent,
    "block": BlockComponent,
    "head": HeadComponent,
    "compiled_forward": CompiledProgram,
    "parameters": Parameters,
}


class AdapterError(ValueError):
    """An --impl that cannot be loaded or does not follow the protocol; the message says what to fix."""


def name_of(obj) -> str:
    return getattr(obj, "__name__", type(obj).__name__)


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
                           "adapters/protocol.py for the protocol")
    return factory


def describe(spec: str) -> dict[str, str | None]:
    """The implementation under test for the JSON environment and the report title: factory, package, version.
    The package is the factory's `package` attribute (the distribution it runs, e.g. 'keras-hub') if it has one,
    else the top-level module of MODULE."""
    from importlib import metadata

    package = getattr(load(spec), "package", None) or spec.partition(":")[0].split(".")[0]
    version: str | None
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        module = importlib.import_module(package)
        version = getattr(module, "__version__", None)
    return {"factory": spec, "package": package, "version": version}


def _limits(method, max_batch_size: int | None, max_seq_len: int | None) -> dict[str, int]:
    """The size hints `method` accepts (by name or **kwargs)."""
    params = inspect.signature(method).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = {"max_batch_size": max_batch_size, "max_seq_len": max_seq_len}
    return {k: v for k, v in hints.items() if v is not None and (takes_any or k in params)}


def accepted_hints(factory) -> list[str]:
    """The size hints (max_batch_size, max_seq_len) the factory's `build` takes; the others it is never given."""
    return list(_limits(factory.build, 1, 1))


def checked(adapter, source: str):
    """The adapter if it follows the protocol, else AdapterError naming what is wrong."""
    if not isinstance(adapter, Forward):
        raise AdapterError(f"{source} returned {type(adapter).__name__}, which has no "
                           "forward(tokens, start_pos=0, capture=False)")
    partial = [m for m in ("init_cache", "step") if callable(getattr(adapter, m, None))]
    if len(partial) == 1:
        raise AdapterError(f"{type(adapter).__name__} has {partial[0]} but not "
                           f"{({'init_cache', 'step'} - set(partial)).pop()}; a decode path needs both")
    return adapter


def build(factory, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str, *,
          max_batch_size: int | None = None, max_seq_len: int | None = None):
    """factory.build(...), checked against the protocol."""
    adapter = factory.build(config, weights, mesh, dtype,
                            **_limits(factory.build, max_batch_size, max_seq_len))
    return checked(adapter, f"{name_of(factory)}.build")


def build_from_checkpoint(factory, path, mesh, dtype: str, fmt: str, *, max_batch_size: int | None = None,
                          max_seq_len: int | None = None):
    """factory.build_from_checkpoint(...), checked; None when the factory has no checkpoint loader."""
    method = getattr(factory, "build_from_checkpoint", None)
    if not callable(method):
        return None
    adapter = method(path, mesh, dtype, fmt, **_limits(method, max_batch_size, max_seq_len))
    return checked(adapter, f"{name_of(factory)}.build_from_checkpoint")


def missing(adapter, capability: str) -> str | None:
    """None when the adapter has the capability, else the reason it is not checked (names the methods)."""
    protocol = CAPABILITIES[capability]
    if isinstance(adapter, protocol):
        return None
    methods = ", ".join(sorted(m for m in protocol.__dict__ if not m.startswith("_") and callable(
        protocol.__dict__[m])))
    return f"not checked: {type(adapter).__name__} has no {capability} capability ({methods})"


def step_accepts(adapter, keyword: str) -> bool:
    """Whether the decode step takes `pad` or `offset` (see Decode)."""
    params = inspect.signature(adapter.step).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def dtype_of(x) -> str:
    """The element type an output came back in ('bfloat16', 'float32', ...)."""
    return np.dtype(getattr(x, "dtype", np.asarray(x).dtype)).name


def forward(adapter, tokens: np.ndarray, start_pos: int = 0) -> tuple[Any, dict[str, Any]]:
    """Raw logits and intermediates (before any host transfer); a bad return shape is an AdapterError."""
    out = adapter.forward(tokens, start_pos=start_pos, capture=True)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise AdapterError(f"{type(adapter).__name__}.forward(..., capture=True) must return (logits, dict of "
                           f"intermediates), got {type(out).__name__}")
    return out
