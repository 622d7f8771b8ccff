"""The implementation's KV cache (its Decode capability, adapters/protocol.py) against its own cache-free path.

- A prefill plus one-token decode steps give the logits of one full forward of the same tokens, from position 0
  and from a position whose decode steps cross 8192 (`step(..., offset=)` against `forward(start_pos=)`).
- Prompts of different lengths left-padded into one batch (`step(..., pad=)`) decode, through the suite's
  decoding loop (adapters/decoding.py), as each does alone: same tokens, same logits.

A step that takes no `offset` or `pad` is not checked on the cases that need it, with the reason.
"""
import pytest

from adapters import decoding
from conformance import support
from conformance.decode import PAST_8192, TOKENS, batched_prompts, check_batched_prompts, check_kv_cache
from parity.check import record_not_checked


def _not_checked(request, reason, name, dtype, mesh):
    record_not_checked(request, component="kv_cache", names=[name], reason=reason, reference="self", dtype=dtype,
                       mesh=mesh)
    pytest.skip(reason)


@pytest.mark.parametrize("start_pos", [0, PAST_8192], ids=["from_0", "past_8192"])
@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_text", ["1x1", *support.meshes_of_model(("1x4", "2x4"))])
def test_prefill_plus_decode_equals_full_forward(request, impl, mesh_text, run_dtype, start_pos):
    adapter = impl(mesh_text, run_dtype)
    reason = decoding.unsupported(adapter, TOKENS.tolist(), start_pos)
    if reason:
        _not_checked(request, reason, f"logits from position {start_pos}", run_dtype, mesh_text)
    check_kv_cache(request, adapter, run_dtype, mesh_text, start_pos)


@pytest.mark.parametrize("start_pos", [0, PAST_8192], ids=["from_0", "past_8192"])
def test_batched_prompts_of_different_lengths_match_one_at_a_time(request, impl, tiny_config, start_pos):
    """Left padding and its mask leave each row's greedy tokens and logits as if it ran alone."""
    mesh, dtype = "1x4", "float32"
    adapter = impl(mesh, dtype)
    prompts = batched_prompts(tiny_config)
    reason = decoding.unsupported(adapter, prompts, start_pos)
    if reason:
        _not_checked(request, reason, f"batched prompts from position {start_pos}", dtype, mesh)
    check_batched_prompts(request, adapter, prompts, dtype, mesh, start_pos)
