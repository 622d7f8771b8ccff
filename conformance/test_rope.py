"""RoPE in Meta's interleaved layout with Llama 3.1 frequency scaling, on the implementation under test.

Positions 0, a start offset inside the scaling ramp (4000) and past the original 8192-token context (9000),
where the scaling changes the long wavelengths by a factor of 8 and a missing scaling is plain to see; (extremes)
a peaked query whose scores against the keys reach >= 100.
"""
import pytest

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import oracle


def check_rope(request, adapter, reference, dtype, mesh, start_pos, extreme=None):
    scope = dict(component="rope", reference=reference, dtype=dtype, mesh=mesh)
    tag = "" if extreme is None else f".{extreme}"
    names = [f"q_rope@{start_pos}{tag}", f"k_rope@{start_pos}{tag}"]
    support.require(request, adapter, "rope", **scope, names=names)
    q, k = support.heads(dtype, 16, seed=12, extreme=extreme)
    actual = support.run(request, adapter.rope, q, k, start_pos, **scope, name=names[0])
    expected, exact = support.rope(reference, dtype, start_pos, extreme)
    for index, name in enumerate(names):
        diagnose = support.diagnosis(dtype, mesh, lambda config, variant, index=index: oracle.oracle_rope(
            q, k, config, start_pos, variant)[index])
        assert_parity(request, name=name, actual=host(actual[index]), expected=expected[index],
                      oracle=exact[index], **scope, diagnose=diagnose)


# past the Llama 3.1 scaling ramp first: where RoPE deviations show most, so a run stopping at its first failure
# (-x, the mutant kill matrix) reports the widest margin
@pytest.mark.parametrize("start_pos", [9000, 0, 4000], ids=lambda p: f"pos{p}")
def test_rope(request, impl, reference, dtype, mesh, start_pos):
    adapter = support.subject(request, impl, mesh, dtype, component="rope", reference=reference)
    check_rope(request, adapter, reference, dtype, mesh, start_pos)


@pytest.mark.parametrize("start_pos", [0, 9000], ids=lambda p: f"pos{p}")
def test_rope_extremes(request, impl, reference, dtype, mesh, start_pos):
    """A peaked query: after rotation its scores against the keys reach >= 100 (asserted on the oracle's)."""
    _, (q, k) = support.rope(reference, dtype, start_pos, "peaked")
    assert extremes.max_causal_score(q, k) >= extremes.MIN_SCORE
    adapter = support.subject(request, impl, mesh, dtype, component="rope", reference=reference)
    check_rope(request, adapter, reference, dtype, mesh, start_pos, extreme="peaked")
