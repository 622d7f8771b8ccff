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

import re
from types import SimpleNamespace

import numpy as np
import pytest

from adapters import protocol
from llama_spec.config import preset
from llama_spec.layout import kv_replication, make_mesh, meta_weight_shapes
from parity.check import record_not_checked
from tp_llama import shardings
from tp_llama.shardings import MODEL

MESHES = ("1x4", "2x4", "1x2")
# Which axis of each Meta weight (out, in) the model axis splits, or None when replicated.
META_SPLIT_AXIS = {
    "tok_embeddings.weight": 0, "output.weight": 0,
    "wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "w1.weight": 0, "w3.weight": 0,
    "wo.weight": 1, "w2.weight": 1,
    "norm.weight": None,
}
STACKED = "layers.*."


def _split_axis(meta_name: str):
    for suffix, axis in META_SPLIT_AXIS.items():
        if meta_name.endswith(suffix):
            return axis
    raise KeyError(meta_name)


def _halves(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order of a Meta q/k weight (rows (i, i + head_dim/2) per head)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _repeat_kv(w: np.ndarray, heads: int, copies: int) -> np.ndarray:
    """Each kv head's rows `copies` times in place: device r of the model axis holds kv head r // copies."""
    rows, cols = w.shape
    return np.repeat(w.reshape(heads, 1, rows // heads, cols), copies, axis=1).reshape(rows * copies, cols)


def contract_layouts(name: str, value: np.ndarray, config, m: int) -> list[tuple[str, np.ndarray]]:
    """The Meta-orientation arrays a placed `name` may hold under the contract: (label, array)."""
    leaf = name.rsplit(".", 2)[-2]
    views = [("meta", value)]
    if leaf in ("wq", "wk"):
        views.append(("rotate-half rows", _halves(value, config.n_heads if leaf == "wq" else config.n_kv_heads)))
    copies = kv_replication(config, m)
    if leaf in ("wk", "wv") and copies > 1:
        views = [(f"{label}, kv heads x{copies}", _repeat_kv(v, config.n_kv_heads, copies)) for label, v in views]
    return views


def _covered(key: str, weights) -> list[str]:
    """The Meta tensors behind a key: itself, or every layer's for 'layers.*.<name>'; [] for other names."""
    if key.startswith(STACKED):
        pattern = r"layers\.\d+\." + re.escape(key[len(STACKED):])
        return sorted((n for n in weights if re.fullmatch(pattern, n)), key=lambda n: int(n.split(".")[1]))
    return [key] if key in weights else []


def _rank_of(mesh) -> dict:
    return {device: j for (_, j), device in np.ndenumerate(mesh.devices)}


def _candidates(key, names, weights, config, m):
    """(label, global array in the placed orientation, split axis or None) for every known layout of `key`."""
    stacked = key.startswith(STACKED)
    axis = _split_axis(names[0])
    per_name = [contract_layouts(n, weights[n], config, m) for n in names]
    out = []
    for i, (label, _) in enumerate(per_name[0]):
        meta = np.stack([views[i][1] for views in per_name]) if stacked else per_name[0][i][1]
        lead = 1 if stacked else 0
        if meta.ndim - lead == 1:
            out.append((label, meta, None if axis is None else axis + lead))
            continue
        out.append((f"{label}, (out, in)", meta, None if axis is None else axis + lead))
        out.append((f"{label}, (in, out)", np.swapaxes(meta, -1, -2), None if axis is None else 1 - axis + lead))
    return out


def _expected_local(full: np.ndarray, axis, rank: int, m: int) -> np.ndarray:
    if axis is None:
        return full
    size = full.shape[axis] // m
    return np.take(full, np.arange(rank * size, (rank + 1) * size), axis=axis)


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
    ranks = _rank_of(mesh)
    mesh_devices = set(mesh.devices.flat)
    contract_total = sum(int(np.prod(local)) for local in _contract_local_shapes(config, m).values())
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
        names = _covered(key, weights)
        covered.update(names)
        verdict = _check_array(key, array, names, weights, config, m, ranks, problems) if names else "other name"
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


def _contract_local_shapes(config, m: int) -> dict[str, tuple[int, ...]]:
    """Per-device shape of every Meta tensor under the contract (Meta orientation)."""
    copies = kv_replication(config, m)
    out = {}
    for name, shape in meta_weight_shapes(config).items():
        axis = _split_axis(name)
        shape = list(shape)
        if name.endswith(("wk.weight", "wv.weight")):
            shape[0] *= copies
        if axis is not None:
            shape[axis] //= m
        out[name] = tuple(shape)
    return out


def _check_array(key, array, names, weights, config, m, ranks, problems) -> str:
    """Per-device element counts, then the exact content when the array is in a known layout; the verdict."""
    local = _contract_local_shapes(config, m)
    expected = sum(int(np.prod(local[n])) for n in names)  # a stack holds every layer's share
    wrong = sorted({s.data.size for s in array.addressable_shards if s.data.size != expected})
    if wrong:
        problems.append(f"{key}: {', '.join(map(str, wrong))} elements on a device, the contract {expected} "
                        f"({'split 1/' + str(m) if _split_axis(names[0]) is not None else 'whole'} per device)")
        return "wrong share"
    matching = [c for c in _candidates(key, names, weights, config, m) if c[1].shape == array.shape]
    if not matching:
        return "counted (orientation not recognised)"
    first_wrong = None
    for label, full, axis in matching:
        for shard in array.addressable_shards:
            rank = ranks[shard.device]
            want = _expected_local(full, axis, rank, m).astype(shard.data.dtype)
            got = np.asarray(shard.data)
            if got.shape != want.shape or not np.array_equal(got, want):
                first_wrong = first_wrong or (label, rank, shard.device.id, got.shape, want.shape)
                break
        else:
            return f"exact ({label})"
    label, rank, device, got, want = first_wrong
    problems.append(f"{key}: device {device} (model rank {rank}) does not hold the slice the contract assigns to its "
                    f"rank in any known layout (first tried: {label}, expected shape {want}, found {got})")
    return "wrong content"


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

def _probe(request):
    return SimpleNamespace(config=request.config, node=SimpleNamespace(nodeid="probe", user_properties=[]))


def _broken(name, tiny_config, tiny_weights, mesh):
    return protocol.build(protocol.load(f"examples.broken.{name}"), tiny_config, tiny_weights, mesh, "float32")


def test_an_adapter_that_ignores_the_mesh_fails(request, tiny_config, tiny_weights):
    mesh = make_mesh("1x4")
    adapter = _broken("ignores_mesh:IgnoresMeshAdapter", tiny_config, tiny_weights, mesh)
    with pytest.raises(AssertionError) as failure:
        check_sharding(_probe(request), adapter, tiny_config, tiny_weights, "float32", "1x4", mesh)
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
        check_sharding(_probe(request), adapter, tiny_config, tiny_weights, "float32", "1x4", mesh)
    message = str(failure.value)
    assert message.count("does not hold the slice the contract assigns") == 2
    assert "layers.*.attention.wo.weight: device 0 (model rank 0)" in message
    assert "layers.*.feed_forward.w2.weight: device 0 (model rank 0)" in message


def test_a_missing_capability_is_not_checked(request, tiny_config, tiny_weights):
    class ForwardOnly:
        def forward(self, tokens, start_pos=0, capture=False):
            return tokens

    with pytest.raises(pytest.skip.Exception, match="not checked: ForwardOnly has no parameters capability"):
        check_sharding(_probe(request), ForwardOnly(), tiny_config, tiny_weights, "float32", "1x4", make_mesh("1x4"))


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
