"""Hypothesis strategies for the property-based and metamorphic tests, and the drawn `Case` they produce.

A `Case` is everything one example needs: a small LlamaConfig whose dim, heads, kv heads and head_dim agree
and whose heads, SwiGLU width and vocab split over the drawn mesh's model axis, the mesh, batch (a multiple
of the data axis), sequence length, start position (half of the draws past Llama 3.1's original 8192-token
context, where RoPE scaling shows), dtype and a seed for weights and inputs. Every choice shrinks towards the
smallest case (1x1, one head of 4, one layer, batch 1, one token, position 0, float32), so a failure shrinks
to a small config, and `run_case` prints it as a ready-to-paste `@example(...)`.

Model-level properties compile XLA programs for every drawn shape; `model_settings()` gives them a fixed
share of the active hypothesis profile's examples (profiles: conftest.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context

from llama_spec.config import LLAMA31_ROPE_SCALING, LLAMA32_ROPE_SCALING, LlamaConfig
from llama_spec.layout import parse_mesh

MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_BATCH, MAX_SEQ = 128, 16, 2, 512, 4, 16
ROPE_ORIGINAL_CONTEXT = LLAMA31_ROPE_SCALING.original_max_position_embeddings
# What a drawn case can ask of an implementation's build: batches() gives one row per shard of an 8-way data
# axis; start_positions() reach twice the original context, plus a sequence (and a chunked-prefill probe token).
MAX_ROWS, MAX_POSITION = 8, 2 * ROPE_ORIGINAL_CONTEXT + MAX_SEQ + 1
HEAD_DIMS = (4, 8, 16, 32)
KV_HEADS = (1, 2, 4, 8)
# Simplest first: sampled_from shrinks towards the front of the list.
MESHES = ("1x1", "1x2", "2x1", "1x4", "2x2", "4x1", "1x8", "2x4", "4x2", "8x1")
DTYPES = ("float32", "bfloat16")
# A model-level example costs about a second of XLA compilation; a cheap one (the tokenizer fuzz) microseconds.
COMPILE_SHARE = 20


def model_settings() -> settings:
    """The active profile, with a 1/COMPILE_SHARE share of its examples (at least 2) and no deadline."""
    return settings(max_examples=max(2, settings.default.max_examples // COMPILE_SHARE), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---- the drawn case ------------------------------------------------------------------------

def config_source(config: LlamaConfig) -> str:
    """`LlamaConfig(...)` as Python, listing the required fields and those that differ from their defaults."""
    parts = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default]
    return f"LlamaConfig({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn example; its repr is Python that rebuilds it."""
    config: LlamaConfig
    mesh: str = "1x1"
    batch: int = 1
    seq: int = 1
    start_pos: int = 0
    dtype: str = "float32"
    seed: int = 0

    def __repr__(self) -> str:
        return (f"Case(config={config_source(self.config)}, mesh={self.mesh!r}, batch={self.batch}, "
                f"seq={self.seq}, start_pos={self.start_pos}, dtype={self.dtype!r}, seed={self.seed})")

    @property
    def tag(self) -> str:
        """A short id of the case for parity record names: records of different draws never share a key."""
        return f"case{zlib.crc32(repr(self).encode()):08x}"

    def weights(self) -> dict[str, np.ndarray]:
        """make_weights(config, seed) rounded to the run dtype: what every side (and the oracle) computes with."""
        return _weights(self.config, self.seed, self.dtype)

    def adapter(self, factory, mesh: str | None = None):
        """The implementation under test (`factory`, the --impl) built for this case on `mesh` (default: the
        case's), cached across examples and shrinking."""
        return _adapter(factory, self.config, self.seed, self.dtype, mesh or self.mesh)

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def activations(self, spread: bool = False) -> np.ndarray:
        """(batch, seq, dim) inputs in the run dtype; with `spread`, rows scaled over [1e-3, 10] so eps matters."""
        rng = self.rng(1)
        x = rng.standard_normal((self.batch, self.seq, self.config.dim), dtype=np.float32)
        if spread:
            x *= (10.0 ** rng.uniform(-3, 1, size=(self.batch, self.seq, 1))).astype(np.float32)
        return rounded(x, self.dtype)

    def heads(self) -> tuple[np.ndarray, np.ndarray]:
        """q (batch, seq, n_heads, head_dim) and k (batch, seq, n_kv_heads, head_dim) in the run dtype."""
        c, rng = self.config, self.rng(2)
        q = rng.standard_normal((self.batch, self.seq, c.n_heads, c.head_dim), dtype=np.float32)
        k = rng.standard_normal((self.batch, self.seq, c.n_kv_heads, c.head_dim), dtype=np.float32)
        return rounded(q, self.dtype), rounded(k, self.dtype)

    def tokens(self) -> np.ndarray:
        return self.rng(3).integers(0, self.config.vocab_size, size=(self.batch, self.seq), dtype=np.int32)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 holding values exactly representable in `dtype`."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


