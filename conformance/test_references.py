"""The three oracles agree with each other, and the comparison against the float64 oracle bites.

Meta's official model (reference/meta.py) and HF transformers (reference/hf.py) are checked against the
independent float64 NumPy oracle (reference/oracle.py) on the tiny preset: logits and every named
intermediate, every component in isolation, Meta's KV-cache decode loop, positions past Llama 3.1's original
8192-token context, and the Meta <-> HF weight conversion. Planted bugs (RoPE without the Llama 3.1 scaling,
HF weights without the q/k row permutation) must be caught.

These tests validate the references themselves, before parity/ exists, so they hold their bounds inline, each with
its measured value beside it (the run they were measured on: docs/results.md#the-references-inline-bounds).
rel = ||a - b|| / ||b|| over the whole array, computed in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_spec.config import LLAMA31_ROPE_SCALING, LLAMA32_ROPE_SCALING, preset
from llama_spec.convert import hf_to_meta, meta_to_hf
from llama_spec.synthetic import make_tokens, make_weights
from reference import hf, meta, oracle
from reference.layers import intermediate_names, layer_weights

IMPLS = {"meta": meta, "hf": hf}
REFERENCE_CLASSES = {"meta": meta.MetaReference, "hf": hf.HFReference}

# float32 vs the float64 oracle at positions < 130: worst measured 8.6e-7 (Meta KV-cache chunk,
# layers.1.attention_out); logits 4.2e-7 (Meta), 4.1e-7 (HF).
F32_REL = 1e-5
# float32 at positions near 9000: RoPE phases are position * freq rounded in float32 (both Meta and HF), an
# absolute phase error ~ 9000 * 2^-24 rad. Measured: q_rope/k_rope 4.8e-5, attention_out 2.7e-5, logits 1.3e-5.
F32_REL_FAR = 2e-4
# bfloat16 vs the float64 oracle: worst measured 1.44e-2 (HF, layers.1.attention_out, a small-norm output
# summing many bf16-rounded terms); components worst 9.9e-3 (HF attention at 9000, second chunk).
BF16_REL = 3e-2
# bfloat16 vs the same reference at float32, logits: measured 8.8e-3 (Meta and HF).
BF16_LOGITS_REL = 2e-2


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def assert_close(actual, expected, bound, what):
    __tracebackhide__ = True
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    assert np.shape(actual) == np.shape(expected), f"{what}: shape {np.shape(actual)} != {np.shape(expected)}"
    rel = rel_l2(actual, expected)
    assert rel < bound, f"{what}: rel L2 {rel:.3g} >= {bound:g} (max abs {max_abs(actual, expected):.3g})"


def assert_all_close(actual: dict, expected: dict, bound, what):
    __tracebackhide__ = True
    assert list(actual) == list(expected), f"{what}: intermediate names differ"
    worst = max(((rel_l2(actual[k], expected[k]), k) for k in expected))
    for name in expected:
        assert_close(actual[name], expected[name], bound, f"{what} {name} (worst: {worst[1]} {worst[0]:.3g})")


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")


@pytest.fixture(scope="module")
def weights(tiny):
    return make_weights(tiny, seed=0)


@pytest.fixture(scope="module")
def tokens(tiny):
    return make_tokens(tiny, batch=2, seq_len=24)


@pytest.fixture(scope="module")
def oracle_run(tiny, weights, tokens):
    """float64 logits and intermediates at start_pos 0, keyed by start_pos."""
    cache = {}

    def run(start_pos=0, config=None):
        config = config or tiny
        key = (start_pos, config)
        if key not in cache:
            cache[key] = oracle.oracle_forward(config, weights, tokens, start_pos=start_pos, capture=True)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def reference_run(tiny, weights, tokens):
    """(logits, intermediates) of a full forward of `tokens`, keyed by (impl, run_dtype, start_pos)."""
    cache = {}

    def run(impl, run_dtype, start_pos=0):
        key = (impl, run_dtype, start_pos)
        if key not in cache:
            cache[key] = REFERENCE_CLASSES[impl](tiny, weights, run_dtype).forward(tokens, start_pos, capture=True)
        return cache[key]

    return run


# ---- set-up and hygiene -----------------------------------------------------------------------------


def test_ensure_model_parallel_is_idempotent():
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    meta.ensure_model_parallel()
    meta.ensure_model_parallel()
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert fs_init.model_parallel_is_initialized() and fs_init.get_model_parallel_world_size() == 1


@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_capture_leaves_no_patch_or_hook(impl, tiny, weights, tokens):
    from llama_models.llama3 import model as meta_model
    from transformers.models.llama import modeling_llama

    originals = (meta_model.apply_rotary_emb, modeling_llama.apply_rotary_pos_emb)
    ref = REFERENCE_CLASSES[impl](tiny, weights, "float32")
    plain = ref.forward(tokens)
    logits, inter = ref.forward(tokens, capture=True)
    assert (meta_model.apply_rotary_emb, modeling_llama.apply_rotary_pos_emb) == originals
    module = ref.model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    assert list(inter) == intermediate_names(tiny.n_layers)
    np.testing.assert_array_equal(logits, plain)
    np.testing.assert_array_equal(inter["logits"], logits)


# ---- full model vs the float64 oracle ---------------------------------------------------------------


@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_float32_matches_oracle(impl, reference_run, oracle_run):
    logits, inter = reference_run(impl, "float32")
    expected_logits, expected = oracle_run()
    assert logits.dtype == np.float32
    assert_close(logits, expected_logits, F32_REL, f"{impl} float32 logits")
    assert_all_close(inter, expected, F32_REL, f"{impl} float32")


def test_hf_at_position_offset_matches_oracle(reference_run, oracle_run):
    """HF at start_pos is a fresh forward at shifted positions (no cache); so is the oracle without a prefix."""
    for start_pos, bound in ((100, F32_REL), (9000, F32_REL_FAR)):
        logits, inter = reference_run("hf", "float32", start_pos)
        expected_logits, expected = oracle_run(start_pos)
        assert_close(logits, expected_logits, bound, f"hf logits at start_pos {start_pos}")
        assert_all_close(inter, expected, bound, f"hf at start_pos {start_pos}")


def test_meta_kv_cache_decode_equals_full_forward(tiny, weights, tokens):
    """forward(prefix, 0) then the next chunks at their start_pos (including single-token steps, which take
    Meta's mask=None path) reproduce one full forward and the oracle run over prefix + chunk."""
    ref = meta.MetaReference(tiny, weights, "float32", max_batch_size=2, max_seq_len=64)
    full_logits, full = ref.forward(tokens, capture=True)
    pieces = []
    for start, stop in ((0, 16), (16, 21), (21, 22), (22, 24)):
        logits, inter = ref.forward(tokens[:, start:stop], start, capture=True)
        pieces.append(logits)
        _, expected = oracle.oracle_forward(tiny, weights, tokens[:, start:stop], start_pos=start,
                                            prefix_tokens=tokens[:, :start], capture=True)
        # measured worst 8.6e-7 (layers.1.attention_out of the last chunk)
        assert_all_close(inter, expected, F32_REL, f"meta chunk [{start}, {stop}) vs oracle with prefix")
        # measured worst 6.4e-7: same math, different matmul shapes
        assert_all_close(inter, {k: v[:, start:stop] for k, v in full.items()}, F32_REL,
                         f"meta chunk [{start}, {stop}) vs full forward")
    # measured rel 1.6e-7, max abs 4.1e-6
    assert_close(np.concatenate(pieces, axis=1), full_logits, 1e-6, "meta KV-cache logits vs full forward")


# ---- components vs the float64 oracle ---------------------------------------------------------------


@pytest.fixture(scope="module")
def component_inputs(tiny):
    rng = np.random.default_rng(7)
    x = lambda s: rng.standard_normal((2, s, tiny.dim)).astype(np.float32)  # noqa: E731
    return {
        "x": x(12), "chunks": [x(12), x(5), x(1)],
        "q": rng.standard_normal((2, 12, tiny.n_heads, tiny.head_dim)).astype(np.float32),
        "k": rng.standard_normal((2, 12, tiny.n_kv_heads, tiny.head_dim)).astype(np.float32),
    }


def _component_bound(run_dtype, start_pos):
    if run_dtype == "bfloat16":
        return BF16_REL
    return F32_REL if start_pos < 1000 else F32_REL_FAR


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_rms_norm_and_feed_forward_match_oracle(impl, run_dtype, tiny, weights, component_inputs):
    mod, lw, x = IMPLS[impl], layer_weights(weights, 1), component_inputs["x"]
    bound = _component_bound(run_dtype, 0)
    # measured float32 6.5e-8, bfloat16 3.3e-3 (Meta and HF alike; input rounding to bf16 dominates)
    assert_close(getattr(mod, f"{impl}_rms_norm")(x, lw["ffn_norm"], tiny.norm_eps, run_dtype),
                 oracle.oracle_rms_norm(x, lw["ffn_norm"], tiny.norm_eps), bound, f"{impl} rms_norm {run_dtype}")
    # measured float32 4.0e-7, bfloat16 5.6e-3
    assert_close(getattr(mod, f"{impl}_feed_forward")(x, lw["w1"], lw["w2"], lw["w3"], run_dtype),
                 oracle.oracle_feed_forward(x, lw["w1"], lw["w2"], lw["w3"]), bound, f"{impl} feed_forward {run_dtype}")


@pytest.mark.parametrize("start_pos", [0, 9000])
@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_rope_attention_block_match_oracle(impl, run_dtype, start_pos, tiny, weights, component_inputs):
    mod, lw, bound = IMPLS[impl], layer_weights(weights, 0), _component_bound(run_dtype, start_pos)
    q, k, x, chunks = (component_inputs[n] for n in ("q", "k", "x", "chunks"))
    what = f"{impl} {run_dtype} start_pos {start_pos}"

    # measured float32 5.0e-8 at 0, 4.7e-5 at 9000; bfloat16 up to 2.5e-3 (Meta) / 3.2e-3 (HF: bf16 cos/sin)
    got_q, got_k = getattr(mod, f"{impl}_rope")(q, k, tiny, run_dtype, start_pos)
    want_q, want_k = oracle.oracle_rope(q, k, tiny, start_pos)
    assert_close(got_q, want_q, bound, f"{what} rope q")
    assert_close(got_k, want_k, bound, f"{what} rope k")

    # one chunk, then three chunks through one KV cache; measured float32 up to 5.3e-7 at 0, 3.0e-5 at 9000;
    # bfloat16 up to 9.2e-3 (Meta) / 9.9e-3 (HF)
    for xs in ([x], chunks):
        got = getattr(mod, f"{impl}_attention")(xs, lw, tiny, run_dtype, start_pos)
        want = oracle.oracle_attention(xs, lw, tiny, start_pos)
        assert len(got) == len(xs)
        for c, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, bound, f"{what} attention chunk {c} of {len(xs)}")

    # measured float32 2.3e-7 at 0, 8.6e-6 at 9000; bfloat16 up to 5.2e-3
    assert_close(getattr(mod, f"{impl}_block")(x, lw, tiny, run_dtype, start_pos),
                 oracle.oracle_block(x, lw, tiny, start_pos), bound, f"{what} block")


