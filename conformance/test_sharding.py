"""The sharding contract (docs/architecture.md#sharding-contract), checked on the placed parameters of the
implementation under test (`parameters()`, adapters/protocol.py), and on the built-in model's 8B layout table and
mesh rules.

For every placed array the check asks, whatever the implementation's orientation:
- it is a jax.Array living on exactly the devices of the mesh the implementation was given;
- each device holds the contract's share of it: 1/M of a split weight (kv heads: one per device when M exceeds
  n_kv_heads), the whole of a norm;
- when it is in a known orientation -- Meta's (out, in) or the transposed (in, out), q/k rows in Meta's interleaved
  or HF's rotate-half order, kv heads repeated in place when replicated -- each device holds exactly the rows or
  columns the contract assigns to its rank on the model axis.
Keys are Meta's names; 'layers.*.<name>' is every layer's <name> stacked on a leading axis (a scan over layers).
Arrays under other names are listed in the printed layout table and counted: on every device the parameters must
add up to the contract's per-device total. An implementation that ignores its mesh fails here.
"""
from __future__ import annotations

import numpy as np
import pytest

from adapters import protocol
from conformance import support
from conformance.sharding import (
    check_array,
    contract_local_shapes,
    names_covered,
    rank_of,
)
from llama_spec.config import preset
from llama_spec.layout import make_mesh
from parity.check import record_not_checked
from tp_llama import shardings
from tp_llama.shardings import MODEL

MESHES = support.meshes_of_model(("1x4", "2x4", "1x2"))


def check_sharding(request, adapter, config, weights, dtype: str, mesh_text: str, mesh):
    """Every parameter the adapter placed against the contract on `mesh` (the one it was built on); prints the
    layout found and fails listing every contradiction."""
    __tracebackhide__ = True
    reason = protocol.missing(adapter, "parameters")
    if reason:
        record_not_checked(request, component="sharding", names=["parameters"], reason=reason, reference=None,
                           dtype=dtype, mesh=mesh_text)
        pytest.skip(reason)
    import jax

    m = mesh.shape[MODEL]
    ranks = rank_of(mesh)
    mesh_devices = set(mesh.devices.flat)
    contract_total = sum(int(np.prod(local)) for local in contract_local_shapes(config, m).values())
    held = {d: 0 for d in mesh_devices}
    covered, problems, rows = set(), [], []
    for key, array in adapter.parameters().items():
        if not isinstance(array, jax.Array):
            problems.append(f"{key}: a {type(array).__name__}, not a placed jax.Array")
            continue
        devices = set(array.sharding.device_set)
        if devices != mesh_devices:
            problems.append(f"{key}: lives on devices {sorted(d.id for d in devices)}, the mesh {mesh_text} has "
                            f"{sorted(d.id for d in mesh_devices)}")
        shards = array.addressable_shards
        for shard in shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.size
        names = names_covered(key, weights)
        covered.update(names)
        verdict = check_array(key, array, names, weights, config, m, ranks, problems) if names else "other name"
        local = sorted({tuple(s.data.shape) for s in shards})
        rows.append((key, str(array.shape), array.dtype.name, str(getattr(array.sharding, "spec", array.sharding)),
                     " ".join(map(str, local)), verdict))
    for device, count in sorted(held.items(), key=lambda kv: kv[0].id):
        if device in mesh_devices and device.process_index == jax.process_index() and count != contract_total:
            problems.append(f"device {device.id} (model rank {ranks[device]}) holds {count} parameter elements, the "
                            f"contract {contract_total}")
    missing = [n for n in weights if n not in covered]
    table = _table(rows, mesh_text, missing)
    print(table)
    if problems:
        raise AssertionError("\n  ".join([f"sharding of the placed parameters on mesh {mesh_text} ({dtype}) "
                                          f"contradicts the contract in {len(problems)} places", *problems, table]))


