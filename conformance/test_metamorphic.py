"""Metamorphic relations: runs of the model under test that must agree with each other, for drawn cases.

- Tensor-parallel invariance: 1x2, 1x4, 1x8 and 2x4 give the 1x1 intermediates and logits for any drawn config
  and position (test_tp_invariance.py holds the tiny preset on every mesh).
- Batch invariance: each row of a batch, run alone on the same model axis (1xM), gives the logits it had in the
  batch, also when the batch was split over a data axis.
- KV cache: a prompt fed through the cache in drawn chunks leaves the cache and logits of one prefill; chunks
  of one token make this prefill plus decode (test_kv_cache.py compares that with one forward).
- Relative position: RoPE makes q_m . k_n depend on m - n only, so the scores are the same at any offset, and so
  is a whole forward without earlier context (the causal mask goes by slot). It holds in exact arithmetic at
  every offset and scaling; in floating point up to the rounding of position * frequency, which grows with the
  offset (bounds measured up to 16384). It does not hold across different earlier contexts, so no cache here.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from conformance.strategies import MAX_SEQ, cases, meshes, model_settings, run_case, start_positions
from parity import assert_parity, assert_parity_many
from tp_llama import components
from tp_llama.model import to_numpy

TP_MESHES = ("1x2", "1x4", "1x8", "2x4")


def check_meshes_agree(request, case):
    runs = {}
    for mesh in ("1x1", case.mesh):
        model, params = case.model(mesh)
        logits, taps = model.forward(params, case.tokens(), case.start_pos, capture=True)
        runs[mesh] = to_numpy(logits), {f"{case.tag}.{k}": to_numpy(v) for k, v in taps.items()}
    (logits, taps), (base_logits, base_taps) = runs[case.mesh], runs["1x1"]
    assert_parity_many(request, component="tp_invariance", actual=taps, expected=base_taps, reference="1x1",
                       dtype=case.dtype, mesh=case.mesh)
    assert_parity(request, component="tp_invariance", name=f"{case.tag}.logits", actual=logits,
                  expected=base_logits, reference="1x1", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(mesh=meshes(TP_MESHES)))
def test_meshes_agree_with_single_chip(request, case):
    with run_case(request, case=case):
        check_meshes_agree(request, case)


def check_batch_invariance(request, case):
    model, params = case.model()
    tokens = case.tokens()
    together = to_numpy(model.forward(params, tokens, case.start_pos))
    single, single_params = case.model(f"1x{model.model_parallel}")
    alone = np.concatenate([to_numpy(single.forward(single_params, tokens[row:row + 1], case.start_pos))
                            for row in range(case.batch)])
    assert_parity(request, component="batch_invariance", name=f"{case.tag}.logits", actual=together,
                  expected=alone, reference="alone", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(min_batch=2))
def test_row_alone_equals_row_in_batch(request, case):
    with run_case(request, case=case):
        check_batch_invariance(request, case)


def chunk_sizes(seq: int, cuts) -> list[int]:
    """Cut points folded into 1..seq-1 (so any drawn cut applies to any length), as chunk sizes."""
    points = sorted({1 + (cut - 1) % (seq - 1) for cut in cuts})
    return np.diff([0, *points, seq]).tolist()


def _through_cache(model, params, tokens, start_pos, sizes):
    """Logits of every position and the final cache, feeding `sizes` tokens at a time from slot 0."""
    batch, total = tokens.shape
    slots = np.arange(total)
    cache, outputs, slot = model.init_cache(batch, total), [], 0
    for size in sizes:
        end = slot + size
        logits, cache = model.step(params, tokens[:, slot:end], np.broadcast_to(start_pos + slots[slot:end],
                                   (batch, size)), cache, slot, np.broadcast_to(slots < end, (batch, total)))
        outputs.append(to_numpy(logits))
        slot = end
    layers = {f"layers.{i}.cache_{kv}": to_numpy(c) for i, pair in enumerate(cache) for kv, c in zip("kv", pair)}
    return np.concatenate(outputs, axis=1), layers


def check_chunked_prefill(request, case, cuts):
    model, params = case.model()
    tokens = case.tokens()
    chunked, chunked_cache = _through_cache(model, params, tokens, case.start_pos, chunk_sizes(case.seq, cuts))
    once, once_cache = _through_cache(model, params, tokens, case.start_pos, [case.seq])
    assert_parity_many(request, component="chunked_prefill",
                       actual={f"{case.tag}.{k}": v for k, v in chunked_cache.items()},
                       expected={f"{case.tag}.{k}": v for k, v in once_cache.items()},
                       reference="one prefill", dtype=case.dtype, mesh=case.mesh)
    assert_parity(request, component="chunked_prefill", name=f"{case.tag}.logits", actual=chunked, expected=once,
                  reference="one prefill", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(min_seq=2), cuts=st.lists(st.integers(1, MAX_SEQ - 1), min_size=1, max_size=2))
def test_chunked_prefill_equals_one_prefill(request, case, cuts):
    with run_case(request, case=case, cuts=cuts):
        check_chunked_prefill(request, case, cuts)


def _scores(q, k, config):
    """q_m . k_n of every query head with the kv head it reads, float64, (batch, heads, m, n)."""
    k = np.repeat(np.asarray(k, np.float64), config.n_heads // config.n_kv_heads, axis=2)
    return np.einsum("bmhd,bnhd->bhmn", np.asarray(q, np.float64), k)


def check_rope_relative(request, case):
    model, _ = case.model()
    q, k = case.heads()
    at_zero = _scores(*components.rope(model, q, k, 0), case.config)
    shifted = _scores(*components.rope(model, q, k, case.start_pos), case.config)
    assert_parity(request, component="rope_relative", name=f"{case.tag}.scores", actual=shifted,
                  expected=at_zero, reference="start_pos=0", dtype=case.dtype, mesh=case.mesh)


@model_settings()
@given(case=cases(start_pos=start_positions().filter(bool), min_seq=2))  # one token has no distances to compare
def test_rope_scores_depend_on_distance_only(request, case):
    with run_case(request, case=case):
        check_rope_relative(request, case)


def check_shift_invariance(request, case):
    model, params = case.model()
    tokens = case.tokens()
    at_zero = to_numpy(model.forward(params, tokens, 0))
    shifted = to_numpy(model.forward(params, tokens, case.start_pos))
    assert_parity(request, component="position_shift", name=f"{case.tag}.logits", actual=shifted,
                  expected=at_zero, reference="start_pos=0", dtype=case.dtype, mesh=case.mesh, logits=True)


@model_settings()
@given(case=cases(start_pos=start_positions().filter(bool)))
def test_forward_depends_on_distance_only(request, case):
    with run_case(request, case=case):
        check_shift_invariance(request, case)
