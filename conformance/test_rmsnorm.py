"""RMSNorm of the implementation under test against the reference's own module, on inputs whose small rows
make eps matter."""
import pytest

from adapters.protocol import host
from conformance import support
from parity import assert_parity
from reference import oracle


def check_rmsnorm(request, adapter, reference, dtype, mesh, layer_index, which):
    scope = dict(component="rmsnorm", reference=reference, dtype=dtype, mesh=mesh)
    support.require(request, adapter, "rms_norm", **scope, names=[which])
    actual = support.run(request, adapter.rms_norm, support.activations(dtype, 16, seed=11, spread=True),
                         layer_index, which, **scope, layer=layer_index, name=which)
    expected, exact = support.rms_norm(reference, dtype, layer_index, which)
    x, weight = support.activations(dtype, 16, seed=11, spread=True), support.layer(dtype, layer_index)[which]
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_rms_norm(
        x, weight, config.norm_eps, variant))
    assert_parity(request, name=which, layer=layer_index, actual=host(actual), expected=expected, oracle=exact,
                  **scope, diagnose=diagnose)


@pytest.mark.parametrize("layer_index, which", [(0, "attention_norm"), (1, "ffn_norm")])
def test_rmsnorm(request, impl, reference, dtype, mesh, layer_index, which):
    adapter = support.subject(request, impl, mesh, dtype, component="rmsnorm", reference=reference)
    check_rmsnorm(request, adapter, reference, dtype, mesh, layer_index, which)
