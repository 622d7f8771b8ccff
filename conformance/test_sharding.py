"""The sharding contract of DESIGN.md section 3, checked on placed arrays and on the 8B layout table."""
import numpy as np
import pytest

from reference.convert import meta_to_jax
from tp_llama import shardings
from llama_spec.config import preset
from tp_llama.shardings import MODEL

# Which axis of each Meta weight (out, in) the model axis splits, or None when replicated.
META_SPLIT_AXIS = {
    "tok_embeddings.weight": 0, "output.weight": 0,
    "wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "w1.weight": 0, "w3.weight": 0,
    "wo.weight": 1, "w2.weight": 1,
    "norm.weight": None,
}


def _split_axis(meta_name: str):
    for suffix, axis in META_SPLIT_AXIS.items():
        if meta_name.endswith(suffix):
            return axis
    raise KeyError(meta_name)


def test_every_parameter_has_a_rule(tiny_config):
    for path in shardings.param_shapes(tiny_config):
        shardings.param_axes(path)


@pytest.mark.parametrize("mesh_text", ["1x4", "2x4", "1x2"])
def test_each_device_holds_its_slice_of_the_meta_weights(tp_model, tiny_config, tiny_weights, mesh_text):
    """Per-device shards hold exactly the Meta rows/columns the contract assigns (kv heads replicated)."""
    model, params = tp_model(mesh_text, "float32")
    m = model.model_parallel
    copies = shardings.kv_replication(tiny_config, m)
    placed = dict(shardings.tree_items(params))
    for name, meta_value in tiny_weights.items():
        path = next(iter(shardings.tree_items(meta_to_jax({name: meta_value}))))[0]
        array = placed[path]
        axis = _split_axis(name)
        for shard in array.addressable_shards:
            rank = model.mesh.devices.flatten().tolist().index(shard.device) % m
            local = np.asarray(shard.data)
            if axis is None:
                expected = meta_value
            elif name.endswith(("wk.weight", "wv.weight")) and copies > 1:
                hd = tiny_config.head_dim
                kv_head = rank // copies
                expected = meta_value[kv_head * hd:(kv_head + 1) * hd]
            else:
                size = meta_value.shape[axis] // m
                expected = np.take(meta_value, np.arange(rank * size, (rank + 1) * size), axis=axis)
            if name != "tok_embeddings.weight" and meta_value.ndim == 2:
                expected = expected.T  # JAX kernels are (in, out)
            assert local.shape == expected.shape, f"{name} on model rank {rank} of {mesh_text}: shape {local.shape}"
            np.testing.assert_array_equal(local, expected, err_msg=f"{name} on model rank {rank} of {mesh_text}")


def test_8b_layout_quarters_every_sharded_weight():
    """On 1x4 each sharded 8B weight holds exactly a quarter per device; norms are whole; nothing allocated."""
    config = preset("8b")
    rows = list(shardings.layout_rows(config, "1x4", dtype_bytes=2))
    assert len(rows) == 9 * config.n_layers + 3
    for name, global_shape, spec, local_shape, nbytes in rows:
        if MODEL in tuple(spec):
            assert np.prod(local_shape) * 4 == np.prod(global_shape), name
        else:
            assert local_shape == global_shape, name
    by_name = {r[0]: r for r in rows}
    assert by_name["layers_0/attention/wq/kernel"][3] == (4096, 1024)       # 8 of 32 query heads
    assert by_name["layers_0/attention/wk/kernel"][3] == (4096, 256)        # 2 of 8 kv heads
    assert by_name["layers_0/feed_forward/w2/kernel"][3] == (3584, 4096)    # row-parallel
    assert by_name["tok_embeddings/embedding"][3] == (32064, 4096)          # vocab-parallel
    assert by_name["output/kernel"][3] == (4096, 32064)
    norms = (2 * config.n_layers + 1) * config.dim          # replicated on every device
    per_device = (8_030_261_248 - norms) // 4 + norms        # 8.03B parameters in all
    assert sum(r[4] for r in rows) == 2 * per_device


def test_shardings_command_prints_the_8b_table(capsys):
    assert shardings.main(["--preset", "8b", "--mesh", "1x4"]) == 0
    out = capsys.readouterr().out
    assert "layers_31/feed_forward/w2/kernel" in out and "(3584, 4096)" in out
    assert "per-device total: 3.7 GiB" in out


@pytest.mark.parametrize("text", ["4", "1x", "x4", "0x4", "1*4", "one-by-four"])
def test_malformed_mesh_is_rejected(text):
    with pytest.raises(ValueError, match="not of the form DxM"):
        shardings.parse_mesh(text)


def test_mesh_larger_than_devices_says_how_to_simulate():
    with pytest.raises(ValueError, match=r"needs 64 devices .*jax_num_cpu_devices"):
        shardings.make_mesh("8x8")


@pytest.mark.parametrize("model_axis, complaint", [(3, "n_heads=8 is not divisible"),
                                                   (16, "n_heads=8 is not divisible"),
                                                   (3, "n_kv_heads=2 and the model axis 3 divide neither way")])
def test_unsplittable_model_axis_is_rejected(tiny_config, model_axis, complaint):
    with pytest.raises(ValueError, match=complaint):
        shardings.check_splittable(tiny_config, model_axis)


def test_vocab_not_divisible_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="vocab_size=510 is not divisible by the model axis 4"):
        shardings.check_splittable(tiny_config.replace(vocab_size=510), 4)
