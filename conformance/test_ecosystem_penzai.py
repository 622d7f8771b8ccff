"""Marker `ecosystem`: penzai 0.2.5's Llama converted from transformers' LlamaForCausalLM (adapters/penzai/, the
environment of requirements-torchax.txt; `pytest -m ecosystem conformance/test_ecosystem_penzai.py`).

- What penzai's documented converter (`llama_from_huggingface_model`) accepts under transformers 5: nothing of
  Llama 3 (its attribute check sees `rope_parameters` and `dtype`), each refusal with penzai's own message.
- The adapter is faithful: penzai's unchecked llama-like converter on a Llama 3 config without RoPE scaling, sharded
  by penzai's named-axis utility, matches HF transformers at float32 within the default bounds (every intermediate
  and the logits), on each --mesh.
- What penzai gets wrong is a finding (docs/findings/penzai-*.md), kept as strict xfails with their records.
"""
from __future__ import annotations

import numpy as np
import pytest

from conformance import support
from fixtures import real_model
from llama_spec.config import preset
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity
from reference.hf import HFReference
from reference.layers import intermediate_names
from reference.oracle import oracle_forward

pytestmark = pytest.mark.ecosystem

CASES = {"batch": (2, 48), "long": (1, 512)}
TAPS = tuple(n for n in intermediate_names(2) if n != "logits")  # the tiny config's: penzai exposes them all
_BUILT: dict = {}
REFUSAL_FINDING = ("penzai 0.2.5 llama_from_huggingface_model refuses every Llama 3 model under transformers 5: its "
                   "attribute check (variants/llama.py:65-98) sees rope_parameters and dtype "
                   "(docs/findings/penzai-transformers-5-config.md)")
ROPE_FINDING = ("penzai 0.2.5's Llama has no llama3 RoPE scaling (ApplyRoPE, nn/embeddings.py:234-250, one "
                "max_wavelength): Llama 3.1 runs unscaled (docs/findings/penzai-llama3-rope-scaling.md)")


@pytest.fixture(scope="module")
def pz():
    """adapters.penzai, or skip: penzai lives in the environment of requirements-torchax.txt."""
    import importlib.util

    if importlib.util.find_spec("penzai") is None:
        pytest.skip("penzai is not installed: pip install -r requirements.txt -r requirements-torchax.txt")
    import adapters.penzai as pz

    pz.PenzaiLlama  # imports penzai, transformers and torch
    return pz


def _mesh(text):
    return make_mesh(text)


def _hf_model_on_meta_device(config):
    """An HF LlamaForCausalLM with no storage (torch's meta device): enough for penzai's config check, at any size."""
    import torch
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config.to_hf()),
                                                             dtype=torch.float32)


UNSCALED_8B = preset("8b").replace(rope_scaling=None)


@pytest.mark.xfail(strict=True, raises=ValueError, reason=REFUSAL_FINDING)
@pytest.mark.parametrize("name", ["tiny-llama31", "tiny-unscaled", "8b-unscaled", "smollm2"])
def test_documented_converter_accepts_llama3(pz, tiny_config, name):
    """llama_from_huggingface_model on Llama 3.1's config (tiny), the same without RoPE scaling, a Llama 3 8B shaped
    one without scaling, and the real model's (SmolLM2, tied embeddings, fixtures/real_model.py's config)."""
    from adapters.penzai.adapter import checked_conversion

    configs = {"tiny-llama31": lambda: tiny_config, "tiny-unscaled": lambda: tiny_config.replace(rope_scaling=None),
               "8b-unscaled": lambda: UNSCALED_8B, "smollm2": _real_config}
    checked_conversion(_hf_model_on_meta_device(configs[name]()))


def _real_config():
    try:
        return real_model.checkpoint().config
    except real_model.RealModelError as err:
        pytest.skip(f"the real model is not available: {err}")


def test_the_refusal_names_what_transformers_5_changed(pz, tiny_config):
    """The library's own message, as the PenzaiLlama rows show it: rope_parameters (the scaling with it) and dtype."""
    from adapters.penzai.adapter import checked_conversion

    with pytest.raises(ValueError, match="does not support these configuration attributes") as info:
        checked_conversion(_hf_model_on_meta_device(tiny_config.replace(rope_scaling=None)))
    assert "'rope_parameters'" in str(info.value) and "'dtype'" in str(info.value), str(info.value)


# ---- the adapter is faithful where penzai is right ---------------------------------------------------------

