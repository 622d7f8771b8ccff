"""Tensor-parallel invariance: the same weights give the same logits and intermediates on every mesh.

The 1x1 mesh is the single-chip model; every other mesh must agree with it within the `tp_invariance`
bounds of the tolerance table (float32: relative L2 1e-5). A wrong shard order, a missing or doubled
all-reduce or a misgrouped kv head breaks this long before any reference is consulted.
"""
import pytest

from fixtures.weights import make_tokens
from tp_llama.model import to_numpy

MESHES = ("1x2", "1x4", "1x8", "2x4")


@pytest.fixture(scope="module")
def single_chip(tp_model, tiny_config):
    def run(dtype):
        model, params = tp_model("1x1", dtype)
        logits, taps = model.forward(params, make_tokens(tiny_config, 2, 32, seed=5), start_pos=0, capture=True)
        return to_numpy(logits), {k: to_numpy(v) for k, v in taps.items()}
    return {dtype: run(dtype) for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_text", MESHES)
def test_meshes_agree_with_single_chip(request, tp_model, tiny_config, single_chip, mesh_text, run_dtype):
    from parity import assert_parity, assert_parity_many

    model, params = tp_model(mesh_text, run_dtype)
    logits, taps = model.forward(params, make_tokens(tiny_config, 2, 32, seed=5), start_pos=0, capture=True)
    base_logits, base_taps = single_chip[run_dtype]
    assert_parity_many(request, component="tp_invariance", actual={k: to_numpy(v) for k, v in taps.items()},
                       expected=base_taps, reference="1x1", dtype=run_dtype, mesh=mesh_text)
    assert_parity(request, component="tp_invariance", name="logits", actual=to_numpy(logits),
                  expected=base_logits, reference="1x1", dtype=run_dtype, mesh=mesh_text, logits=True)
