"""SwiGLU MLP: column-parallel gate (w1) and up (w3), row-parallel down (w2) with one all-reduce."""
import pytest

from conformance import support
from parity import assert_parity
from tp_llama import components


def check_mlp(request, model, params, reference, dtype, mesh, layer_index):
    actual = components.feed_forward(model, params, support.activations(dtype, 16, seed=14), layer=layer_index)
    expected, exact = support.feed_forward(reference, dtype, layer_index)
    assert_parity(request, component="mlp", name="mlp_out", layer=layer_index, actual=actual, expected=expected,
                  oracle=exact, reference=reference, dtype=dtype, mesh=mesh)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp(request, tp_model, reference, dtype, mesh, layer_index):
    check_mlp(request, *tp_model(mesh, dtype), reference, dtype, mesh, layer_index)
