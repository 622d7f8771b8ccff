"""SwiGLU MLP of the implementation under test: gate (w1), up (w3), down (w2) and its all-reduce; (extremes) on
inputs with outlier channels 10^3 times the rest."""
import pytest

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import oracle


def check_mlp(request, adapter, reference, dtype, mesh, layer_index, extreme=None):
    scope = dict(component="mlp", reference=reference, dtype=dtype, mesh=mesh)
    name = "mlp_out" if extreme is None else f"mlp_out.{extreme}"
    support.require(request, adapter, "feed_forward", **scope, names=[name])
    x = support.activations(dtype, 16, seed=14, extreme=extreme)
    actual = support.run(request, adapter.feed_forward, x, layer_index, **scope, layer=layer_index, name=name)
    expected, exact = support.feed_forward(reference, dtype, layer_index, extreme)
    lw = support.layer(dtype, layer_index)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_feed_forward(
        x, lw["w1"], lw["w2"], lw["w3"], variant))
    assert_parity(request, name=name, layer=layer_index, actual=host(actual), expected=expected,
                  oracle=exact, **scope, diagnose=diagnose)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp(request, impl, reference, dtype, mesh, layer_index):
    adapter = support.subject(request, impl, mesh, dtype, component="mlp", reference=reference)
    check_mlp(request, adapter, reference, dtype, mesh, layer_index)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp_extremes(request, impl, reference, dtype, mesh, layer_index):
    """Outlier channels 10^3 times the rest go through the gate, up and down projections."""
    assert extremes.outlier_ratio(support.activations(dtype, 16, seed=14, extreme="outliers")) \
        >= extremes.MIN_OUTLIER_RATIO
    adapter = support.subject(request, impl, mesh, dtype, component="mlp", reference=reference)
    check_mlp(request, adapter, reference, dtype, mesh, layer_index, extreme="outliers")
