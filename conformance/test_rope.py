"""RoPE in Meta's interleaved layout with Llama 3.1 frequency scaling.

Positions 0, a start offset inside the scaling ramp (4000) and past the original 8192-token context (9000),
where the scaling changes the long wavelengths by a factor of 8 and a missing scaling is plain to see.
"""
import pytest

from conformance import support
from parity import assert_parity
from tp_llama import components


def check_rope(request, model, params, reference, dtype, mesh, start_pos):
    q, k = support.heads(dtype, 16, seed=12)
    actual = components.rope(model, q, k, start_pos=start_pos)
    expected, exact = support.rope(reference, dtype, start_pos)
    for index, name in enumerate(("q_rope", "k_rope")):
        assert_parity(request, component="rope", name=f"{name}@{start_pos}", actual=actual[index],
                      expected=expected[index], oracle=exact[index], reference=reference, dtype=dtype, mesh=mesh)


@pytest.mark.parametrize("start_pos", [0, 4000, 9000], ids=lambda p: f"pos{p}")
def test_rope(request, tp_model, reference, dtype, mesh, start_pos):
    check_rope(request, *tp_model(mesh, dtype), reference, dtype, mesh, start_pos)
