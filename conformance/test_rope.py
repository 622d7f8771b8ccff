"""RoPE in Meta's interleaved layout with Llama 3.1 frequency scaling, on the implementation under test.

Positions 0, a start offset inside the scaling ramp (4000) and past the original 8192-token context (9000),
where the scaling changes the long wavelengths by a factor of 8 and a missing scaling is plain to see.
"""
import pytest

from adapters.protocol import host
from conformance import support
from parity import assert_parity


def check_rope(request, adapter, reference, dtype, mesh, start_pos):
    scope = dict(component="rope", reference=reference, dtype=dtype, mesh=mesh)
    names = [f"q_rope@{start_pos}", f"k_rope@{start_pos}"]
    support.require(request, adapter, "rope", **scope, names=names)
    q, k = support.heads(dtype, 16, seed=12)
    actual = support.run(request, adapter.rope, q, k, start_pos, **scope, name=names[0])
    expected, exact = support.rope(reference, dtype, start_pos)
    for index, name in enumerate(names):
        assert_parity(request, name=name, actual=host(actual[index]), expected=expected[index],
                      oracle=exact[index], **scope)


# past the Llama 3.1 scaling ramp first: where RoPE deviations show most, so a run stopping at its first failure
# (-x, the mutant kill matrix) reports the widest margin
@pytest.mark.parametrize("start_pos", [9000, 0, 4000], ids=lambda p: f"pos{p}")
def test_rope(request, impl, reference, dtype, mesh, start_pos):
    adapter = support.subject(request, impl, mesh, dtype, component="rope", reference=reference)
    check_rope(request, adapter, reference, dtype, mesh, start_pos)
