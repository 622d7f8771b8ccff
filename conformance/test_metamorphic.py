"""Metamorphic relations: runs of the implementation under test that must agree with each other, for drawn cases
(the implementation is built through its factory for every drawn config).

- Tensor-parallel invariance: 1x2, 1x4, 1x8 and 2x4 give the 1x1 intermediates and logits for any drawn config
  and position (test_tp_invariance.py holds the tiny preset on every mesh).
- Batch invariance: each row of a batch, run alone on the same model axis (1xM), gives the logits it had in the
  batch, also when the batch was split over a data axis.
- KV cache: a prompt fed through the cache in drawn chunks gives the logits of one prefill, and leaves a cache
  from which one more token decodes as after one prefill; chunks of one token make this prefill plus decode
  (test_kv_cache.py compares that with one forward).
- Relative position: RoPE makes q_m . k_n depend on m - n only, so the scores are the same at any offset, and so
  is a whole forward without earlier context (the causal mask goes by slot). It holds in exact arithmetic at
  every offset and scaling; in floating point up to the rounding of position * frequency, which grows with the
  offset (bounds measured up to 16384). It does not hold across different earlier contexts, so no cache here.
"""
import numpy as np
from hypothesis import given

from adapters.protocol import forward, step_accepts
from conformance import support
from conformance.strategies import cases, chunk_cuts, fixed_cuts, model_settings, run_case, start_positions
from llama_spec.host import host
from llama_spec.layout import parse_mesh
from parity import assert_parity, assert_parity_many

# The reference label of drawn mesh-invariance cases: their bounds are an override of the tiny-preset row.
DRAWN_SINGLE_CHIP = "1x1 (drawn)"


def _needs(request, impl, capability: str, relation: str) -> None:
    support.require(request, impl("1x1", "float32"), capability, component=relation, dtype="any", mesh="drawn",
                    names=[relation])


def check_meshes_agree(request, factory, case):
    runs = {}
    for mesh in ("1x1", case.mesh):
        logits, taps = forward(case.adapter(factory, mesh), case.tokens(), case.start_pos)
        runs[mesh] = host(logits), {f"{case.tag}.{k}": host(v) for k, v in taps.items()}
    (logits, taps), (base_logits, base_taps) = runs[case.mesh], runs["1x1"]
    if taps or base_taps:
        assert_parity_many(request, component="tp_invariance", actual=taps, expected=base_taps,
                           reference=DRAWN_SINGLE_CHIP, dtype=case.dtype, mesh=case.mesh)
    assert_parity(request, component="tp_invariance", name=f"{case.tag}.logits", actual=logits,
                  expected=base_logits, reference=DRAWN_SINGLE_CHIP, dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(mesh_names=support.TP_MESHES))
def test_meshes_agree_with_single_chip(request, impl_factory, case):
    with run_case(request, case=case):
        check_meshes_agree(request, impl_factory, case)


def check_batch_invariance(request, factory, case):
    tokens = case.tokens()
    together = host(case.adapter(factory).forward(tokens, case.start_pos))
    single = case.adapter(factory, f"1x{parse_mesh(case.mesh)[1]}")
    alone = np.concatenate([host(single.forward(tokens[row:row + 1], case.start_pos)) for row in range(case.batch)])
    assert_parity(request, component="batch_invariance", name=f"{case.tag}.logits", actual=together,
                  expected=alone, reference="alone", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(min_batch=2))
def test_row_alone_equals_row_in_batch(request, impl_factory, case):
    with run_case(request, case=case):
        check_batch_invariance(request, impl_factory, case)


def chunk_sizes(seq: int, cuts) -> list[int]:
    """Cut points folded into 1..seq-1 (so any drawn cut applies to any length), as chunk sizes."""
    points = sorted({1 + (cut - 1) % (seq - 1) for cut in cuts})
    return np.diff([0, *points, seq]).tolist()


def _through_cache(adapter, tokens, start_pos, sizes):
    """Logits of every position, feeding `sizes` tokens at a time from slot 0 (the first at RoPE position
    start_pos), then of one more token decoded from the cache that left."""
    batch, total = tokens.shape
    offset = {"offset": start_pos} if start_pos else {}
    cache, outputs, slot = adapter.init_cache(batch, total + 1), [], 0
    for size in sizes:
        logits, cache = adapter.step(tokens[:, slot:slot + size], slot, cache, **offset)
        outputs.append(host(logits))
        slot += size
    probe, _ = adapter.step(tokens[:, :1], total, cache, **offset)
    return np.concatenate(outputs, axis=1), host(probe)


def check_chunked_prefill(request, factory, case, cuts, start_pos):
    adapter = case.adapter(factory)
    tokens = case.tokens()
    chunked, chunked_next = _through_cache(adapter, tokens, start_pos, chunk_sizes(case.seq, cuts))
    once, once_next = _through_cache(adapter, tokens, start_pos, [case.seq])
    for name, actual, expected in (("logits", chunked, once), ("next_token_logits", chunked_next, once_next)):
        assert_parity(request, component="chunked_prefill", name=f"{case.tag}.{name}", actual=actual,
                      expected=expected, reference="one prefill", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(min_seq=2), cuts=chunk_cuts())
def test_chunked_prefill_equals_one_prefill(request, impl, impl_factory, case, cuts):
    _needs(request, impl, "decode", "chunked_prefill")
    # A drawn position past 0 needs the decode step's `offset`; without it the same relation is checked from 0.
    start_pos = case.start_pos if step_accepts(impl("1x1", "float32"), "offset") else 0
    cuts = fixed_cuts(case.mesh) if cuts is None else cuts  # a fixed-shape profile's chunking, noted as drawn
    with run_case(request, case=case, cuts=cuts):
        check_chunked_prefill(request, impl_factory, case, cuts, start_pos)


def _scores(q, k, config):
    """q_m . k_n of every query head with the kv head it reads, float64, (batch, heads, m, n)."""
    k = np.repeat(np.asarray(k, np.float64), config.n_heads // config.n_kv_heads, axis=2)
    return np.einsum("bmhd,bnhd->bhmn", np.asarray(q, np.float64), k)


def check_rope_relative(request, factory, case):
    adapter = case.adapter(factory)
    q, k = case.heads()
    at_zero = _scores(*map(host, adapter.rope(q, k, 0)), case.config)
    shifted = _scores(*map(host, adapter.rope(q, k, case.start_pos)), case.config)
    assert_parity(request, component="rope_relative", name=f"{case.tag}.scores", actual=shifted,
                  expected=at_zero, reference="start_pos=0", dtype=case.dtype, mesh=case.mesh)


@model_settings()
@given(case=cases(start_pos=start_positions().filter(bool), min_seq=2))  # one token has no distances to compare
def test_rope_scores_depend_on_distance_only(request, impl, impl_factory, case):
    _needs(request, impl, "rope", "rope_relative")
    with run_case(request, case=case):
        check_rope_relative(request, impl_factory, case)


def check_shift_invariance(request, factory, case):
    adapter = case.adapter(factory)
    tokens = case.tokens()
    at_zero = host(adapter.forward(tokens, 0))
    shifted = host(adapter.forward(tokens, case.start_pos))
    assert_parity(request, component="position_shift", name=f"{case.tag}.logits", actual=shifted,
                  expected=at_zero, reference="start_pos=0", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(start_pos=start_positions().filter(bool)))
def test_forward_depends_on_distance_only(request, impl_factory, case):
    with run_case(request, case=case):
        check_shift_invariance(request, impl_factory, case)
