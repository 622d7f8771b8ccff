"""One whole transformer block of the implementation under test (norms, attention, MLP, both residuals), at
position 0 and past 8192; (extremes) with outlier channels 5 x 10^3 times the rest in the residual stream."""
import pytest

from conformance.components import BLOCK, inputs
from fixtures import extremes


@pytest.mark.parametrize("start_pos", [9000, 0], ids=lambda p: f"pos{p}")  # past the RoPE ramp first (-x)
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block(judge, layer_index, start_pos):
    judge.check(BLOCK, layer_index=layer_index, start_pos=start_pos)


@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_block_extremes(judge, layer_index):
    """Massive activations in the residual stream: both norms, both residual adds, at position 0."""
    x, _ = inputs(BLOCK, judge.dtype, layer_index=layer_index, start_pos=0, extreme="outliers")
    assert extremes.outlier_ratio(x) >= extremes.MIN_OUTLIER_RATIO
    judge.check(BLOCK, layer_index=layer_index, start_pos=0, extreme="outliers")
