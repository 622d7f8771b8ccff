"""The full forward: every layer's named intermediates, then the logits (KL, top-1, top-k as well).

'batch' is two sequences of 48 tokens; 'long' is one sequence of 512 tokens, because RoPE is close to the
identity at early positions and a partial-RoPE bug can pass short prompts.
"""
import pytest

from conformance import support
from parity import assert_parity, assert_parity_many
from tp_llama.model import to_numpy

CASES = {"batch": (2, 48), "long": (1, 512)}


def check_logits(request, model, params, reference, dtype, mesh, case):
    batch, seq = CASES[case]
    logits, taps = model.forward(params, support.tokens(batch, seq, seed=16), capture=True)
    (ref_logits, ref_taps), (exact_logits, exact_taps) = support.full_forward(reference, dtype, batch, seq)
    assert_parity_many(request, component="intermediate", actual={k: to_numpy(v) for k, v in taps.items()},
                       expected={k: v for k, v in ref_taps.items() if k != "logits"}, oracle=exact_taps,
                       reference=reference, dtype=dtype, mesh=mesh)
    assert_parity(request, component="logits", name=f"logits.{case}", actual=to_numpy(logits),
                  expected=ref_logits, oracle=exact_logits, reference=reference, dtype=dtype, mesh=mesh,
                  logits=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits(request, tp_model, reference, dtype, mesh, case):
    model, params = tp_model(mesh, dtype)
    if CASES[case][0] % model.data_parallel:
        pytest.skip(f"batch {CASES[case][0]} does not split over the data axis of {mesh}")
    check_logits(request, model, params, reference, dtype, mesh, case)
