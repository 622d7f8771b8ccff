"""GQA causal attention of the implementation under test (q/k/v, RoPE, softmax, wo and its all-reduce), with
and without the KV cache.

'prefill' is one chunk; 'cached' feeds chunks of 12, 6, 1 and 1 tokens so that later chunks read keys and
values written by earlier ones; 'pos9000' is one chunk starting past the original RoPE context; 'prefill128' is
one chunk of 128 tokens from position 0, where RoPE rounds least and rows are long, so a bf16 implementation that
rounds where Meta rounds agrees with it far inside the bf16 bound, and the override scoped to this case can see a
softmax computed in bf16 (fixtures/tolerances.py).
"""
import pytest

from adapters.protocol import host
from conformance import support
from parity import assert_parity

CASES = {
    "prefill": ((20,), 0),
    "cached": ((12, 6, 1, 1), 0),
    "pos9000": ((20,), 9000),
    "prefill128": ((128,), 0),
}


def check_attention(request, adapter, reference, dtype, mesh, case, layer_index):
    sizes, start_pos = CASES[case]
    scope = dict(component="attention", reference=reference, dtype=dtype, mesh=mesh)
    names = [f"{case}.chunk{chunk}" for chunk in range(len(sizes))]
    support.require(request, adapter, "attention", **scope, names=names)
    actual = support.run(request, adapter.attention, support.attention_chunks(dtype, sizes), layer_index,
                         start_pos, **scope, layer=layer_index, name=case)
    expected, exact = support.attention(reference, dtype, layer_index, sizes, start_pos)
    if len(actual) != len(expected):
        raise AssertionError(f"component 'attention', layer {layer_index}: {len(sizes)} chunks in, "
                             f"{len(actual)} outputs back")
    for name, a, e, o in zip(names, actual, expected, exact):
        assert_parity(request, name=name, layer=layer_index, actual=host(a), expected=e, oracle=o, **scope)


# prefill128 first: the most sensitive case, so a run stopping at its first failure (-x) reports the widest margin
@pytest.mark.parametrize("case", ["prefill128", *sorted(set(CASES) - {"prefill128"})])
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_attention(request, impl, reference, dtype, mesh, case, layer_index):
    adapter = support.subject(request, impl, mesh, dtype, component="attention", reference=reference)
    check_attention(request, adapter, reference, dtype, mesh, case, layer_index)
