"""Prefill plus decode steps over the sharded KV cache give the logits of one full forward."""
import numpy as np
import pytest

from parity import assert_parity

from fixtures.weights import make_tokens
from tp_llama.generate import greedy_generate
from tp_llama.model import to_numpy


def _prefill_then_decode(model, params, tokens, prefill_len):
    """Logits for every position of `tokens`, computed by a prefill of prefill_len then one-token steps."""
    batch, total = tokens.shape
    slots = np.arange(total)
    positions = np.broadcast_to(slots, (batch, total))
    cache = model.init_cache(batch, total)
    logits, cache = model.step(params, tokens[:, :prefill_len], positions[:, :prefill_len], cache, 0,
                               np.broadcast_to(slots < prefill_len, (batch, total)))
    out = [to_numpy(logits)]
    for slot in range(prefill_len, total):
        logits, cache = model.step(params, tokens[:, slot:slot + 1], positions[:, slot:slot + 1], cache, slot,
                                   np.broadcast_to(slots <= slot, (batch, total)))
        out.append(to_numpy(logits))
    return np.concatenate(out, axis=1)


def check_kv_cache(request, model, params, dtype, mesh):
    tokens = make_tokens(model.config, 2, 24, seed=3)
    full = to_numpy(model.forward(params, tokens))
    stepped = _prefill_then_decode(model, params, tokens, prefill_len=16)
    assert_parity(request, component="kv_cache", name="logits", actual=stepped, expected=full, reference="self",
                  dtype=dtype, mesh=mesh, logits=True)


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_text", ["1x1", "1x4", "2x4"])
def test_prefill_plus_decode_equals_full_forward(request, tp_model, mesh_text, run_dtype):
    check_kv_cache(request, *tp_model(mesh_text, run_dtype), run_dtype, mesh_text)


def test_batched_prompts_of_different_lengths_match_one_at_a_time(tp_model, tiny_config):
    """Left padding and its mask leave each row's greedy tokens as if it ran alone."""
    model, params = tp_model("1x4", "float32")
    prompts = [make_tokens(tiny_config, 1, n, seed=n)[0].tolist() for n in (9, 3, 14)]
    together = greedy_generate(model, params, prompts, max_new_tokens=6)
    for prompt, tokens, row in zip(prompts, together.tokens, range(3)):
        alone = greedy_generate(model, params, [prompt], max_new_tokens=6)
        assert tokens == alone.tokens[0], f"prompt {row} (length {len(prompt)}) decodes differently in a batch"
        np.testing.assert_allclose(np.stack([s[row] for s in together.step_logits]),
                                   np.stack([s[0] for s in alone.step_logits]), rtol=0, atol=2e-5)
