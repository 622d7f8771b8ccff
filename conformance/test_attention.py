"""GQA causal attention of the implementation under test (q/k/v, RoPE, softmax, wo and its all-reduce), with
and without the KV cache.

'prefill' is one chunk; 'cached' feeds chunks of 12, 6, 1 and 1 tokens so that later chunks read keys and
values written by earlier ones; 'pos9000' is one chunk starting past the original RoPE context; 'prefill128' is
one chunk of 128 tokens from position 0, where RoPE rounds least and rows are long, so a bf16 implementation that
rounds where Meta rounds agrees with it far inside the bf16 bound, and the override scoped to this case can see a
softmax computed in bf16 (parity/tolerances.py); 'extreme' is the chunks of 'cached' on inputs with a long run
of one repeated position, scaled so that scores after the 1/sqrt(head_dim) scaling reach >= 100 (asserted on the
oracle's q and k; fixtures/extremes.py).
"""
import numpy as np
import pytest

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import oracle

CASES = {
    "prefill": ((20,), 0),
    "cached": ((12, 6, 1, 1), 0),
    "pos9000": ((20,), 9000),
    "extreme": ((12, 6, 1, 1), 0, "scores"),
    "prefill128": ((128,), 0),
}


def check_attention(request, adapter, reference, dtype, mesh, case, layer_index):
    sizes, start_pos, *extreme = CASES[case]
    extreme = extreme[0] if extreme else None
    scope = dict(component="attention", reference=reference, dtype=dtype, mesh=mesh)
    names = [f"{case}.chunk{chunk}" for chunk in range(len(sizes))]
    support.require(request, adapter, "attention", **scope, names=names)
    chunks = support.attention_chunks(dtype, sizes, extreme, layer_index, start_pos)
    if extreme:
        _, q, k = oracle.attention(np.concatenate(chunks, axis=1), support.layer(dtype, layer_index), support.CONFIG,
                                   start_pos + np.arange(sum(sizes)))
        reached = extremes.max_causal_score(q, k)
        assert reached >= extremes.MIN_SCORE, f"case {case}: scores reach only {reached:.1f}"
    actual = support.run(request, adapter.attention, chunks, layer_index, start_pos, **scope, layer=layer_index,
                         name=case)
    expected, exact = support.attention(reference, dtype, layer_index, sizes, start_pos, extreme)
    if len(actual) != len(expected):
        raise AssertionError(f"component 'attention', layer {layer_index}: {len(sizes)} chunks in, "
                             f"{len(actual)} outputs back")
    for index, (name, a, e, o) in enumerate(zip(names, actual, expected, exact)):
        diagnose = support.diagnosis(dtype, mesh, lambda config, variant, index=index: oracle.oracle_attention(
            chunks, support.layer(dtype, layer_index), config, start_pos, variant)[index])
        assert_parity(request, name=name, layer=layer_index, actual=host(a), expected=e, oracle=o, **scope,
                      diagnose=diagnose)


# prefill128 first: the most sensitive case, so a run stopping at its first failure (-x) reports the widest margin
@pytest.mark.parametrize("case", ["prefill128", *sorted(set(CASES) - {"prefill128"})])
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_attention(request, impl, reference, dtype, mesh, case, layer_index):
    adapter = support.subject(request, impl, mesh, dtype, component="attention", reference=reference)
    check_attention(request, adapter, reference, dtype, mesh, case, layer_index)
