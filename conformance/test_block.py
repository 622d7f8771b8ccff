"""One whole transformer block (norms, attention, MLP, both residuals), at position 0 and past 8192."""
import pytest

from conformance import support
from parity import assert_parity
from tp_llama import components


def check_block(request, model, params, reference, dtype, mesh, layer_index, start_pos):
    actual = components.block(model, params, support.activations(dtype, 16, seed=15), layer=layer_index,
                              start_pos=start_pos)
    expected, exact = support.block(reference, dtype, layer_index, start_pos)
    assert_parity(request, component="block", name=f"block_out@{start_pos}", layer=layer_index, actual=actual,
                  expected=expected, oracle=exact, reference=reference, dtype=dtype, mesh=mesh)


@pytest.mark.parametrize("start_pos", [0, 9000], ids=lambda p: f"pos{p}")
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block(request, tp_model, reference, dtype, mesh, layer_index, start_pos):
    check_block(request, *tp_model(mesh, dtype), reference, dtype, mesh, layer_index, start_pos)
