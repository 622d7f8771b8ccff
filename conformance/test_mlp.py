"""SwiGLU MLP of the implementation under test: gate (w1), up (w3), down (w2) and its all-reduce; (extremes) on
inputs with outlier channels 5 x 10^3 times the rest."""
import pytest

from conformance.components import MLP, inputs
from fixtures import extremes


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp(judge, layer_index):
    judge.check(MLP, layer_index=layer_index)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_mlp_extremes(judge, layer_index):
    """Outlier channels 5 x 10^3 times the rest go through the gate, up and down projections."""
    x, _ = inputs(MLP, judge.dtype, layer_index=layer_index, extreme="outliers")
    assert extremes.outlier_ratio(x) >= extremes.MIN_OUTLIER_RATIO
    judge.check(MLP, layer_index=layer_index, extreme="outliers")
