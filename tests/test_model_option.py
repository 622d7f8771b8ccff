"""`--model {tiny,smollm2-135m}` (conformance/plugin.py, conformance/model_scope.py): the meshes it refuses before
collection, what it leaves out as not checked and why, and that a check chosen under it runs on the real model's
config and weights, not the tiny preset's.

(No argument here may be named `mesh`, `dtype` or `reference`: the suite's plugin parametrizes those.)
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from adapters import protocol
from conformance import components, model_scope, plugin, support
from fixtures import real_model
from llama_spec.layout import make_mesh

REPO = Path(__file__).resolve().parents[1]
REAL = real_model.NAME


@pytest.fixture(scope="module")
def real_config():
    try:
        return real_model.checkpoint().config
    except real_model.RealModelError as err:
        pytest.skip(f"not checked: {err}")


@pytest.fixture
def on_real_model(real_config):
    """The battery's model is the real one for this test, then tiny again."""
    model_scope.use(REAL)
    yield real_config
    model_scope.use("tiny")


def test_the_real_models_default_meshes_split_it(real_config):
    assert plugin.MODEL_MESHES[REAL] == ("1x1", "1x3")
    plugin._check_meshes(["1x1", "1x3", "2x3"], 8, {f"--model {REAL}": real_config})


@pytest.mark.parametrize("meshes, complaint", [
    (["1x4"], f"--mesh 1x4: --model {REAL}: cannot shard over a model axis of 4: n_heads=9 is not divisible"),
    (["1x2"], "n_kv_heads=3 and the model axis 2 divide neither way"),
    (["1x9"], "vocab_size=49152 is not divisible by the model axis 9"),
])
def test_a_mesh_that_cannot_split_the_real_model_is_a_usage_error(real_config, meshes, complaint):
    with pytest.raises(pytest.UsageError, match=complaint):
        plugin._check_meshes(meshes, 16, {f"--model {REAL}": real_config})


def _item(module: str, name: str, **params):
    return types.SimpleNamespace(module=types.SimpleNamespace(__name__=f"conformance.{module}"), name=name,
                                 originalname=name, callspec=types.SimpleNamespace(params=params))


def test_under_tiny_nothing_is_left_out():
    assert support.MODEL == "tiny"
    assert model_scope.not_checked_reason(_item("test_tokenizer", "test_x")) is None
    assert model_scope.not_checked_reason(_item("test_kv_cache", "test_x", mesh_text="1x4")) is None


def test_under_the_real_model_what_cannot_run_says_why(on_real_model):
    reason = model_scope.not_checked_reason
    assert reason(_item("test_tokenizer", "test_x")).startswith(f"not checked on {REAL}: checks Llama 3's tokenizer")
    assert "n_heads=9 is not divisible by the model axis 4" in reason(_item("test_kv_cache", "test_x",
                                                                              mesh_text="1x4"))
    assert "tied output" in reason(_item("test_logits", "test_logits", case="small_rows"))
    planted = _item("test_sharding", "test_an_adapter_that_ignores_the_mesh_fails")
    assert "planted tiny-model adapters" in reason(planted)
    assert reason(_item("test_kv_cache", "test_x", mesh_text="1x3")) is None
    assert reason(_item("test_rmsnorm", "test_rmsnorm", mesh="1x1")) is None


def test_a_component_check_runs_on_the_real_config_and_weights(request, on_real_model):
    """RMSNorm's inputs are activations of the real width with the real layer's weight, and the built-in model on
    1x3 passes the check on them (a record with the real model's shapes)."""
    x, weight = components.inputs(components.RMSNORM, "float32", layer_index=0, which="attention_norm")
    assert x.shape[-1] == on_real_model.dim == 576
    np.testing.assert_array_equal(weight, real_model.weights()["layers.0.attention_norm.weight"])
    adapter = protocol.build(protocol.load(protocol.BUILTIN), support.CONFIG, support.canonical(), make_mesh("1x3"),
                             "float32")
    probe = support.probe(request)
    components.check(probe, components.RMSNORM, adapter, "hf", "float32", "1x3", layer_index=0, which="attention_norm")
    assert probe.node.user_properties, "the check left no record"


@pytest.mark.e2e
@pytest.mark.parametrize("args, line", [
    (["--model", REAL, "--mesh", "1x4"], f"ERROR: --mesh 1x4: --model {REAL}: cannot shard over a model axis of 4"),
    (["--model", "llama-8b"], "--model: invalid choice: 'llama-8b'"),
])
def test_a_wrong_model_or_mesh_stops_pytest_before_collection(args, line):
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q", *args,
                          "conformance/test_rmsnorm.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert line in run.stderr, run.stderr
    assert "collected" not in run.stdout
