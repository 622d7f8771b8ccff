"""Every loader in the suite against the published config files of Llama 3 8B, 3.1 8B/70B/405B and 3.2 1B/3B.

Loaders: the suite's own (`llama_spec.checkpoint.read_config`: params.json, and config.json in both styles), and
each reference's library (transformers' AutoConfig on each config.json, llama-models' ModelArgs on each
params.json). The files and the values they must parse to are fixtures/published.py's; a loader that drops
`rope_scaling` in one style, defaults a field the file states, or ignores tied embeddings fails here naming the
model, the file and the field.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fixtures import published
from llama_spec.checkpoint import read_config
from llama_spec.config import LlamaConfig
from reference import config_check, oracle

CONFIG_STYLES = ("config.hub.json", "config.rope_parameters.json")


def expected_fields(model: str, *, params: bool) -> dict:
    """EXPECTED in config_check's field names; params.json states no context length, config.json no SwiGLU rule."""
    expected = dict(published.EXPECTED[model])
    scaling = expected.pop("rope_scaling")
    expected.update(config_check._scaling_fields(scaling))
    for name in ("max_seq_len",) if params else ("multiple_of", "ffn_dim_multiplier"):
        del expected[name]
    return expected


def parsed_fields(config: LlamaConfig, *, params: bool) -> dict:
    fields = config_check.suite_fields(config)
    if params:
        del fields["max_seq_len"]
        fields.update(multiple_of=config.multiple_of, ffn_dim_multiplier=config.ffn_dim_multiplier)
    return fields


def assert_fields(actual: dict, expected: dict, who: str):
    __tracebackhide__ = True
    wrong = {name: (actual.get(name, "<not read>"), value) for name, value in expected.items()
             if actual.get(name, "<not read>") != value}
    assert not wrong, f"{who}: " + "; ".join(f"{n}: read {a!r}, published {e!r}" for n, (a, e) in wrong.items())


def as_checkpoint_dir(tmp_path, model: str, file: str):
    """A directory holding the published file under the name its loader looks for."""
    name = "params.json" if file == "params.json" else "config.json"
    shutil.copy(published.path(model, file), tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("model", published.MODELS)
def test_params_json_is_llama_models_own_record(model):
    """The stored params.json equals the arch_args llama-models ships for that model (use_scaled_rope absent
    reads as its default, false): the facts are not only transcribed, Meta's package states them too."""
    from llama_models.sku_list import resolve_model

    sku = resolve_model(published.SKU[model])
    stored = json.loads(published.path(model, "params.json").read_text())
    assert {"use_scaled_rope": False, **stored} == sku.arch_args


@pytest.mark.parametrize("file", published.FILES)
@pytest.mark.parametrize("model", published.MODELS)
def test_the_suites_loader_reads_every_published_file(model, file):
    params = file == "params.json"
    config = read_config(published.path(model, file))  # by name: params.json is Meta's, any other HF's
    assert_fields(parsed_fields(config, params=params), expected_fields(model, params=params),
                  f"llama_spec read {model}/{file}")


@pytest.mark.parametrize("file", CONFIG_STYLES)
@pytest.mark.parametrize("model", published.MODELS)
def test_transformers_reads_every_published_config_json(tmp_path, model, file):
    """AutoConfig.from_pretrained reads the published values in both styles, and LlamaRotaryEmbedding builds the
    frequencies of that scaling (factor 32 for Llama 3.2, none for Llama 3)."""
    import transformers
    from transformers.models.llama import modeling_llama

    directory = as_checkpoint_dir(tmp_path, model, file)
    read = config_check.read_with_transformers(directory)
    assert_fields(read.fields, expected_fields(model, params=False), f"transformers read {model}/{file}")
    rotary = modeling_llama.LlamaRotaryEmbedding(transformers.AutoConfig.from_pretrained(directory))
    expected = published.EXPECTED[model]
    exact = oracle.rope_frequencies(expected["head_dim"], expected["rope_theta"], expected["rope_scaling"])
    np.testing.assert_allclose(rotary.inv_freq.numpy(), exact, rtol=1e-6, err_msg=f"{model}/{file} inv_freq")


@pytest.mark.parametrize("model", published.MODELS)
def test_llama_models_reads_every_published_params_json(tmp_path, model):
    """ModelArgs reads the published values, except what llama-models 0.3.0 itself gets wrong (factor 8 for Llama
    3.2, published.LLAMA_MODELS_APPLIES); tied embeddings are not a ModelArgs field (Meta's checkpoint keeps a
    copy of the embedding as output.weight)."""
    read = config_check.read_with_llama_models(as_checkpoint_dir(tmp_path, model, "params.json"))
    expected = expected_fields(model, params=True)
    expected.update(published.LLAMA_MODELS_APPLIES.get(model, {}))
    for name in ("multiple_of", "ffn_dim_multiplier", "tie_word_embeddings"):
        expected.pop(name)
    assert_fields(read.fields, expected, f"llama-models read {model}/params.json")


@pytest.mark.parametrize("file", published.FILES)
@pytest.mark.parametrize("model", published.MODELS)
def test_cross_check_on_published_files(tmp_path, model, file):
    """The suite's reading agrees with the reference library's on every published file, but for llama-models'
    known factor 8 on Llama 3.2, which the cross-check names."""
    directory = as_checkpoint_dir(tmp_path, model, file)
    (check,) = config_check.cross_check(read_config(published.path(model, file)), directory)
    known = published.LLAMA_MODELS_APPLIES.get(model, {}) if file == "params.json" else {}
    assert {d.field: d.library for d in check.disagreements} == known, check.message()


@pytest.mark.parametrize("model", published.MODELS)
def test_rope_parameters_file_is_what_transformers_writes(tmp_path, model):
    """config.rope_parameters.json is transformers' own rewrite of the hub file, not a hand-made guess."""
    import transformers

    transformers.AutoConfig.from_pretrained(as_checkpoint_dir(tmp_path, model, "config.hub.json")).save_pretrained(
        tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    stored = json.loads(published.path(model, "config.rope_parameters.json").read_text())
    written.pop("transformers_version"), stored.pop("transformers_version")
    assert written == stored


@pytest.mark.parametrize("model", published.MODELS)
def test_the_suites_writers_give_the_published_form(model):
    """to_params and to_hf of the parsed config reproduce every field the published files state."""
    meta = read_config(published.path(model, "params.json"))
    stored = json.loads(published.path(model, "params.json").read_text())
    written = meta.to_params()
    assert {k: written[k] for k in stored} == stored
    hf = read_config(published.path(model, "config.hub.json"))
    for style, file in zip(("hub", "rope_parameters"), CONFIG_STYLES):
        stored = json.loads(published.path(model, file).read_text())
        written = hf.to_hf(style)
        common = set(written) & set(stored)
        assert {k: written[k] for k in common} == {k: stored[k] for k in common}, (model, style)
