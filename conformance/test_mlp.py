"""SwiGLU MLP of the implementation under test: gate (w1), up (w3), down (w2) and its all-reduce."""
import pytest

from adapters.protocol import host
from conformance import support
from parity import assert_parity
from reference import oracle


def check_mlp(request, adapter, reference, dtype, mesh, layer_index):
    scope = dict(component="mlp", reference=reference, dtype=dtype, mesh=mesh)
    support.require(request, adapter, "feed_forward", **scope, names=["mlp_out"])
    x = support.activations(dtype, 16, seed=14)
    actual = support.run(request, adapter.feed_forward, x, layer_index,
                         **scope, layer=layer_index, name="mlp_out")
    expected, exact = support.feed_forward(reference, dtype, layer_index)
    lw = support.layer(dtype, layer_index)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_feed_forward(
        x, lw["w1"], lw["w2"], lw["w3"], variant))
    assert_parity(request, name="mlp_out", layer=layer_index, actual=host(actual), expected=expected,
                  oracle=exact, **scope, diagnose=diagnose)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp(request, impl, reference, dtype, mesh, layer_index):
    adapter = support.subject(request, impl, mesh, dtype, component="mlp", reference=reference)
    check_mlp(request, adapter, reference, dtype, mesh, layer_index)