@functools.lru_cache(maxsize=8)
def _weights(config: LlamaConfig, seed: int, dtype: str) -> dict[str, np.ndarray]:
    from fixtures.weights import make_weights

    return {k: rounded(v, dtype) for k, v in make_weights(config, seed).items()}


@functools.lru_cache(maxsize=8)
def _adapter(factory, config: LlamaConfig, seed: int, dtype: str, mesh: str):
    from adapters import protocol
    from llama_spec.layout import make_mesh

    return protocol.build(factory, config, _weights(config, seed, dtype), make_mesh(mesh), dtype,
                          max_batch_size=MAX_ROWS, max_seq_len=MAX_POSITION)


# ---- strategies ----------------------------------------------------------------------------

def device_count() -> int:
    import jax

    return len(jax.devices())


@st.composite
def configs(draw, model_parallel: int = 1) -> LlamaConfig:
    """A small Llama 3.1 config that a model axis of `model_parallel` splits (heads, kv heads, SwiGLU, vocab)."""
    m = model_parallel
    n_heads = draw(st.sampled_from([h for h in (1, 2, 4, 8, 16) if h % m == 0 and h <= MAX_HEADS]))
    n_kv_heads = draw(st.sampled_from([k for k in KV_HEADS if n_heads % k == 0 and (k % m == 0 or m % k == 0)]))
    head_dim = draw(st.sampled_from([d for d in HEAD_DIMS if n_heads * d <= MAX_DIM]))
    return LlamaConfig(
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, MAX_LAYERS)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=m * draw(st.integers(-(-32 // m), MAX_VOCAB // m)),
        multiple_of=draw(st.sampled_from([8, 16, 32, 64])) * m,  # the SwiGLU width is a multiple of it
        ffn_dim_multiplier=draw(st.sampled_from([None, 1.3])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([500000.0, 10000.0])),
        rope_scaling=draw(st.sampled_from([LLAMA31_ROPE_SCALING, None, LLAMA32_ROPE_SCALING])),
    )


def start_positions() -> st.SearchStrategy[int]:
    """Early positions, or past the original context where scaled and unscaled RoPE differ most."""
    original = LLAMA31_ROPE_SCALING.original_max_position_embeddings
    return st.one_of(st.integers(0, 64), st.integers(original, 2 * original))


def meshes(names=MESHES) -> st.SearchStrategy[str]:
    """One of `names` ('DxM') that fits the devices present (counted when first drawn, after JAX starts)."""
    def fitting():
        fit = [name for name in names if np.prod(parse_mesh(name)) <= device_count()]
        if not fit:
            pytest.skip(f"none of the meshes {list(names)} fits the {device_count()} devices present")
        return st.sampled_from(fit)
    return st.deferred(fitting)


def batches(data_parallel: int, min_batch: int = 1) -> st.SearchStrategy[int]:
    """Multiples of the data axis, at least `min_batch`, up to MAX_BATCH or one row per data shard."""
    low = -(-min_batch // data_parallel)
    return st.integers(low, max(low, MAX_BATCH // data_parallel)).map(lambda rows: rows * data_parallel)


def seq_lens(min_seq: int = 1) -> st.SearchStrategy[int]:
    return st.integers(min_seq, MAX_SEQ)


def dtypes(names=DTYPES) -> st.SearchStrategy[str]:
    return st.sampled_from(names)


@st.composite
def cases(draw, mesh=meshes(), start_pos=start_positions(), dtype=dtypes(), min_batch: int = 1,
          min_seq: int = 1) -> Case:
    """A Case: the mesh first, then a config its model axis splits and a batch its data axis splits."""
    mesh_name = draw(mesh)
    data, model = parse_mesh(mesh_name)
    batch = draw(batches(data, min_batch))
    return Case(
        config=draw(configs(model)),
        mesh=mesh_name,
        batch=batch,
        seq=draw(seq_lens(min_seq)),
        start_pos=draw(start_pos),
        dtype=draw(dtype),
        seed=draw(st.integers(0, 2 ** 16 - 1)),
    )


# ---- running one example -------------------------------------------------------------------

_FAILED = pytest.StashKey[bool]()


@contextlib.contextmanager
def run_case(request, **drawn):
    """Wrap one example: note its reproduction, and keep the parity records of passing examples and of the
    final (shrunk) failing one, dropping those of the attempts hypothesis makes while shrinking."""
    __tracebackhide__ = True
    node, start = request.node, len(request.node.user_properties)
    arguments = ", ".join(f"{name}={value!r}" for name, value in drawn.items())
    note(f"reproduce: paste above @given on {request.node.originalname}:\n    @example({arguments})\n"
         "with: from hypothesis import example; from conformance.strategies import Case; "
         "from llama_spec.config import LlamaConfig")
    final = current_build_context().is_final
    try:
        yield
    except Exception:
        node.stash[_FAILED] = True
        raise
    finally:
        if node.stash.get(_FAILED, False) and not final:
            del node.user_properties[start:]