def test_meta_attention_single_chunk_equals_chunked(tiny, weights, component_inputs):
    """Meta's cache path (chunks 2+) computes what one chunk over the concatenation computes."""
    chunks, lw = component_inputs["chunks"], layer_weights(weights, 0)
    whole = meta.meta_attention([np.concatenate(chunks, axis=1)], lw, tiny, "float32")[0]
    pieces = np.concatenate(meta.meta_attention(chunks, lw, tiny, "float32"), axis=1)
    assert_close(pieces, whole, 1e-6, "meta chunked attention vs one chunk")  # measured 1.8e-7


# ---- RoPE frequencies and weight layouts --------------------------------------------------------------


def test_hf_llama3_inv_freq_equals_meta_scaled_freqs(tiny):
    from llama_models.llama3 import model as meta_model

    hd = tiny.head_dim
    rotary = hf.modeling_llama.LlamaRotaryEmbedding(hf.hf_config(tiny))
    assert rotary.rope_type == "llama3"
    # Meta's own expression for the base frequencies (precompute_freqs_cis), then Meta's apply_scaling
    meta_freqs = meta_model.apply_scaling(1.0 / (tiny.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)))
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, meta_freqs), (rotary.inv_freq - meta_freqs).abs().max()
    # the float64 oracle's frequencies agree to float32 rounding (measured rel 2.6e-7, in the blended band where
    # float32 rounding compounds through the smoothing expression; 1.2e-7 elsewhere)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), oracle.rope_frequencies(hd, tiny.rope_theta, tiny.rope_scaling),
                               rtol=1e-6)
    # cos/sin tables: HF's cos/sin of position * inv_freq vs Meta's torch.polar; both float32, same angles,
    # may differ by one float32 ulp (measured max abs 6.0e-8 over positions 0..20000)
    positions = torch.arange(20000)
    table = meta_model.precompute_freqs_cis(hd, len(positions), tiny.rope_theta, True)
    cos, sin = rotary(torch.zeros(1), positions[None])
    assert torch.allclose(cos[0, :, : hd // 2], table.real, rtol=0, atol=1.2e-7)
    assert torch.allclose(sin[0, :, : hd // 2], table.imag, rtol=0, atol=1.2e-7)
    # HF lays out cos/sin as two copies (rotate-half)
    assert torch.equal(cos[0, :, : hd // 2], cos[0, :, hd // 2:])


def test_meta_hf_conversion_round_trips_exactly(tiny, weights):
    hf_state = meta_to_hf(weights, tiny)
    back = hf_to_meta(hf_state, tiny)
    assert list(back) == list(weights)
    for name in weights:
        np.testing.assert_array_equal(back[name], weights[name], err_msg=name)
    # the names and shapes are HF's own
    model = hf.HFReference(tiny, weights, "float32").model
    real = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(real) == sorted(hf_state)
    for name, value in real.items():
        np.testing.assert_array_equal(value, hf_state[name], err_msg=name)
    again = meta_to_hf(hf_to_meta(real, tiny), tiny)
    for name, value in real.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    # the q/k permutation is not the identity, v is left alone
    hf_layer = lambda name: hf_state[f"model.layers.0.self_attn.{name}_proj.weight"]  # noqa: E731
    meta_layer = lambda name: weights[f"layers.0.attention.w{name}.weight"]  # noqa: E731
    assert not np.array_equal(hf_layer("q"), meta_layer("q"))
    assert not np.array_equal(hf_layer("k"), meta_layer("k"))
    np.testing.assert_array_equal(hf_layer("v"), meta_layer("v"))


# ---- planted bugs: the oracle comparison must catch them ------------------------------------------------


def test_missing_rope_scaling_is_caught_past_8192(tiny, weights, tokens, component_inputs, reference_run):
    """An oracle without the Llama 3.1 RoPE scaling disagrees with Meta and HF at positions > 8192.

    Attention scores depend only on position differences, so on a short chunk the missing scaling barely moves
    attention outputs or logits (below a bfloat16 bound: docs/results.md#the-references-inline-bounds). It shows
    in the absolute-position intermediates q_rope/k_rope, which is why every comparison includes them.
    """
    unscaled = tiny.replace(rope_scaling=None)
    q, k = component_inputs["q"], component_inputs["k"]
    meta_q, meta_k = meta.meta_rope(q, k, tiny, "float32", 9000)
    bug_q, bug_k = oracle.oracle_rope(q, k, unscaled, 9000)
    # measured rel 4.7e-5 against the right oracle, 0.86 (q) / 0.79 (k) against the planted bug
    assert rel_l2(meta_q, oracle.oracle_rope(q, k, tiny, 9000)[0]) < F32_REL_FAR
    assert rel_l2(meta_q, bug_q) > 0.1 and rel_l2(meta_k, bug_k) > 0.1

    logits, inter = reference_run("hf", "float32", 9000)
    bug_logits, bug = oracle.oracle_forward(unscaled, weights, tokens, 9000, capture=True)
    # measured 0.84 in layers.0.q_rope
    assert rel_l2(inter["layers.0.q_rope"], bug["layers.0.q_rope"]) > 0.1
    with pytest.raises(AssertionError, match="q_rope"):
        assert_all_close(inter, bug, F32_REL_FAR, "hf vs unscaled oracle")
    assert rel_l2(logits, bug_logits) > F32_REL_FAR  # measured 2.1e-3


def test_metas_scaling_patch_is_metas_own_at_llama31():
    """reference.meta's parametrised apply_scaling is bit-identical to llama-models' shipped one at the numbers that
    one hard-codes (8, 1, 4, 8192), for every head_dim and theta the suite uses: the patch changes only them."""
    from llama_models.llama3.model import apply_scaling

    meta.ensure_model_parallel()
    for head_dim in (4, 16, 64, 128):
        for theta in (10000.0, 500000.0):
            freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
            same = torch.equal(meta._apply_scaling(freqs, LLAMA31_ROPE_SCALING), apply_scaling(freqs))
            assert same, (head_dim, theta)


def test_llama32_scaling_agrees_across_references_and_bites(tiny, component_inputs):
    """Factor 32 (Llama 3.2 1B/3B) runs in Meta (patched), HF (rope_parameters) and the oracle alike, and Meta's
    shipped factor 8 would be caught at position 9000."""
    llama32 = tiny.replace(rope_scaling=LLAMA32_ROPE_SCALING)
    q, k = component_inputs["q"], component_inputs["k"]
    exact_q, exact_k = oracle.oracle_rope(q, k, llama32, 9000)
    for impl in ("meta", "hf"):
        got_q, got_k = getattr(IMPLS[impl], f"{impl}_rope")(q, k, llama32, "float32", 9000)
        # measured rel 4.5e-5 (q) / 4.3e-5 (k), Meta and HF alike, as for factor 8
        assert_close(got_q, exact_q, F32_REL_FAR, f"{impl} q_rope factor 32")
        assert_close(got_k, exact_k, F32_REL_FAR, f"{impl} k_rope factor 32")
    hd = tiny.head_dim
    base = 1.0 / (tiny.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    hf_inv_freq = hf.modeling_llama.LlamaRotaryEmbedding(hf.hf_config(llama32)).inv_freq
    assert torch.equal(hf_inv_freq, meta._apply_scaling(base, LLAMA32_ROPE_SCALING))  # bit for bit, as at factor 8
    shipped_q, _ = meta.meta_rope(q, k, tiny, "float32", 9000)  # what llama-models computes unpatched
    assert rel_l2(shipped_q, exact_q) > 0.1  # measured 0.30


def test_missing_qk_permutation_is_caught(tiny, weights, tokens, oracle_run):
    """HF loaded with Meta's wq/wk rows as they are (no interleaved -> halves permutation)."""
    ref = hf.HFReference(tiny, weights, "float32")
    with torch.no_grad():
        for i, layer in enumerate(ref.model.model.layers):
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(weights[f"layers.{i}.attention.wq.weight"]))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(weights[f"layers.{i}.attention.wk.weight"]))
    logits, inter = ref.forward(tokens, capture=True)
    expected_logits, expected = oracle_run()
    assert rel_l2(inter["layers.0.q_rope"], expected["layers.0.q_rope"]) > 0.1  # measured 1.33
    assert rel_l2(logits, expected_logits) > BF16_LOGITS_REL  # measured 0.39


# ---- bfloat16 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_bfloat16_is_finite_and_close_to_float32(impl, reference_run, oracle_run):
    logits16, inter16 = reference_run(impl, "bfloat16")
    logits32, inter32 = reference_run(impl, "float32")
    # bfloat16 values are exact in float32; check the run really happened at bfloat16
    as_bf16 = torch.from_numpy(logits16).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(as_bf16, logits16)
    assert_close(logits16, logits32, BF16_LOGITS_REL, f"{impl} bfloat16 vs float32 logits")  # measured 8.8e-3
    # measured worst 1.42e-2 (Meta) / 1.44e-2 (HF), layers.1.attention_out
    assert_all_close(inter16, inter32, BF16_REL, f"{impl} bfloat16 vs float32")
    assert_all_close(inter16, oracle_run()[1], BF16_REL, f"{impl} bfloat16 vs oracle")
