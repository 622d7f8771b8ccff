"""Hypothesis strategies for the property-based and metamorphic tests, and the drawn `Case` they produce.

A `Case` is one example: a small LlamaConfig that splits over the drawn mesh, batch, length, start position (half
past 8192, where RoPE scaling shows), dtype and seeds. Every choice shrinks towards the smallest case, so a
failure shrinks to a small config printed as a ready-to-paste `@example(...)`. Model-level properties compile for
every new shape, so under `dev` their models and shapes come from a fixed set (FIXED_MODELS) and only values are
drawn; `ci` and `thorough` draw every field (docs/internals.md#hypothesis-strategies, docs/report-and-gate.md).
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

from adapters import protocol
from conformance.support import rounded
from llama_spec.config import LLAMA31_ROPE_SCALING, LLAMA32_ROPE_SCALING, LlamaConfig
from llama_spec.layout import make_mesh, parse_mesh
from llama_spec.synthetic import make_weights

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
# Profiles whose model-level draws take the model and the shapes from `fixed_shapes` (see the docstring).
FIXED_SHAPE_PROFILES = ("dev",)
# Chunkings of the chunked-prefill relation under those profiles (cut points, folded into 1..seq-1), one per mesh
# role of FIXED_MODELS (fixed_cuts): chunk sizes are program shapes, so they come with the model, not drawn apart.
FIXED_CUTS = ((1,), (MAX_SEQ // 2,), (3, 11))


def shapes_are_fixed() -> bool:
    """True under a profile of FIXED_SHAPE_PROFILES: asked when drawing, after pytest chose the profile."""
    return settings.get_current_profile_name() in FIXED_SHAPE_PROFILES


def model_settings() -> settings:
    """The active profile, with a 1/COMPILE_SHARE share of its examples (at least 2) and no deadline; under a
    fixed-shape profile also derandomized, without the example database. The mesh and dtype are the draws that
    make programs: at random, 5 examples of 3 meshes x 2 dtypes left a new cache's second run 14 to 32 programs
    it had not compiled, and a draw no earlier run had met could fail a run (the bf16 mesh draw of e90bdd3).
    Fixed, every run of the profile meets the same examples; `thorough` is the profile that explores."""
    fixed = {"derandomize": True, "database": None} if shapes_are_fixed() else {}
    return settings(max_examples=max(2, settings.default.max_examples // COMPILE_SHARE), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], **fixed)


# ---- the drawn case ------------------------------------------------------------------------

def config_source(config: LlamaConfig) -> str:
    """`LlamaConfig(...)` as Python, listing the required fields and those that differ from their defaults."""
    parts = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default]
    return f"LlamaConfig({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn example; its repr is Python that rebuilds it. `seed` draws the inputs, `weights_seed` the
    weights (make_weights), so the fixed-shape profiles can keep one model per shape and vary its inputs."""
    config: LlamaConfig
    mesh: str = "1x1"
    batch: int = 1
    seq: int = 1
    start_pos: int = 0
    dtype: str = "float32"
    seed: int = 0
    weights_seed: int = 0

    def __repr__(self) -> str:
        return (f"Case(config={config_source(self.config)}, mesh={self.mesh!r}, batch={self.batch}, "
                f"seq={self.seq}, start_pos={self.start_pos}, dtype={self.dtype!r}, seed={self.seed}, "
                f"weights_seed={self.weights_seed})")

    @property
    def tag(self) -> str:
        """A short id of the case for parity record names: records of different draws never share a key."""
        return f"case{zlib.crc32(repr(self).encode()):08x}"

    def weights(self) -> dict[str, np.ndarray]:
        """make_weights(config, weights_seed) rounded to the run dtype: what every side (and the oracle) computes
        with."""
        return _weights(self.config, self.weights_seed, self.dtype)

    def adapter(self, factory, mesh: str | None = None):
        """The implementation under test (`factory`, the --impl) built for this case on `mesh` (default: the
        case's), cached across examples, tests and shrinking: one build per model and mesh in a process."""
        return _adapter(factory, self.config, self.weights_seed, self.dtype, mesh or self.mesh)

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


# Enough for every model the fixed-shape profiles use in one worker (3 meshes x their 1x1 and 1xM runs x 2
# dtypes); each is a few hundred KB.
@functools.lru_cache(maxsize=64)
def _weights(config: LlamaConfig, seed: int, dtype: str) -> dict[str, np.ndarray]:
    return {k: rounded(v, dtype) for k, v in make_weights(config, seed).items()}


@functools.lru_cache(maxsize=64)
def _adapter(factory, config: LlamaConfig, seed: int, dtype: str, mesh: str):
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


def fitting_meshes(names=MESHES) -> list[str]:
    """Those of `names` ('DxM') that fit the devices present (ask after JAX has started), or skip the test."""
    fit = [name for name in names if np.prod(parse_mesh(name)) <= device_count()]
    if not fit:
        pytest.skip(f"none of the meshes {list(names)} fits the {device_count()} devices present")
    return fit


def meshes(names=MESHES) -> st.SearchStrategy[str]:
    """One of `names` that fits the devices present (counted when first drawn, after JAX starts)."""
    return st.deferred(lambda: st.sampled_from(fitting_meshes(names)))


