"""Inputs and cached reference results for the layer-by-layer conformance tests.

Every reference result depends only on (component, case, reference, dtype), never on the mesh, so each is
computed once per process and shared by all meshes. Inputs are rounded to the run dtype before anyone sees
them, and the float64 oracle runs on the same rounded inputs and weights: its distance to each side then
measures only that side's arithmetic.
"""
from __future__ import annotations

import functools
import types

import ml_dtypes
import numpy as np
import pytest

from adapters import protocol
from conformance.mutants import predictions
from fixtures import extremes, real_model
from llama_spec.config import LlamaConfig, preset
from llama_spec.layout import check_splittable, make_mesh, parse_mesh
from llama_spec.synthetic import canonical_weights
from parity.check import record_failure, record_not_checked
from reference import hf, meta, oracle
from reference.layers import layer_weights

# The battery's model, chosen once per process before collection by `--model` (use_model): the synthetic tiny
# preset, or a real trained model whose weights are converted into the suite's cache (fixtures/real_model.py).
MODELS = ("tiny", real_model.NAME)
MODEL = "tiny"
CONFIG = preset("tiny")
BATCH = 2


def use_model(name: str) -> None:
    """Make `name` the battery's model: CONFIG, the canonical weight set and the tensor-parallel meshes. Called by
    the plugin before collection, so the test modules' parameters are the model's; raises RealModelError when the
    real model is missing."""
    global MODEL, CONFIG, TP_MESHES
    if name not in MODELS:
        raise ValueError(f"--model {name}: choose one of {', '.join(MODELS)}")
    config = preset("tiny") if name == "tiny" else real_model.checkpoint().config
    MODEL, CONFIG, TP_MESHES = name, config, TINY_TP_MESHES if name == "tiny" else REAL_TP_MESHES
    for cached in (weight_set, weights, activations, heads, oracle_forward, attention_input,
                   exact_on_float32_weights, full_forward):
        cached.cache_clear()


def unsplittable(mesh: str, config: LlamaConfig | None = None) -> str | None:
    """Why the model axis of `mesh` cannot split `config` (default: the battery's), or None when it can."""
    try:
        check_splittable(config or CONFIG, parse_mesh(mesh)[1], where=f"mesh {mesh}: {MODEL}")
    except ValueError as err:
        return str(err)
    return None


def canonical() -> dict[str, np.ndarray]:
    """The battery model's float32 weights (treat as read-only): the tiny preset's seeded set or the real ones."""
    return canonical_weights("tiny") if MODEL == "tiny" else real_model.weights()


# ---- the implementation under test ----------------------------------------------------------

def require(request, adapter, capability: str, *, component: str, dtype: str, mesh: str, reference: str | None = None,
            names: list[str] | None = None) -> None:
    """Skip as not checked, with a not_checked entry, when the adapter lacks `capability`."""
    reason = protocol.missing(adapter, capability)
    if reason:
        record_not_checked(request, component=component, names=names or [capability], reason=reason,
                           reference=reference, dtype=dtype, mesh=mesh)
        pytest.skip(reason)


def run(request, fn, *args, component: str, dtype: str, mesh: str, reference: str | None = None,
        layer: int | None = None, name: str | None = None, what: str | None = None, **kwargs):
    """fn(*args, **kwargs) on the implementation under test. If it raises, the comparison becomes a failed record
    (component, layer, error text) and the test fails saying so, instead of leaving no trace in the summary."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any error of the implementation is its failure, reported as one
        owner = getattr(fn, "__self__", None)
        what = what or (f"{type(owner).__name__}.{fn.__name__}" if owner is not None else fn.__name__)
        error = f"{what} raised {type(err).__name__}: {err}"
        record_failure(request, component=component, error=error, reference=reference, dtype=dtype, mesh=mesh,
                       layer=layer, name=name)
        where = f", layer {layer}" if layer is not None else ""
        raise AssertionError(f"component '{component}'{where}: {error}\n  reference={reference} dtype={dtype} "
                             f"mesh={mesh}") from err


def subject(request, impl, mesh: str, dtype: str, *, component: str, reference: str | None = None):
    """The --impl adapter on `mesh` at `dtype`; a build that raises is a failed record of `component`."""
    __tracebackhide__ = True
    return run(request, impl, mesh, dtype, component=component, reference=reference, dtype=dtype, mesh=mesh,
               what=f"building --impl on {mesh} at {dtype}")


def data_split(mesh: str, batch: int) -> None:
    """Skip a case whose batch the mesh's data axis cannot split (a property of the case, not the subject)."""
    if batch % parse_mesh(mesh)[0]:
        pytest.skip(f"batch {batch} does not split over the data axis of {mesh}")


def rounded(x, dtype: str) -> np.ndarray:
    """x as float32 holding values exactly representable in `dtype`."""
    x = np.asarray(x, np.float32)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else x


# Weight sets of the full-forward cases. "small_rows": the canonical weights with half of the embedding rows
# (seeded) scaled by 10**U(-3.5, -2), so those tokens enter layer 0's attention_norm with mean square 1e-7 .. 1e-4,
# around RMSNorm's eps 1e-5 (unit-scale rows hide a wrong eps; real Llama 3 embeddings have entries ~1e-3..1e-2).
WEIGHT_SETS = ("canonical", "small_rows")


