"""Tensor-parallel Llama 3.1: Flax linen modules over local shards, wrapped in one `jax.shard_map`.

The modules see per-device shapes only. Column-parallel layers (wq, wk, wv, w1, w3) need no communication;
row-parallel layers (wo, w2) end in one all-reduce over the model axis; the embedding is vocab-parallel
(masked local lookup, then all-reduce) and the logits stay sharded on vocab. The same code serves a 1x1
mesh (the single-chip model) and any DxM mesh.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_spec.config import LlamaConfig
from tp_llama import layers
from tp_llama.shardings import (
    ACTIVATION_AXES,
    DATA,
    MODEL,
    check_splittable,
    kv_replication,
    make_mesh,
    param_specs,
    parse_mesh,
    place_params,
    spec,
)

# Named intermediates per layer, in computation order; also the names every reference captures.
LAYER_TAPS = ("attention_norm", "q_rope", "k_rope", "attention_out", "ffn_norm", "mlp_out", "block_out")
HEAD_TAPS = {"q_rope": "q_heads", "k_rope": "kv_heads"}
TAP_PREFIX = "tap_"


def all_reduce(x: jax.Array, site: str) -> jax.Array:
    """Sum partial results over the model axis; `site` ('embedding', 'wo' or 'w2') names the caller."""
    return jax.lax.psum(x, MODEL)


def vocab_shard_start(local_vocab: int) -> jax.Array:
    """First vocab id held by this device: shards are laid out in model-axis order."""
    return jax.lax.axis_index(MODEL) * local_vocab


def tap(module: nn.Module, name: str, value: jax.Array) -> None:
    """Record a named intermediate (the prefix keeps tap names apart from submodule names)."""
    module.sow("intermediates", TAP_PREFIX + name, value)


# Weights always come from a weight set (fixtures or a checkpoint); the initialiser only states local shapes,
# which Flax checks against the parameters it is given.
_SHAPE_ONLY = nn.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class ShardDims:
    """Per-device sizes under an M-way model axis."""
    config: LlamaConfig
    model_parallel: int

    @property
    def heads(self) -> int:
        return self.config.n_heads // self.model_parallel

    @property
    def kv_heads(self) -> int:
        return self.config.n_kv_heads * kv_replication(self.config, self.model_parallel) // self.model_parallel

    @property
    def hidden(self) -> int:
        return self.config.hidden_dim // self.model_parallel

    @property
    def vocab(self) -> int:
        return self.config.vocab_size // self.model_parallel


class Linear(nn.Module):
    """A bias-free projection on local features; returns float32 so row-parallel sums round once."""
    in_features: int
    out_features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _SHAPE_ONLY, (self.in_features, self.out_features))
        return layers.matmul_f32(x, kernel)


class RMSNorm(nn.Module):
    dim: int
    eps: float

    @nn.compact
    def __call__(self, x):
        return layers.rms_norm(x, self.param("weight", _SHAPE_ONLY, (self.dim,)), self.eps)


class VocabParallelEmbed(nn.Module):
    dims: ShardDims

    @nn.compact
    def __call__(self, tokens, dtype):
        table = self.param("embedding", _SHAPE_ONLY, (self.dims.vocab, self.dims.config.dim))
        local = tokens - vocab_shard_start(self.dims.vocab)
        mine = (local >= 0) & (local < self.dims.vocab)
        rows = jnp.take(table, jnp.clip(local, 0, self.dims.vocab - 1), axis=0)
        return all_reduce(jnp.where(mine[..., None], rows, 0).astype(jnp.float32), "embedding").astype(dtype)


class Attention(nn.Module):
    dims: ShardDims

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """Returns (output after the all-reduce, updated (k, v) cache or None)."""
        dim, hd, heads, kv = self.dims.config.dim, self.dims.config.head_dim, self.dims.heads, self.dims.kv_heads
        b, s, _ = x.shape
        q = Linear(dim, heads * hd, name="wq")(x).astype(x.dtype).reshape(b, s, heads, hd)
        k = Linear(dim, kv * hd, name="wk")(x).astype(x.dtype).reshape(b, s, kv, hd)
        v = Linear(dim, kv * hd, name="wv")(x).astype(x.dtype).reshape(b, s, kv, hd)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        tap(self, "q_rope", q)
        tap(self, "k_rope", k)
        if cache is not None:
            cache = (layers.write_cache(cache[0], k, cache_index), layers.write_cache(cache[1], v, cache_index))
            k, v = cache
        out = layers.attention(q, k, v, mask)
        return all_reduce(Linear(heads * hd, dim, name="wo")(out), "wo").astype(x.dtype), cache


class FeedForward(nn.Module):
    dims: ShardDims

    @nn.compact
    def __call__(self, x):
        dim, hidden = self.dims.config.dim, self.dims.hidden
        gate = Linear(dim, hidden, name="w1")(x).astype(x.dtype)
        up = Linear(dim, hidden, name="w3")(x).astype(x.dtype)
        return all_reduce(Linear(hidden, dim, name="w2")(layers.swiglu(gate, up)), "w2").astype(x.dtype)


class Block(nn.Module):
    dims: ShardDims

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        dim, eps = self.dims.config.dim, self.dims.config.norm_eps
        normed = RMSNorm(dim, eps, name="attention_norm")(x)
        attn, cache = Attention(self.dims, name="attention")(normed, cos, sin, mask, cache, cache_index)
        h = x + attn
        normed_ffn = RMSNorm(dim, eps, name="ffn_norm")(h)
        mlp = FeedForward(self.dims, name="feed_forward")(normed_ffn)
        out = h + mlp
        for name, value in (("attention_norm", normed), ("attention_out", attn), ("ffn_norm", normed_ffn),
                           ("mlp_out", mlp), ("block_out", out)):
            tap(self, name, value)
        return out, cache


class Transformer(nn.Module):
    """Llama 3.1 on local shards; call it inside shard_map over a ('data', 'model') mesh."""
    dims: ShardDims
    dtype: Any

    @nn.compact
    def __call__(self, tokens, positions, kv_valid, q_slots, cache=None, cache_index=None):
        config = self.dims.config
        h = VocabParallelEmbed(self.dims, name="tok_embeddings")(tokens, self.dtype)
        tap(self, "embedding", h)
        freqs = layers.rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        cos, sin = layers.rope_angles(positions, freqs)
        mask = layers.causal_mask(q_slots, kv_valid)
        new_cache = []
        for i in range(config.n_layers):
            layer_cache = None if cache is None else cache[i]
            h, layer_cache = Block(self.dims, name=f"layers_{i}")(h, cos, sin, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        h = RMSNorm(config.dim, config.norm_eps, name="norm")(h)
        tap(self, "final_norm", h)
        # Vocab-parallel logits: each device computes its vocab columns; they stay sharded.
        logits = Linear(config.dim, self.dims.vocab, name="output")(h).astype(self.dtype)
        return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))


def _flatten_taps(sown: dict) -> dict[str, jax.Array]:
    """Flax's sown tree {'layers_0': {'attention': {'tap_q_rope': (x,)}}} -> {'layers.0.q_rope': x}."""
    flat = {}

    def walk(node, layer):
        for key, value in node.items():
            if isinstance(value, tuple):
                name = key.removeprefix(TAP_PREFIX)
                flat[name if layer is None else f"layers.{layer}.{name}"] = value[0]
            else:
                walk(value, key.split("_", 1)[1] if key.startswith("layers_") else layer)

    walk(sown, None)
    return flat