def batches(data_parallel: int, min_batch: int = 1) -> st.SearchStrategy[int]:
    """Multiples of the data axis, at least `min_batch`, up to MAX_BATCH or one row per data shard."""
    low = -(-min_batch // data_parallel)
    return st.integers(low, max(low, MAX_BATCH // data_parallel)).map(lambda rows: rows * data_parallel)


def seq_lens(min_seq: int = 1) -> st.SearchStrategy[int]:
    return st.integers(min_seq, MAX_SEQ)


def dtypes(names=DTYPES) -> st.SearchStrategy[str]:
    return st.sampled_from(names)


# The fixed-shape profiles' models, one per mesh role (`fixed_meshes`), with batch (rows per data shard) and
# sequence length. Each splits over any model axis up to 8 (heads 8 or 16, vocab and SwiGLU width multiples
# of 8), and between them they hold what the drawn configs can: GQA groups of 2, 4 and 8, kv heads replicated
# (2 kv heads on 4 or 8 devices) and split (4 on 2 or 4), 1 and 2 layers, head_dim 8 and 16, Llama 3.1 and
# 3.2 RoPE scaling and none, both thetas and both eps, a SwiGLU multiplier, tokens of every data shard.
FIXED_MODELS = (
    # the simplest mesh (1x1, or 1x2 among the tensor-parallel meshes)
    (LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=136, multiple_of=64), 2, 9),
    # the widest model axis (1x8): kv heads replicated, the SwiGLU multiplier, Llama 3.2's RoPE scaling
    (LlamaConfig(dim=128, n_layers=1, n_heads=16, n_kv_heads=2, vocab_size=208, multiple_of=64,
                 ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_scaling=LLAMA32_ROPE_SCALING), 1, 12),
    # the 2-D mesh (2x4): kv heads split, RoPE without scaling
    (LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=64,
                 rope_theta=10000.0, rope_scaling=None), 2, 16),
)


def fixed_meshes(names=MESHES) -> list[str]:
    """The meshes of the fixed-shape profiles, of those of `names` that fit, in the roles of FIXED_MODELS: the
    simplest, the widest model axis, and the 2-D mesh with the most devices (1x1, 1x8, 2x4 of the default list
    on 8 devices). Fewer when roles coincide."""
    fit = fitting_meshes(names)
    sizes = {name: parse_mesh(name) for name in fit}
    chosen = [fit[0], max(fit, key=lambda name: (sizes[name][1], -sizes[name][0]))]
    two_d = [name for name in fit if min(sizes[name]) > 1]
    if two_d:
        chosen.append(max(two_d, key=lambda name: int(np.prod(sizes[name]))))
    return list(dict.fromkeys(chosen))


def fixed_shape(names, mesh: str, min_batch: int = 1, min_seq: int = 1) -> tuple[LlamaConfig, int, int]:
    """(config, batch, seq) of the fixed-shape profiles on `mesh`, one of fixed_meshes(names). The config is
    the role's whatever the minimums (tests with different minimums share the model); batch and seq are
    raised to them."""
    config, rows, seq = FIXED_MODELS[fixed_meshes(names).index(mesh)]
    data = parse_mesh(mesh)[0]
    return config, max(rows, -(-min_batch // data)) * data, max(seq, min_seq)


@st.composite
def cases(draw, mesh_names=MESHES, start_pos=start_positions(), dtype=dtypes(), min_batch: int = 1,
          min_seq: int = 1) -> Case:
    """A Case: the mesh first (one of `mesh_names` that fits), then a config its model axis splits and a batch
    its data axis splits; under a fixed-shape profile the mesh's fixed model and shape (FIXED_MODELS), so
    that only the inputs, the position and the dtype are drawn."""
    if shapes_are_fixed():
        mesh_name = draw(st.sampled_from(fixed_meshes(mesh_names)))
        config, batch, seq = fixed_shape(mesh_names, mesh_name, min_batch, min_seq)
        weights_seed = 0
    else:
        mesh_name = draw(st.sampled_from(fitting_meshes(mesh_names)))
        data, model = parse_mesh(mesh_name)
        batch = draw(batches(data, min_batch))
        config = draw(configs(model))
        seq = draw(seq_lens(min_seq))
        weights_seed = None
    return Case(
        config=config,
        mesh=mesh_name,
        batch=batch,
        seq=seq,
        start_pos=draw(start_pos),
        dtype=draw(dtype),
        seed=draw(st.integers(0, 2 ** 16 - 1)),
        weights_seed=draw(st.integers(0, 2 ** 16 - 1)) if weights_seed is None else weights_seed,
    )


def chunk_cuts() -> st.SearchStrategy[list[int] | None]:
    """Cut points of a prompt fed through the KV cache in chunks (folded into 1..seq-1 by the test): one or
    two anywhere, or under a fixed-shape profile None, for the chunking of the case's mesh (fixed_cuts). Drawn
    apart from the mesh, the chunkings multiplied the programs and every run met new ones, so a warm run was slower
    than a cold one (docs/results.md#drawn-shapes-and-the-compilation-cache)."""
    def cuts():
        if shapes_are_fixed():
            return st.none()
        return st.lists(st.integers(1, MAX_SEQ - 1), min_size=1, max_size=2)
    return st.deferred(cuts)


def fixed_cuts(mesh: str, names=MESHES) -> list[int]:
    """The chunking of the fixed-shape profiles on `mesh`, one of fixed_meshes(names): FIXED_CUTS by mesh role."""
    return list(FIXED_CUTS[fixed_meshes(names).index(mesh)])  # at most three roles, one chunking each


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
    except (Exception, pytest.fail.Exception):  # pytest.fail raises a BaseException
        node.stash[_FAILED] = True
        raise
    finally:
        if node.stash.get(_FAILED, False) and not final:
            del node.user_properties[start:]
