"""RMSNorm of the implementation under test against the reference's own module, on inputs whose small rows
make eps matter, and (extremes) on hidden states with outlier channels 10^3 times the rest."""
import pytest

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import oracle


def check_rmsnorm(request, adapter, reference, dtype, mesh, layer_index, which, extreme=None):
    scope = dict(component="rmsnorm", reference=reference, dtype=dtype, mesh=mesh)
    name = which if extreme is None else f"{which}.{extreme}"
    support.require(request, adapter, "rms_norm", **scope, names=[name])
    x = support.activations(dtype, 16, seed=11, spread=True, extreme=extreme)
    actual = support.run(request, adapter.rms_norm, x, layer_index, which, **scope, layer=layer_index, name=name)
    expected, exact = support.rms_norm(reference, dtype, layer_index, which, extreme)
    weight = support.layer(dtype, layer_index)[which]
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_rms_norm(
        x, weight, config.norm_eps, variant))
    assert_parity(request, name=name, layer=layer_index, actual=host(actual), expected=expected, oracle=exact,
                  **scope, diagnose=diagnose)


@pytest.mark.parametrize("layer_index, which", [(0, "attention_norm"), (1, "ffn_norm")])
def test_rmsnorm(request, impl, reference, dtype, mesh, layer_index, which):
    adapter = support.subject(request, impl, mesh, dtype, component="rmsnorm", reference=reference)
    check_rmsnorm(request, adapter, reference, dtype, mesh, layer_index, which)


@pytest.mark.parametrize("layer_index, which", [(0, "attention_norm"), (1, "ffn_norm")])
def test_rmsnorm_extremes(request, impl, reference, dtype, mesh, layer_index, which):
    """Massive activations: two channels 10^3 times the rest (max/median |x| asserted >= 10^3)."""
    x = support.activations(dtype, 16, seed=11, spread=True, extreme="outliers")
    assert extremes.outlier_ratio(x[..., 0, :]) >= extremes.MIN_OUTLIER_RATIO
    adapter = support.subject(request, impl, mesh, dtype, component="rmsnorm", reference=reference)
    check_rmsnorm(request, adapter, reference, dtype, mesh, layer_index, which, extreme="outliers")