def tap_axes(name: str) -> tuple[str, ...]:
    leaf = name.rsplit(".", 1)[-1]
    return ACTIVATION_AXES[HEAD_TAPS.get(leaf, "hidden")]


# Jitted programs are shared by every TPLlama of one config, mesh and dtype in a process: the suite builds such
# models again and again (per test module, per checkpoint form, per adapter), and tracing a new instance's programs
# (about 0.3 s each, even when XLA loads the executable from the persistent cache) was most of the checkpoint
# hand-off's time. A program is traced from the functions of tp_llama.layers and of this module as they are; a
# planted bug (conformance/mutants.py swaps one of them) changes the fingerprint, so a program traced before the
# swap never runs after it, nor one traced under the swap after it is undone. Least recently used programs go first.
MAX_SHARED_PROGRAMS = 256
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _code_fingerprint() -> tuple:
    return tuple(id(v) for module in (layers, sys.modules[__name__]) for v in vars(module).values() if callable(v))


# Config fields no traced program reads: the SwiGLU width is read as hidden_dim, however it was derived, and positions
# and cache lengths are arguments. One checkpoint read as Meta's params.json (no max_seq_len) or as HF's config.json
# (intermediate_size, so multiple_of = hidden_dim) is then one program, not three.
_UNTRACED_FIELDS = ("multiple_of", "ffn_dim_multiplier", "max_seq_len")


