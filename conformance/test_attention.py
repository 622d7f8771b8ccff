"""GQA causal attention of the implementation under test (q/k/v, RoPE, softmax, wo and its all-reduce), with
and without the KV cache.

'prefill' is one chunk; 'cached' feeds chunks of 12, 6, 1 and 1 tokens so that later chunks read keys and
values written by earlier ones; 'pos9000' is one chunk starting past the original RoPE context; 'prefill128' is
one chunk of 128 tokens from position 0, where RoPE rounds least and rows are long, so a bf16 implementation that
rounds where Meta rounds agrees with it far inside the bf16 bound, and the override scoped to this case can see a
softmax computed in bf16 (parity/tolerances.py); 'extreme' is the chunks of 'cached' on inputs with a long run
of one repeated position, scaled so that scores after the 1/sqrt(head_dim) scaling reach >= 100 (asserted on the
oracle's q and k; fixtures/extremes.py).
"""
import pytest

from conformance.components import ATTENTION, ATTENTION_CASES


# prefill128 first: the most sensitive case, so a run stopping at its first failure (-x) reports the widest margin
@pytest.mark.parametrize("case", ["prefill128", *sorted(set(ATTENTION_CASES) - {"prefill128"})])
@pytest.mark.parametrize("layer_index", [0, 1], ids=lambda i: f"layer{i}")
def test_attention(judge, case, layer_index):
    judge.check(ATTENTION, case=case, layer_index=layer_index)
