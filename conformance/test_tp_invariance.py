"""Tensor-parallel invariance of the implementation under test: the same weights give the same logits and
intermediates on every mesh.

The implementation built on the 1x1 mesh is the single-chip model; built on every other mesh it must agree
with it within the `tp_invariance` bounds of the tolerance table (float32: relative L2 1e-5). A wrong shard
order, a missing or doubled all-reduce or a misgrouped kv head breaks this long before any reference is
consulted.
"""
import functools

import pytest

from adapters import protocol
from conformance import support
from llama_spec.host import host
from llama_spec.synthetic import make_tokens
from parity import assert_parity, assert_parity_many

MESHES = support.meshes_of_model(("1x2", "1x4", "1x8", "2x4"))


def _tokens(config):
    return make_tokens(config, 2, 32, seed=5)


def run(adapter, config):
    logits, taps = protocol.forward(adapter, _tokens(config))
    return host(logits), {k: host(v) for k, v in taps.items()}


@pytest.fixture(scope="module")
def single_chip(impl, tiny_config):
    """The 1x1 run per dtype, computed on first use."""
    return functools.lru_cache(maxsize=None)(lambda dtype: run(impl("1x1", dtype), tiny_config))


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_text", MESHES)
def test_meshes_agree_with_single_chip(request, impl, tiny_config, single_chip, mesh_text, run_dtype):
    scope = dict(component="tp_invariance", reference="1x1", dtype=run_dtype, mesh=mesh_text)
    base_logits, base_taps = support.run(request, single_chip, run_dtype, **scope, what="the 1x1 build's forward")
    adapter = support.subject(request, impl, mesh_text, run_dtype, component="tp_invariance", reference="1x1")
    logits, taps = support.run(request, run, adapter, tiny_config, **scope,
                               what=f"{type(adapter).__name__}.forward on {mesh_text}")
    if base_taps or taps:
        assert_parity_many(request, actual=taps, expected=base_taps, **scope)
    assert_parity(request, name="logits", actual=logits, expected=base_logits, logits=True, **scope)