def program_config(config: LlamaConfig) -> tuple:
    """What of `config` a program depends on (tests/test_mutants.py checks that the rest leaves the HLO alone)."""
    fields = [f.name for f in dataclasses.fields(config) if f.name not in _UNTRACED_FIELDS]
    kept = tuple((name, getattr(config, name)) for name in fields)
    return kept + (("hidden_dim", config.hidden_dim),)


def shared_program(model: "TPLlama", key: tuple, build: Callable[[], Callable]) -> Callable:
    """The program `build()` makes for `model` and `key`, made once for all models of its program config, mesh and
    dtype."""
    full_key = (program_config(model.config), model.mesh, model.dtype, _code_fingerprint(), key)
    if full_key in _PROGRAMS:
        _PROGRAMS.move_to_end(full_key)
    else:
        _PROGRAMS[full_key] = build()
        if len(_PROGRAMS) > MAX_SHARED_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    return _PROGRAMS[full_key]


def _on_host_unless_on_device(x, dtype):
    """An input of the jitted programs as `dtype`: converted by numpy when it is on the host. Converting or building
    host inputs with jnp compiles a small eager program for every new shape (up to four per forward shape, which
    the suite meets by the hundred); a device array stays where it is."""
    return jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype)


class TPLlama:
    """The model under test bound to a config, a mesh and a dtype."""

    def __init__(self, config: LlamaConfig, mesh, dtype="float32"):
        self.config = config
        self.mesh = mesh
        self.dtype = jnp.dtype(dtype)
        self.data_parallel = mesh.shape[DATA]
        self.model_parallel = mesh.shape[MODEL]
        check_splittable(config, self.model_parallel)
        self.dims = ShardDims(config, self.model_parallel)
        self.module = Transformer(self.dims, self.dtype)
        self.mesh_name = f"{self.data_parallel}x{self.model_parallel}"

    @classmethod
    def on_mesh(cls, config: LlamaConfig, mesh_text: str, dtype="float32"):
        parse_mesh(mesh_text)
        return cls(config, make_mesh(mesh_text), dtype)

    # ---- weights ---------------------------------------------------------------------------

    def place(self, tree) -> dict:
        """Host parameter tree (global shapes) -> device arrays sharded by the contract."""
        return place_params(tree, self.config, self.mesh, self.dtype)

    # ---- forward ---------------------------------------------------------------------------

    def _check_batch(self, batch: int):
        if batch % self.data_parallel:
            raise ValueError(f"batch {batch} is not divisible by the data axis {self.data_parallel} of mesh "
                             f"{self.mesh_name}")

    @functools.cached_property
    def _param_specs(self):
        return param_specs(self.config)

    def _tap_specs(self):
        names = ["embedding", "final_norm"] + [f"layers.{i}.{t}" for i in range(self.config.n_layers)
                                               for t in LAYER_TAPS]
        return {name: spec(tap_axes(name)) for name in names}

    def _sharded(self, capture: bool, with_cache: bool):
        """The jitted shard_map'd forward, built once per (capture, with_cache) (shared_program)."""
        return shared_program(self, ("forward", capture, with_cache), lambda: self._build_sharded(capture, with_cache))

    def _build_sharded(self, capture: bool, with_cache: bool):
        batch_spec = spec(ACTIVATION_AXES["tokens"])
        cache_spec = spec(ACTIVATION_AXES["kv_cache"])
        cache_specs = tuple((cache_spec, cache_spec) for _ in range(self.config.n_layers)) if with_cache else None
        logits_spec = spec(ACTIVATION_AXES["logits"])

        def local(params, tokens, positions, kv_valid, q_slots, kv_cache, cache_index):
            (logits, new_cache), state = self.module.apply(
                {"params": params}, tokens, positions, kv_valid, q_slots, kv_cache, cache_index,
                mutable=["intermediates"])
            taps = _flatten_taps(state.get("intermediates", {})) if capture else {}
            return logits, new_cache, taps

        in_specs = (self._param_specs, batch_spec, batch_spec, batch_spec, batch_spec, cache_specs, spec(()))
        out_specs = (logits_spec, cache_specs, self._tap_specs() if capture else {})
        return jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs),
                       donate_argnums=(5,) if with_cache else ())

    def forward(self, params, tokens, start_pos: int = 0, capture: bool = False, kv_valid=None):
        """Full forward without a cache: logits (B, S, V) float32, sharded on vocab, and named intermediates.

        Positions are start_pos + arange(S) (what a reference sees at that offset without a cache).
        """
        tokens = _on_host_unless_on_device(tokens, np.int32)
        b, s = tokens.shape
        self._check_batch(b)
        positions = np.broadcast_to(np.arange(start_pos, start_pos + s, dtype=np.int32), (b, s))
        slots = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
        valid = np.ones((b, s), bool) if kv_valid is None else _on_host_unless_on_device(kv_valid, bool)
        logits, _, taps = self._sharded(capture, False)(params, tokens, positions, valid, slots, None,
                                                        jnp.int32(0))
        return (logits, self._dereplicate(taps)) if capture else logits

    def init_cache(self, batch: int, length: int):
        """Zeroed KV cache, (batch, length, kv heads, head_dim) per layer, sharded by kv heads and batch."""
        from jax.sharding import NamedSharding

        self._check_batch(batch)
        kv = self.config.n_kv_heads * kv_replication(self.config, self.model_parallel)
        shape = (batch, length, kv, self.config.head_dim)
        sharding = NamedSharding(self.mesh, spec(ACTIVATION_AXES["kv_cache"]))
        # one jitted constructor per config and mesh: a new cache shape is its only retrace
        zeros = shared_program(self, ("zeros",), lambda: jax.jit(jnp.zeros, static_argnums=(0, 1),
                                                                 out_shardings=sharding))
        return tuple((zeros(shape, self.dtype), zeros(shape, self.dtype)) for _ in range(self.config.n_layers))

    def step(self, params, tokens, positions, cache, cache_index: int, kv_valid, capture: bool = False):
        """Write `tokens` into the cache at slots cache_index.. and attend over every valid slot.

        tokens, positions: (B, S); kv_valid: (B, cache length) bool, True for slots holding real tokens
        (those being written included). Returns logits, the new cache and, with capture, intermediates.
        """
        tokens = _on_host_unless_on_device(tokens, np.int32)
        b, s = tokens.shape
        self._check_batch(b)
        slots = np.broadcast_to(np.arange(cache_index, cache_index + s, dtype=np.int32), (b, s))
        positions = _on_host_unless_on_device(positions, np.int32)
        kv_valid = _on_host_unless_on_device(kv_valid, bool)
        logits, cache, taps = self._sharded(capture, True)(params, tokens, positions, kv_valid, slots, cache,
                                                           jnp.int32(cache_index))
        return (logits, cache, self._dereplicate(taps)) if capture else (logits, cache)

    def _dereplicate(self, taps: dict) -> dict:
        """Keep one copy of each kv head in k_rope when the model axis replicated them."""
        copies = kv_replication(self.config, self.model_parallel)
        if copies == 1:
            return taps
        return {k: (v[:, :, ::copies] if k.endswith("k_rope") else v) for k, v in taps.items()}
