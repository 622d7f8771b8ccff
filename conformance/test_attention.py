"""GQA causal attention, column-parallel q/k/v and row-parallel wo, with and without the KV cache.

'prefill' is one chunk; 'cached' feeds chunks of 12, 6, 1 and 1 tokens so that later chunks read keys and
values written by earlier ones; 'pos9000' is one chunk starting past the original RoPE context.
"""
import pytest

from conformance import support
from parity import assert_parity
from tp_llama import components

CASES = {
    "prefill": ((20,), 0),
    "cached": ((12, 6, 1, 1), 0),
    "pos9000": ((20,), 9000),
}


def check_attention(request, model, params, reference, dtype, mesh, case, layer_index):
    sizes, start_pos = CASES[case]
    actual = components.attention(model, params, support.attention_chunks(dtype, sizes), layer=layer_index,
                                  start_pos=start_pos)
    expected, exact = support.attention(reference, dtype, layer_index, sizes, start_pos)
    for chunk, (a, e, o) in enumerate(zip(actual, expected, exact)):
        assert_parity(request, component="attention", name=f"{case}.chunk{chunk}", layer=layer_index, actual=a,
                      expected=e, oracle=o, reference=reference, dtype=dtype, mesh=mesh)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_attention(request, tp_model, reference, dtype, mesh, case, layer_index):
    check_attention(request, *tp_model(mesh, dtype), reference, dtype, mesh, case, layer_index)
