"""One whole transformer block of the implementation under test (norms, attention, MLP, both residuals), at
position 0 and past 8192; (extremes) with outlier channels 10^3 times the rest in the residual stream."""
import pytest

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import oracle


def check_block(request, adapter, reference, dtype, mesh, layer_index, start_pos, extreme=None):
    scope = dict(component="block", reference=reference, dtype=dtype, mesh=mesh)
    name = f"block_out@{start_pos}" + ("" if extreme is None else f".{extreme}")
    support.require(request, adapter, "block", **scope, names=[name])
    x = support.activations(dtype, 16, seed=15, extreme=extreme)
    actual = support.run(request, adapter.block, x, layer_index, start_pos, **scope, layer=layer_index, name=name)
    expected, exact = support.block(reference, dtype, layer_index, start_pos, extreme)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_block(
        x, support.layer(dtype, layer_index), config, start_pos, variant))
    assert_parity(request, name=name, layer=layer_index, actual=host(actual), expected=expected, oracle=exact,
                  **scope, diagnose=diagnose)


@pytest.mark.parametrize("start_pos", [9000, 0], ids=lambda p: f"pos{p}")  # past the RoPE ramp first (-x)
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block(request, impl, reference, dtype, mesh, layer_index, start_pos):
    adapter = support.subject(request, impl, mesh, dtype, component="block", reference=reference)
    check_block(request, adapter, reference, dtype, mesh, layer_index, start_pos)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block_extremes(request, impl, reference, dtype, mesh, layer_index):
    """Massive activations in the residual stream: both norms, both residual adds, at position 0."""
    assert extremes.outlier_ratio(support.activations(dtype, 16, seed=15, extreme="outliers")) \
        >= extremes.MIN_OUTLIER_RATIO
    adapter = support.subject(request, impl, mesh, dtype, component="block", reference=reference)
    check_block(request, adapter, reference, dtype, mesh, layer_index, 0, extreme="outliers")
