"""Build invariance, as metamorphic relations: the same weights built with other size hints give the same logits.

An implementation may size tables or caches by how it is built, but what it computes must depend on its inputs
only. Against the `impl` fixture's build (config and hint max_seq_len 16384, max_batch_size 4):
- `max_seq_len` 2048 (Meta ModelArgs' default), 8192 and 131072, in the config and as the build hint (where
  `build` takes it): logits of one sequence at positions 2024..2047, the last window every such build holds;
- `max_batch_size` 1 and 8, as the build hint: checked only where `build` takes it, else not checked, saying so;
- cache lengths: a prefill then one-token steps through `init_cache(batch, length)` of 64 and 2048 slots against
  one of exactly the sequence's 24.
Component 'build_invariance': bit for bit, or within one reduction order's noise (the table's bounds). And building
for 131,072 positions stays cheap: it holds no more device memory than building for 2048, beyond a RoPE table.
"""
from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from adapters import protocol
from conformance import support
from examples import planted
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity
from parity.check import record_not_checked

BASE_BATCH, BASE_SEQ_LEN = 4, 16384  # conformance.plugin's MAX_BATCH_SIZE and MAX_SEQ_LEN: the impl fixture's build
BASE = f"built for max_seq_len {BASE_SEQ_LEN}, max_batch_size {BASE_BATCH}"
SEQ_LENS = (2048, 8192, 131072)
BATCH_SIZES = (1, 8)
CACHE_LENGTHS = (64, 2048)
SEQ = 24
START = 2048 - SEQ
TOKENS = support.tokens(1, SEQ, seed=16)
PREFILL = 16


def hinted(factory, mesh: str, dtype: str, *, max_seq_len: int = BASE_SEQ_LEN, max_batch_size: int = BASE_BATCH):
    """A fresh build of the canonical weights with these size hints, in the config and for `build`."""
    config = support.CONFIG.replace(max_seq_len=max_seq_len)
    return protocol.build(factory, config, support.weight_set(), make_mesh(mesh), dtype,
                          max_batch_size=max_batch_size, max_seq_len=max_seq_len)


def hinted_once(request, factory, mesh, dtype, **hints):
    """hinted(...), once per process; a build that raises is a failed record."""
    __tracebackhide__ = True
    return support.built_once(request, (factory, mesh, dtype, "hints", tuple(sorted(hints.items()))),
                              lambda: hinted(factory, mesh, dtype, **hints), component="build_invariance",
                              reference=BASE, dtype=dtype, mesh=mesh, what=f"building --impl with {hints}")


def _logits(request, adapter, scope, name):
    return host(support.run(request, adapter.forward, TOKENS, start_pos=START, **scope, name=name))


def check_hint(request, factory, base, dtype, mesh, hint: str, value: int):
    """The logits of a build with `hint`=value against the base build's; not checked when `build` takes no such
    hint and the config does not carry it."""
    __tracebackhide__ = True
    scope = dict(component="build_invariance", reference=BASE, dtype=dtype, mesh=mesh)
    name = f"logits, {hint} {value}"
    if hint not in protocol.accepted_hints(factory) and hint != "max_seq_len":  # the config carries max_seq_len
        reason = (f"not checked: {protocol.name_of(factory)}.build takes no {hint}, so no build of it can depend on "
                  "one")
        record_not_checked(request, names=[name], reason=reason, **scope)
        pytest.skip(reason)
    adapter = hinted_once(request, factory, mesh, dtype, **{hint: value})
    assert_parity(request, name=name, actual=_logits(request, adapter, scope, name),
                  expected=_logits(request, base, scope, name), logits=True, **scope)


def decode(adapter, length: int) -> np.ndarray:
    """Logits of every position of TOKENS: a prefill of PREFILL into a cache of `length` slots, then steps."""
    cache = adapter.init_cache(1, length)
    logits, cache = adapter.step(TOKENS[:, :PREFILL], 0, cache)
    out = [host(logits)]
    for slot in range(PREFILL, SEQ):
        logits, cache = adapter.step(TOKENS[:, slot:slot + 1], slot, cache)
        out.append(host(logits))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("max_seq_len", SEQ_LENS)
