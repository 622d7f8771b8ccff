"""Each reference loads a checkpoint directory through its own library, and the suite's config agrees with what
that library read, field by field.

Directories are synthetic (fixtures/checkpoints.py): Meta (params.json + 2 consolidated.NN.pth) and HF
(safetensors + config.json) in both config.json styles, for the tiny preset and for a Llama 3.2-like tiny config
(RoPE factor 32, tied embeddings). HF's reference is `LlamaForCausalLM.from_pretrained` on the directory and
Meta's is llama-models' `ModelArgs` + `maybe_reshard_state_dict` + `load_state_dict`; neither sees the suite's
parser. Their logits must equal those of the references built from the suite's config and weights, and
`reference.config_check` must find no field where the suite and the library read the checkpoint differently;
each cross-check is a parity record of component 'config' (the report's line). Planted parse faults in the
suite's own parser must be named by the cross-check.
"""
from __future__ import annotations

import numpy as np
import pytest

from conformance import support
from fixtures import published
from fixtures.checkpoints import write_hf_checkpoint, write_meta_checkpoint
from llama_spec import config as spec_config
from llama_spec.checkpoint import load_checkpoint, read_config
from llama_spec.config import LLAMA32_ROPE_SCALING
from llama_spec.host import host
from llama_spec.synthetic import make_tokens, make_weights
from parity import assert_parity
from parity.check import assert_config_agrees
from reference.config_check import cross_check
from reference.hf import HFReference
from reference.meta import MetaReference
from reference.oracle import oracle_forward
from tp_llama.convert import meta_to_jax
from tp_llama.model import TPLlama

# Past the original 8192-token context, where factor 8, factor 32 and no scaling all give different phases.
START = 9000
LAYOUTS = ("meta", "hf-hub", "hf-rope_parameters", "hf32-hub", "hf32-rope_parameters")