def _table(rows, mesh_text: str, missing: list[str]) -> str:
    header = ("parameter", "global shape", "dtype", "sharding", "per-device shape", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"layout found on mesh {mesh_text}:"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    if missing:
        lines.append(f"  Meta tensors under no Meta name (counted in the per-device totals only): {len(missing)}")
    return "\n".join(lines)


@pytest.mark.parametrize("mesh_text", MESHES)
def test_each_device_holds_its_slice_of_the_meta_weights(request, impl, tiny_config, tiny_weights, mesh_text):
    check_sharding(request, impl(mesh_text, "float32"), tiny_config, tiny_weights, "float32", mesh_text,
                   make_mesh(mesh_text))


# ---- the check itself, on the broken adapters of examples/broken -------------------------------

def _broken(name, tiny_config, tiny_weights, mesh):
    return protocol.build(protocol.load(f"examples.broken.{name}"), tiny_config, tiny_weights, mesh, "float32")


def test_an_adapter_that_ignores_the_mesh_fails(request, tiny_config, tiny_weights):
    mesh = make_mesh("1x4")
    adapter = _broken("ignores_mesh:IgnoresMeshAdapter", tiny_config, tiny_weights, mesh)
    with pytest.raises(AssertionError) as failure:
        check_sharding(support.probe(request), adapter, tiny_config, tiny_weights, "float32", "1x4", mesh)
    message = str(failure.value)
    assert "on mesh 1x4 (float32) contradicts the contract" in message
    assert "tok_embeddings.weight: lives on devices [0], the mesh 1x4 has [0, 1, 2, 3]" in message
    assert "tok_embeddings.weight: 65536 elements on a device, the contract 16384 (split 1/4 per device)" in message
    assert "device 1 (model rank 1) holds 0 parameter elements" in message


def test_row_parallel_weights_split_the_wrong_way_fail(request, tiny_config, tiny_weights):
    """The gathering adapter splits wo and w2 on their outputs: the right share per device, the wrong slice."""
    mesh = make_mesh("1x4")
    adapter = _broken("all_gather:AllGatherAdapter", tiny_config, tiny_weights, mesh)
    with pytest.raises(AssertionError) as failure:
        check_sharding(support.probe(request), adapter, tiny_config, tiny_weights, "float32", "1x4", mesh)
    message = str(failure.value)
    assert message.count("does not hold the slice the contract assigns") == 2
    assert "layers.*.attention.wo.weight: device 0 (model rank 0)" in message
    assert "layers.*.feed_forward.w2.weight: device 0 (model rank 0)" in message


def test_a_missing_capability_is_not_checked(request, tiny_config, tiny_weights):
    class ForwardOnly:
        def forward(self, tokens, start_pos=0, capture=False):
            return tokens

    with pytest.raises(pytest.skip.Exception, match="not checked: ForwardOnly has no parameters capability"):
        check_sharding(support.probe(request), ForwardOnly(), tiny_config, tiny_weights, "float32", "1x4",
                       make_mesh("1x4"))


# ---- the built-in model's own layout table and mesh rules ---------------------------------------

def test_every_parameter_has_a_rule(builtin_only, tiny_config):
    for path in shardings.param_shapes(tiny_config):
        shardings.param_axes(path)


def test_8b_layout_quarters_every_sharded_weight(builtin_only):
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


def test_shardings_command_prints_the_8b_table(builtin_only, capsys):
    assert shardings.main(["--preset", "8b", "--mesh", "1x4"]) == 0
    out = capsys.readouterr().out
    assert "layers_31/feed_forward/w2/kernel" in out and "(3584, 4096)" in out
    assert "per-device total: 3.7 GiB" in out


@pytest.mark.parametrize("text", ["4", "1x", "x4", "0x4", "1*4", "one-by-four"])
def test_malformed_mesh_is_rejected(builtin_only, text):
    with pytest.raises(ValueError, match="not of the form DxM"):
        shardings.parse_mesh(text)


def test_mesh_larger_than_devices_says_how_to_simulate(builtin_only):
    with pytest.raises(ValueError, match=r"needs 64 devices .*jax_num_cpu_devices"):
        shardings.make_mesh("8x8")


@pytest.mark.parametrize("model_axis, complaint", [(3, "n_heads=8 is not divisible"),
                                                   (16, "n_heads=8 is not divisible"),
                                                   (3, "n_kv_heads=2 and the model axis 3 divide neither way")])
def test_unsplittable_model_axis_is_rejected(builtin_only, tiny_config, model_axis, complaint):
    with pytest.raises(ValueError, match=complaint):
        shardings.check_splittable(tiny_config, model_axis)


def test_vocab_not_divisible_is_rejected(builtin_only, tiny_config):
    with pytest.raises(ValueError, match="vocab_size=510 is not divisible by the model axis 4"):
        shardings.check_splittable(tiny_config.replace(vocab_size=510), 4)
