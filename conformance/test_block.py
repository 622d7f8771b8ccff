"""One whole transformer block of the implementation under test (norms, attention, MLP, both residuals), at
position 0 and past 8192."""
import pytest

from adapters.protocol import host
from conformance import support
from parity import assert_parity


def check_block(request, adapter, reference, dtype, mesh, layer_index, start_pos):
    scope = dict(component="block", reference=reference, dtype=dtype, mesh=mesh)
    name = f"block_out@{start_pos}"
    support.require(request, adapter, "block", **scope, names=[name])
    actual = support.run(request, adapter.block, support.activations(dtype, 16, seed=15), layer_index, start_pos,
                         **scope, layer=layer_index, name=name)
    expected, exact = support.block(reference, dtype, layer_index, start_pos)
    assert_parity(request, name=name, layer=layer_index, actual=host(actual), expected=expected, oracle=exact,
                  **scope)


@pytest.mark.parametrize("start_pos", [9000, 0], ids=lambda p: f"pos{p}")  # past the RoPE ramp first (-x)
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block(request, impl, reference, dtype, mesh, layer_index, start_pos):
    adapter = support.subject(request, impl, mesh, dtype, component="block", reference=reference)
    check_block(request, adapter, reference, dtype, mesh, layer_index, start_pos)
