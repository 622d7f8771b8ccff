"""RMSNorm against the reference's own module, on inputs whose small rows make eps matter."""
import pytest

from conformance import support
from parity import assert_parity
from tp_llama import components


def check_rmsnorm(request, model, params, reference, dtype, mesh, layer_index, which):
    actual = components.rms_norm(model, params, support.activations(dtype, 16, seed=11, spread=True),
                                 layer=layer_index, which=which)
    expected, exact = support.rms_norm(reference, dtype, layer_index, which)
    assert_parity(request, component="rmsnorm", name=which, layer=layer_index, actual=actual, expected=expected,
                  oracle=exact, reference=reference, dtype=dtype, mesh=mesh)


@pytest.mark.parametrize("layer_index, which", [(0, "attention_norm"), (1, "ffn_norm")])
def test_rmsnorm(request, tp_model, reference, dtype, mesh, layer_index, which):
    check_rmsnorm(request, *tp_model(mesh, dtype), reference, dtype, mesh, layer_index, which)