def test_logits_do_not_depend_on_max_seq_len(request, impl, impl_factory, dtype, mesh, max_seq_len):
    support.data_split(mesh, 1)
    base = support.subject(request, impl, mesh, dtype, component="build_invariance", reference=BASE)
    check_hint(request, impl_factory, base, dtype, mesh, "max_seq_len", max_seq_len)


@pytest.mark.parametrize("max_batch_size", BATCH_SIZES)
def test_logits_do_not_depend_on_max_batch_size(request, impl, impl_factory, dtype, mesh, max_batch_size):
    support.data_split(mesh, 1)
    base = support.subject(request, impl, mesh, dtype, component="build_invariance", reference=BASE)
    check_hint(request, impl_factory, base, dtype, mesh, "max_batch_size", max_batch_size)


@pytest.mark.parametrize("length", CACHE_LENGTHS)
def test_decode_logits_do_not_depend_on_cache_length(request, impl, dtype, mesh, length):
    support.data_split(mesh, 1)
    scope = dict(component="build_invariance", reference=f"a cache of {SEQ} slots", dtype=dtype, mesh=mesh)
    name = f"decode logits, cache of {length} slots"
    adapter = support.subject(request, impl, mesh, dtype, component="build_invariance", reference=scope["reference"])
    reason = protocol.missing(adapter, "decode")
    if reason:
        record_not_checked(request, names=[name], reason=reason, **scope)
        pytest.skip(reason)
    exact = support.run(request, decode, adapter, SEQ, **scope, name=name, what=f"decoding into {SEQ} slots")
    longer = support.run(request, decode, adapter, length, **scope, name=name, what=f"decoding into {length} slots")
    assert_parity(request, name=name, actual=longer, expected=exact, logits=True, **scope)


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def rope_table_bytes(config, positions: int) -> int:
    """cos and sin for every position and rotated pair in float32: what a precomputed RoPE table may hold."""
    return 2 * positions * (config.head_dim // 2) * 4


def check_build_is_cheap(factory):
    """A build for 131,072 positions holds at most a RoPE table more device memory than one for 2048: no cache
    sized by max_seq_len at build (init_cache is where a cache belongs)."""
    __tracebackhide__ = True
    mesh, dtype, big = "1x1", "bfloat16", SEQ_LENS[-1]
    before = live_bytes()
    small = hinted(factory, mesh, dtype, max_seq_len=SEQ_LENS[0])
    at_small = live_bytes()
    large = hinted(factory, mesh, dtype, max_seq_len=big)
    extra = live_bytes() - at_small
    allowed = (at_small - before) + rope_table_bytes(support.CONFIG, big)
    del small, large
    assert extra <= allowed, (f"{protocol.name_of(factory)}.build for {big} positions holds {extra} bytes of "
                              f"device arrays, the build for {SEQ_LENS[0]} {at_small - before} and a RoPE table for "
                              f"{big} positions {rope_table_bytes(support.CONFIG, big)}: allocate caches in "
                              "init_cache(batch, length), not at build")


def test_building_for_the_whole_context_stays_cheap(impl_factory):
    check_build_is_cheap(impl_factory)


# ---- the checks fail their planted faults (examples/planted.py) ----

def test_a_rope_scaled_by_the_built_context_fails_max_seq_len_invariance(request):

    factory = planted.ContextScaledRoPEAdapter
    base = hinted(factory, "1x1", "float32")
    with pytest.raises(AssertionError, match="component 'build_invariance', name 'logits, max_seq_len 2048'"):
        check_hint(support.scratch_request(request.config), factory, base, "float32", "1x1", "max_seq_len", 2048)


def test_a_cache_allocated_at_build_fails_the_cost_check():
    with pytest.raises(AssertionError, match="allocate caches in init_cache"):
        check_build_is_cheap(planted.PreallocatedCacheAdapter)