@functools.lru_cache(maxsize=2)
def weight_set(kind: str = "canonical") -> dict[str, np.ndarray]:
    """float32 weights of one weight set (treat as read-only)."""
    if kind == "canonical":
        return canonical()
    if kind != "small_rows":
        raise ValueError(f"unknown weight set {kind!r}; choose one of {WEIGHT_SETS}")
    if CONFIG.tie_word_embeddings:
        raise ValueError(f"weight set small_rows scales embedding rows, which {MODEL}'s tied output projection "
                         "shares: it would change the logits too; the set is for untied models")
    out = dict(canonical())
    emb = out["tok_embeddings.weight"].copy()
    rng = np.random.default_rng(3)
    rows = rng.choice(CONFIG.vocab_size, CONFIG.vocab_size // 2, replace=False)
    emb[rows] *= (10.0 ** rng.uniform(-3.5, -2.0, size=(len(rows), 1))).astype(np.float32)
    out["tok_embeddings.weight"] = emb
    return out


@functools.lru_cache(maxsize=4)
def weights(dtype: str, kind: str = "canonical") -> dict[str, np.ndarray]:
    """A weight set as the run dtype sees it (what the oracle computes with)."""
    return {k: rounded(v, dtype) for k, v in weight_set(kind).items()}


_BUILT: dict = {}


def built_once(request, key, build, *, component: str, dtype: str, mesh: str, reference: str | None = None,
               what: str):
    """build() once per process under `key`; a build that raises is kept and becomes a failed record of
    `component` in every test that asks for it."""
    __tracebackhide__ = True
    if key not in _BUILT:
        try:
            _BUILT[key] = build()
        except Exception as err:  # noqa: BLE001 - raised again (as a failed record) to every test that asks
            _BUILT[key] = err

    def get():
        if isinstance(_BUILT[key], Exception):
            raise _BUILT[key]
        return _BUILT[key]

    return run(request, get, component=component, reference=reference, dtype=dtype, mesh=mesh, what=what)


def subject_with(request, factory, mesh: str, dtype: str, kind: str, *, component: str,
                 reference: str | None = None):
    """The --impl factory built on `mesh` at `dtype` with weight set `kind` (once per process); the canonical set
    is the `impl` fixture's own build. A build that raises is a failed record of `component`."""
    __tracebackhide__ = True

    return built_once(request, (factory, mesh, dtype, kind), lambda: protocol.build(
        factory, CONFIG, weight_set(kind), make_mesh(mesh), dtype, max_batch_size=4, max_seq_len=16384),
        component=component, reference=reference, dtype=dtype, mesh=mesh,
        what=f"building --impl on {mesh} at {dtype} with weight set {kind}")


def layer(dtype: str, index: int) -> dict[str, np.ndarray]:
    return layer_weights(weights(dtype), index)


@functools.lru_cache(maxsize=64)
def activations(dtype: str, seq: int, seed: int, spread: bool = False, extreme: str | None = None) -> np.ndarray:
    """(BATCH, seq, dim) inputs; with `spread`, each position is scaled log-uniformly over [1e-3, 10] so that
    RMSNorm's eps matters for the small rows. `extreme` (fixtures/extremes.py): 'outliers' (channels x 5 x 10^3),
    'dominant' (each state along an output row: one token's probability > 0.999); attention's 'scores' are
    `attention_chunks`'."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, seq, CONFIG.dim)).astype(np.float32)
    if spread:
        x *= 10.0 ** rng.uniform(-3, 1, size=(BATCH, seq, 1)).astype(np.float32)
    if extreme == "outliers":
        x = extremes.outlier_channels(x)
    elif extreme == "dominant":
        w = canonical()
        x = extremes.aligned_with_rows(x, w["output.weight"], w["norm.weight"], seed=seed)
    elif extreme is not None:
        raise ValueError(f"extreme={extreme!r}: choose outliers or dominant")
    return rounded(x, dtype)


@functools.lru_cache(maxsize=8)
def heads(dtype: str, seq: int, seed: int, extreme: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """q (BATCH, seq, n_heads, head_dim) and k (BATCH, seq, n_kv_heads, head_dim) for RoPE; `extreme='peaked'`
    scales the queries so that their scores reach >= 100."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, seq, CONFIG.n_heads, CONFIG.head_dim)).astype(np.float32)
    if extreme == "peaked":
        q *= np.float32(extremes.PEAKED_QUERY_SCALE)
    k = rng.standard_normal((BATCH, seq, CONFIG.n_kv_heads, CONFIG.head_dim)).astype(np.float32)
    return rounded(q, dtype), rounded(k, dtype)


def tokens(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(batch, seq), dtype=np.int32)


def diagnosis(dtype: str, mesh: str, compute, combinations=()):
    """`diagnose=` for parity.assert_parity: the catalogued deviations (conformance/mutants.py), and any
    `combinations` of them, predicted by the float64 oracle on the check's own inputs, compute(config, variant)
    -> that output; evaluated only when the record fails. It uses only what the check already has, so it works on
    any --impl adapter."""
    def predict():
        return predictions(CONFIG, dtype, mesh, compute, combinations)
    return predict


@functools.lru_cache(maxsize=64)
def oracle_forward(config, variant, dtype: str, batch: int, seq: int, start_pos: int = 0, kind: str = "canonical"):
    """The float64 oracle's (logits, intermediates) on the tokens of full_forward (positions start_pos .., weight
    set `kind`) under a deviation's config and variant: shared by the logits and intermediates diagnoses of every
    reference and mesh (hashable keys)."""
    return oracle.oracle_forward(config, weights(dtype, kind), tokens(batch, seq, seed=16), start_pos, capture=True,
                                 variant=variant)


# ---- cached (reference result, oracle result) per case --------------------------------------

@functools.lru_cache(maxsize=None)
def attention_input(dtype: str, sizes: tuple[int, ...], extreme: str | None = None, layer_index: int = 0,
                    start_pos: int = 0) -> np.ndarray:
    """(BATCH, sum(sizes), dim) attention inputs; `extreme='scores'`: a long run of one repeated position, scaled
    so that layer `layer_index`'s largest causal score after 1/sqrt(head_dim) is extremes.TARGET_SCORE (scores
    are quadratic in the input, so one factor from the oracle's unscaled scores does it)."""
    x = activations(dtype, sum(sizes), seed=13)
    if extreme is None:
        return x
    if extreme != "scores":
        raise ValueError(f"extreme={extreme!r}: attention inputs know 'scores'")
    x = extremes.repeated_run(x)
    _, q, k = oracle.attention(x, layer(dtype, layer_index), CONFIG, start_pos + np.arange(x.shape[1]))
    return rounded(x * np.sqrt(extremes.TARGET_SCORE / extremes.max_causal_score(q, k)), dtype)


def attention_chunks(dtype: str, sizes: tuple[int, ...], extreme: str | None = None, layer_index: int = 0,
                     start_pos: int = 0) -> list[np.ndarray]:
    x = attention_input(dtype, sizes, extreme, layer_index, start_pos)
    edges = np.cumsum(sizes)[:-1]
    return np.split(x, edges, axis=1)


@functools.lru_cache(maxsize=None)
def exact_on_float32_weights(batch: int, seq: int):
    """The float64 oracle's logits on the canonical float32 weights, not rounded to any run dtype."""
    return oracle.oracle_forward(CONFIG, canonical(), tokens(batch, seq, seed=16), 0)


@functools.lru_cache(maxsize=None)
def full_forward(reference: str, dtype: str, batch: int, seq: int, start_pos: int = 0, kind: str = "canonical"):
    """(logits, intermediates) of the reference and of the oracle for a fresh sequence (no earlier context) at
    positions start_pos .., with weight set `kind`."""
    toks = tokens(batch, seq, seed=16)
    if reference == "meta":
        ref = meta.MetaReference(CONFIG, weight_set(kind), dtype, max_batch_size=batch, max_seq_len=seq)
        if start_pos:
            # Meta's forward(tokens, start_pos) reads KV-cache slots 0 .. start_pos (zeros in a fresh model): keep
            # the cache slots at 0 and move only the RoPE table, Meta's own precompute_freqs_cis sliced.
            ref.model.freqs_cis = meta.freqs_cis(CONFIG, start_pos + seq)[start_pos:]
        result = ref.forward(toks, 0, capture=True)
    elif reference == "hf":
        result = hf.HFReference(CONFIG, weight_set(kind), dtype).forward(toks, start_pos, capture=True)
    else:
        raise ValueError(f"--reference {reference}: full-model references are meta and hf")
    return result, oracle.oracle_forward(CONFIG, weights(dtype, kind), toks, start_pos, capture=True)


# ---- shared by the battery's tests --------------------------------------------------------------

EXAMPLE = "examples.simple_llama.adapter:SimpleLlamaAdapter"  # the example implementation, an --impl spec
# The tensor-parallel meshes the relations compare with 1x1: the tiny model's, or the real one's (9 heads, 3 kv
# heads and a vocabulary of 49152 split at 3, not at 2, 4 or 8).
TINY_TP_MESHES = ("1x2", "1x4", "1x8", "2x4")
REAL_TP_MESHES = ("1x3", "2x3")
TP_MESHES: tuple[str, ...] = TINY_TP_MESHES


def meshes_of_model(tiny: tuple[str, ...]) -> tuple[str, ...]:
    """A test's own fixed meshes `tiny` under the tiny model; under another, the meshes that split it."""
    return tiny if MODEL == "tiny" else TP_MESHES


def scratch_request(config, nodeid: str = "scratch"):
    """A stand-in for pytest's request whose records stay with it, out of the run's parity JSON and report."""
    return types.SimpleNamespace(config=config, node=types.SimpleNamespace(nodeid=nodeid, user_properties=[]))


def probe(request):
    """A stand-in for this test's request: a check run on it leaves its records here, not in the test's report."""
    return scratch_request(request.config, "probe")
