"""RoPE in Meta's interleaved layout with Llama 3.1 frequency scaling, on the implementation under test.

Positions 0, a start offset inside the scaling ramp (4000) and past the original 8192-token context (9000),
where the scaling changes the long wavelengths by a factor of 8 and a missing scaling is plain to see; (extremes)
a peaked query whose scores against the keys reach >= 100 (the record's precondition asserts it).
"""
import pytest

from conformance.components import ROPE


# past the Llama 3.1 scaling ramp first: where RoPE deviations show most, so a run stopping at its first failure
# (-x, the mutant kill matrix) reports the widest margin
@pytest.mark.parametrize("start_pos", [9000, 0, 4000], ids=lambda p: f"pos{p}")
def test_rope(judge, start_pos):
    judge.check(ROPE, start_pos=start_pos)


@pytest.mark.parametrize("start_pos", [0, 9000], ids=lambda p: f"pos{p}")
def test_rope_extremes(judge, start_pos):
    """A peaked query: after rotation its scores against the keys reach >= 100."""
    judge.check(ROPE, start_pos=start_pos, extreme="peaked")
