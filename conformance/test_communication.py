"""The compiled 1x4 forward communicates exactly as Megatron tensor parallelism should.

Expected: one all-reduce for the vocab-parallel embedding, one after each layer's attention output (wo) and
one after each layer's MLP down projection (w2); no all-gather, all-to-all or reduce-scatter anywhere
(weights are never gathered, logits stay sharded on vocab). A design that gathers every layer's output
(the seed's) fails here, and so does one that forgets an all-reduce or adds one.
"""
import re

import jax.numpy as jnp
import pytest

from fixtures.weights import make_tokens

COLLECTIVE = re.compile(r"=\s*\S+\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(.*?op_name=\"([^\"]*)\"")
FORBIDDEN = ("all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def compiled_collectives(model, params, batch=2, seq=8):
    tokens = jnp.asarray(make_tokens(model.config, batch, seq))
    zeros = jnp.zeros((batch, seq), jnp.int32)
    lowered = model._sharded(False, False).lower(params, tokens, zeros, jnp.ones((batch, seq), bool), zeros,
                                                 None, jnp.int32(0))
    return [(op, where.split("/shard_map/", 1)[-1]) for op, where in
            COLLECTIVE.findall(lowered.compile().as_text())]


def expected_all_reduces(n_layers):
    sites = ["Transformer/tok_embeddings"]
    for i in range(n_layers):
        sites += [f"Transformer/layers_{i}/attention", f"Transformer/layers_{i}/feed_forward"]
    return sites


@pytest.mark.parametrize("mesh_text", ["1x4", "2x4"])
def test_one_all_reduce_per_row_parallel_layer_and_no_gathers(tp_model, tiny_config, mesh_text):
    model, params = tp_model(mesh_text, "bfloat16")
    collectives = compiled_collectives(model, params)
    forbidden = [(op, where) for op, where in collectives if op in FORBIDDEN]
    assert not forbidden, f"{mesh_text} forward gathers or reshuffles where Megatron TP must not: {forbidden}"
    sites = sorted(where.rsplit("/", 1)[0] for op, where in collectives if op == "all-reduce")
    assert sites == sorted(expected_all_reduces(tiny_config.n_layers)), (
        f"{mesh_text} all-reduces: expected one for the embedding and one after wo and w2 in each of "
        f"{tiny_config.n_layers} layers, found {sites}")


def test_logits_stay_sharded_on_vocab(tp_model, tiny_config):
    model, params = tp_model("1x4", "float32")
    logits = model.forward(params, make_tokens(tiny_config, 2, 8))
    assert tuple(logits.sharding.spec) == (None, None, "model")
    assert {s.data.shape for s in logits.addressable_shards} == {(2, 8, tiny_config.vocab_size // 4)}