@pytest.fixture(scope="module")
def llama32_like(tiny_config):
    return tiny_config.replace(rope_scaling=LLAMA32_ROPE_SCALING, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def directories(tmp_path_factory, tiny_config, tiny_weights, llama32_like):
    root = tmp_path_factory.mktemp("crosscheck")
    out = {"meta": write_meta_checkpoint(root / "meta", tiny_config, tiny_weights, dtype="float32", shards=2)}
    for style in ("hub", "rope_parameters"):
        out[f"hf-{style}"] = write_hf_checkpoint(root / f"hf-{style}", tiny_config, tiny_weights, dtype="float32",
                                                 style=style)
        out[f"hf32-{style}"] = write_hf_checkpoint(root / f"hf32-{style}", llama32_like, make_weights(llama32_like),
                                                   dtype="float32", style=style)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_library_reads_what_the_suite_reads(request, directories, layout):
    config, _ = load_checkpoint(directories[layout])
    (check,) = cross_check(config, directories[layout])
    assert check.read.reference == ("meta" if layout == "meta" else "hf")
    assert "rope_scaling" in check.compared and "norm_eps" in check.compared
    assert_config_agrees(request, check)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_references_built_by_their_own_libraries_equal_those_built_from_the_suites_config(directories, layout):
    """Same directory, two roads: the library's own loader, or the suite's parser and weights. Bit-identical
    logits in float32 at positions past 8192 (so RoPE scaling, factor 32 and tied embeddings all count)."""
    config, weights = load_checkpoint(directories[layout])
    weights = {name: np.asarray(weights[name]) for name in weights}
    tokens = make_tokens(config, batch=2, seq_len=12, seed=5)
    if layout == "meta":
        own = MetaReference.from_checkpoint(directories[layout], "float32", max_batch_size=2, max_seq_len=START + 12)
        suite = MetaReference(config, weights, "float32", max_batch_size=2, max_seq_len=START + 12)
        # a fresh cache on both: slots before START hold zeros alike
        own_logits, suite_logits = own.forward(tokens, start_pos=START), suite.forward(tokens, start_pos=START)
    else:
        own_logits = HFReference.from_checkpoint(directories[layout], "float32").forward(tokens, start_pos=START)
        suite_logits = HFReference(config, weights, "float32").forward(tokens, start_pos=START)
    np.testing.assert_array_equal(own_logits, suite_logits, err_msg=f"{layout}: the two roads differ")


def test_the_implementation_computes_llama32_like_checkpoints_as_hf_does(request, directories, mesh, dtype):
    """Factor 32 and tied embeddings through the whole path: the checkpoint loaded by the suite, the model under
    test built from it, against HF's from_pretrained on the same directory. Logits at position 0 (where the tied
    output shows), q/k after RoPE at 9000 (where factor 32 shows; the rope bounds are those of position 9000)."""
    directory = directories["hf32-hub"]
    config, weights = load_checkpoint(directory)
    tokens = make_tokens(config, batch=2, seq_len=12, seed=5)
    model = TPLlama.on_mesh(config, mesh, dtype)
    params = model.place(meta_to_jax(weights))
    reference = HFReference.from_checkpoint(directory, dtype)
    logits = host(model.forward(params, tokens))
    assert_parity(request, component="logits", name="logits.llama32_like", actual=logits,
                  expected=reference.forward(tokens), oracle=oracle_forward(config, weights, tokens), logits=True,
                  reference="hf", dtype=dtype, mesh=mesh)
    _, taps = model.forward(params, tokens, start_pos=START, capture=True)
    _, expected = reference.forward(tokens, start_pos=START, capture=True)
    _, exact = oracle_forward(config, weights, tokens, START, capture=True)
    for name in ("layers.0.q_rope", "layers.0.k_rope"):
        assert_parity(request, component="rope", name=f"{name}@{START}.llama32_like", actual=host(taps[name]),
                      expected=expected[name], oracle=exact[name], reference="hf", dtype=dtype, mesh=mesh)


# ---- planted parse faults: the cross-check must name them --------------------------------------------------


def test_cross_check_names_rope_scaling_dropped_in_the_hub_style(request, directories, monkeypatch):
    """A suite parser that knows only transformers 5's rope_parameters silently drops the hub's rope_scaling."""
    def one_style(hf, source):
        return hf.get("rope_parameters") or {}

    monkeypatch.setattr(spec_config, "_hf_rope", one_style)
    (check,) = cross_check(load_checkpoint(directories["hf-rope_parameters"])[0], directories["hf-rope_parameters"])
    assert check.agrees, check.message()  # the style the faulty parser knows still agrees
    (check,) = cross_check(load_checkpoint(directories["hf-hub"])[0], directories["hf-hub"])
    with pytest.raises(AssertionError) as info:
        assert_config_agrees(support.probe(request), check)
    message = str(info.value)
    print(message)
    assert [d.field for d in check.disagreements] == ["rope_scaling"]
    assert "rope_scaling: the suite read None, transformers 5.24.0 AutoConfig read 'llama3'" in message
    assert "hf-hub/config.json" in message and "\n" not in message


def test_cross_check_names_a_misread_norm_eps(request, tmp_path, tiny_config, tiny_weights, monkeypatch):
    """A suite parser that ignores params.json's norm_eps (keeping its default) on a checkpoint of another eps."""
    config = tiny_config.replace(norm_eps=1e-6)
    directory = write_meta_checkpoint(tmp_path / "eps", config, tiny_weights, dtype="float32")
    parse = spec_config.LlamaConfig.from_params.__func__

    def without_eps(cls, params, source="params.json"):
        return parse(cls, {k: v for k, v in params.items() if k != "norm_eps"}, source)

    monkeypatch.setattr(spec_config.LlamaConfig, "from_params", classmethod(without_eps))
    (check,) = cross_check(load_checkpoint(directory)[0], directory)
    with pytest.raises(AssertionError) as info:
        assert_config_agrees(support.probe(request), check)
    print(info.value)
    assert {d.field: (d.suite, d.library) for d in check.disagreements} == {"norm_eps": (1e-5, 1e-6)}
    assert "norm_eps: the suite read 1e-05, llama-models 0.3.0 ModelArgs read 1e-06" in str(info.value)


def test_cross_check_names_llama_models_factor_8_on_a_llama32_params_json(request, tmp_path):
    """Not a fault of the suite: Meta's library itself computes factor 8 on Llama 3.2 1B's params.json (its
    shape implies 32). The cross-check says so, naming both readers."""
    directory = tmp_path / "llama3_2_1b"
    directory.mkdir()
    (directory / "params.json").write_text(published.path("llama3_2_1b", "params.json").read_text())
    (check,) = cross_check(read_config(directory / "params.json"), directory)
    with pytest.raises(AssertionError, match=r"rope_scaling.factor: the suite read 32.0, llama-models 0.3.0 "
                                             r"ModelArgs read 8.0"):
        assert_config_agrees(support.probe(request), check)
