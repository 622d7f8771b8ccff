"""The capture helpers of adapters/capture.py: a model's own paths to the suite's intermediate names, q/k moved from
HF's rotate-half layout when asked, and the three ways of recording (Flax NNX sow, Flax linen intermediates, a dict).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from adapters.capture import Recorder, Taps, flatten, linen_intermediates, nnx_intermediates
from llama_spec.convert import interleaved_to_halves_last_axis

TABLE = {"emb": "embedding", "blocks.{i}.attn.q": "layers.{i}.q_rope", "blocks.{i}.attn.k": "layers.{i}.k_rope",
         "blocks.{i}.out": "layers.{i}.block_out"}


def test_paths_are_renamed_layer_by_layer_and_unlisted_ones_left_out():
    x = np.zeros((1, 2, 3))
    named = Taps(TABLE).rename({"emb": x, "blocks.0.out": x, "blocks.11.out": x, "blocks.0.scratch": x})
    assert sorted(named) == ["embedding", "layers.0.block_out", "layers.11.block_out"]


def test_a_name_the_suite_does_not_know_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"\['layers.\{i\}.q'\] are not the suite's .*layers.\{i\}.q_rope"):
        Taps({"blocks.{i}.q": "layers.{i}.q"})


def test_two_paths_for_one_name_are_refused():
    with pytest.raises(ValueError, match="two paths of the model map to 'embedding'"):
        Taps({"emb": "embedding", "embed": "embedding"}).rename({"emb": 0, "embed": 1})


@pytest.mark.parametrize("halves_qk", [True, False])
def test_q_and_k_leave_the_half_layout_only_when_asked(halves_qk):
    """The planted bug is forgetting halves_qk for a model that rotates halves: its q/k are then not Meta's."""
    meta = np.random.default_rng(0).standard_normal((1, 2, 4, 8))
    halves = interleaved_to_halves_last_axis(meta)
    named = Taps(TABLE, halves_qk=halves_qk).rename({"blocks.0.attn.q": halves, "blocks.0.attn.k": halves,
                                                     "blocks.0.out": halves})
    assert np.array_equal(named["layers.0.q_rope"], meta) is halves_qk
    assert np.array_equal(named["layers.0.k_rope"], meta) is halves_qk
    assert np.array_equal(named["layers.0.block_out"], halves)  # not a RoPE layout: never converted


def test_flatten_keeps_a_sown_tuples_last_call():
    assert flatten({"a": {0: {"q": (1, 2)}}, "b": 3}) == {"a.0.q": 2, "b": 3}


class _NNXBlock(nnx.Module):
    def __call__(self, x):
        self.sow(nnx.Intermediate, "out", x + 1)
        return x + 1


class _NNXModel(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([_NNXBlock(), _NNXBlock()])

    def __call__(self, x):
        self.sow(nnx.Intermediate, "emb", x)
        for block in self.blocks:
            x = block(x)
        return x


def test_nnx_sown_values_come_back_under_the_suites_names():
    out, named = nnx_intermediates(_NNXModel(), jnp.zeros(2), taps=Taps(TABLE))
    assert sorted(named) == ["embedding", "layers.0.block_out", "layers.1.block_out"]
    assert float(named["layers.1.block_out"][0]) == 2.0 and float(out[0]) == 2.0


class _LinenBlock(linen.Module):
    @linen.compact
    def __call__(self, x):
        self.sow("intermediates", "out", x + 1)
        return x + 1


class _LinenModel(linen.Module):
    @linen.compact
    def __call__(self, x):
        for _ in range(2):
            x = _LinenBlock()(x)
        return x


def test_linen_sown_values_and_method_outputs_come_back_under_the_suites_names():
    taps = Taps({"_LinenBlock_{i}.out": "layers.{i}.block_out", "_LinenBlock_{i}.__call__": "layers.{i}.mlp_out"})
    out, named = linen_intermediates(_LinenModel(), {}, jnp.zeros(2), taps=taps)
    assert sorted(named) == ["layers.0.block_out", "layers.0.mlp_out", "layers.1.block_out", "layers.1.mlp_out"]
    assert float(named["layers.1.block_out"][0]) == 2.0 and float(out[0]) == 2.0


def test_a_recorder_keeps_what_a_jnp_model_records():
    recorder = Recorder()
    y = recorder.record("emb", jnp.ones(2))
    assert Taps(TABLE).rename(recorder.taps)["embedding"] is y
