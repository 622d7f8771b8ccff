"""The padded-batch decode check (conformance.decode.check_batched_prompts) on fake decoders: it passes one that
decodes each row as alone, and on one whose batch comes out NaN it fails with a failed kv_cache record per row
(the logits are recorded before the tokens are compared, so the report shows the NaN, not only a token mismatch).
"""
from __future__ import annotations

import numpy as np
import pytest

from conformance import support
from conformance.decode import batched_prompts, check_batched_prompts
from llama_spec.config import preset
from parity.check import RECORD_KEY

TINY = preset("tiny")


class TokenwiseDecoder:
    """A decoder whose logits at a slot depend only on the token there: batched or alone, padded or not, each
    row's logits are the same. Needs no cache."""

    def __init__(self, nan_in_batch: bool = False):
        self.table = np.random.default_rng(0).normal(size=(TINY.vocab_size, TINY.vocab_size)).astype(np.float32)
        self.nan_in_batch = nan_in_batch

    def init_cache(self, batch, length):
        return None

    def step(self, tokens, start_pos, cache, pad=None, offset=0):
        logits = self.table[np.asarray(tokens)]
        if self.nan_in_batch and logits.shape[0] > 1:
            logits = np.full_like(logits, np.nan)
        return logits, cache


def _records(probe):
    return [value for key, value in probe.node.user_properties if key == RECORD_KEY]


def test_a_decoder_that_decodes_each_row_as_alone_passes(request):
    probe = support.probe(request)
    check_batched_prompts(probe, TokenwiseDecoder(), batched_prompts(TINY), "float32", "1x4")
    records = _records(probe)
    assert len(records) == 3 and all(r["passed"] for r in records)


def test_a_nan_batch_leaves_a_failed_record_per_row(request):
    probe = support.probe(request)
    with pytest.raises(AssertionError, match="kv_cache"):
        check_batched_prompts(probe, TokenwiseDecoder(nan_in_batch=True), batched_prompts(TINY), "float32", "1x4")
    records = _records(probe)
    assert [r["name"] for r in records] == [f"prompt {row} ({n} tokens) from position 0, batched against alone"
                                            for row, n in enumerate((9, 3, 14))]
    assert not any(r["passed"] for r in records)