def _check_forward(request, adapter, config, weights, mesh: str, case: str, diagnosed: bool = False) -> None:
    """Every intermediate and the logits against HF at float32, default bounds, one record each; with
    `diagnosed`, each failure ranked against the catalogued deviations (on the suite's tiny config only)."""
    batch, seq = CASES[case]
    tokens = support.tokens(batch, seq, seed=16)
    logits, taps = adapter.forward(tokens, capture=True)
    ref_logits, ref_taps = HFReference(config, weights, "float32").forward(tokens, capture=True)
    exact_logits, exact_taps = oracle_forward(config, weights, tokens, 0, capture=True)
    assert sorted(taps) == sorted(TAPS), f"captured {sorted(taps)}"
    scope = dict(reference="hf", dtype="float32", mesh=mesh)

    def diagnose(name):
        def output(config, variant):
            logits, taps = support.oracle_forward(config, variant, "float32", batch, seq)
            return logits if name is None else taps[name]

        return support.diagnosis("float32", "1x1", output) if diagnosed else None

    failures = []
    for name in TAPS:
        try:
            assert_parity(request, component="intermediate", name=name, actual=host(taps[name]),
                          expected=ref_taps[name], oracle=exact_taps[name], diagnose=diagnose(name), **scope)
        except AssertionError as err:
            failures.append(str(err))
    try:
        assert_parity(request, component="logits", name=f"logits.{case}", actual=host(logits), expected=ref_logits,
                      oracle=exact_logits, logits=True, diagnose=diagnose(None), **scope)
    except AssertionError as err:
        failures.append(str(err))
    assert not failures, f"{len(failures)} tensors fail; first:\n" + failures[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_unchecked_converter_matches_hf_without_rope_scaling(request, pz, tiny_config, tiny_weights, mesh, case):
    config = tiny_config.replace(rope_scaling=None)
    support.data_split(mesh, CASES[case][0])
    key = ("unscaled", mesh)
    if key not in _BUILT:
        _BUILT[key] = pz.PenzaiLlamaUnchecked.build(config, tiny_weights, _mesh(mesh), "float32")
    _check_forward(request, _BUILT[key], config, tiny_weights, mesh, case)


def test_parameters_carry_penzais_named_axis_layout(pz, tiny_config, tiny_weights):
    """vocabulary, neurons and query_heads on 'model' (2 kv head groups do not split 4 ways), the rest replicated."""
    adapter = pz.PenzaiLlamaUnchecked.build(tiny_config.replace(rope_scaling=None), tiny_weights, _mesh("1x4"),
                                            "float32")
    assert adapter.axis_map == {"vocabulary": "model", "neurons": "model", "query_heads": "model"}
    specs = {name: tuple(a.sharding.spec) for name, a in adapter.parameters().items()}
    assert specs["transformer/embedder.embeddings"][:1] == ("model",)
    assert "model" in specs["transformer/block_0/attention/query.weights"]
    assert "model" not in specs["transformer/block_0/attention/key.weights"]
    assert "model" in specs["transformer/block_0/mlp/out_linear.weights"]
    assert "num_partitions=4" in adapter.compiled_forward(2, 8).as_text()


# ---- findings ------------------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=ROPE_FINDING)
def test_unchecked_converter_applies_llama31_rope_scaling(request, pz, tiny_config, tiny_weights):
    """Llama 3.1's config through the unchecked converter against HF at float32, 512 tokens, diagnosed."""
    adapter = pz.PenzaiLlamaUnchecked.build(tiny_config, tiny_weights, _mesh("1x1"), "float32")
    _check_forward(request, adapter, tiny_config, tiny_weights, "1x1", "long", diagnosed=True)


def test_unchecked_converter_on_the_real_model(request, pz):
    """SmolLM2-135M (tied embeddings, rope_theta 100000, no scaling) loaded by from_pretrained, through penzai's
    unchecked converter, against transformers on the same directory: logits at float32, default bounds."""
    import torch
    import transformers


    try:
        real = real_model.checkpoint()
    except real_model.RealModelError as err:
        pytest.skip(f"the real model is not available: {err}")
    adapter = pz.PenzaiLlamaUnchecked.build_from_checkpoint(real.hf_dir, _mesh("1x1"), "float32", "hf")
    tokens = np.random.default_rng(16).integers(0, real.config.vocab_size, (1, 64), dtype=np.int32)
    model = transformers.LlamaForCausalLM.from_pretrained(real.hf_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    exact = oracle_forward(real.config, real_model.weights(), tokens, 0)
    assert_parity(request, component="logits", name="logits.real", actual=host(adapter.forward(tokens)),
                  expected=expected, oracle=exact, logits=True, reference="hf", dtype="float32", mesh="1x1")


# ---- decode through penzai's KVCachingTransformerLM ---------------------------------------------------------

def test_decode_matches_hf_without_rope_scaling(request, pz, tiny_config, tiny_weights):
    """Prefill 8 tokens then 4 single-token steps, and the same batch with row 1 left-padded by 3 slots (penzai's
    pad tokens), against HF's uncached forward, float32, default bounds, on 1x4."""
    config = tiny_config.replace(rope_scaling=None)
    adapter = pz.PenzaiLlamaUnchecked.build(config, tiny_weights, _mesh("1x4"), "float32")
    reference = HFReference(config, tiny_weights, "float32")
    tokens = support.tokens(2, 12, seed=16)

    def decode(**kwargs):
        cache = adapter.init_cache(2, 16)
        logits, cache = adapter.step(tokens[:, :8], 0, cache, **kwargs)
        out = [np.asarray(logits)]
        for t in range(8, 12):
            logits, cache = adapter.step(tokens[:, t:t + 1], t, cache, **kwargs)
            out.append(np.asarray(logits))
        return np.concatenate(out, axis=1)

    scope = dict(reference="hf", dtype="float32", mesh="1x4", logits=True)
    assert_parity(request, component="kv_cache", name="decode.steps", actual=decode(),
                  expected=reference.forward(tokens), **scope)
    assert_parity(request, component="kv_cache", name="decode.pad", actual=decode(pad=np.array([0, 3]))[1:, 3:],
                  expected=reference.forward(tokens[1:, 3:]), **scope)
