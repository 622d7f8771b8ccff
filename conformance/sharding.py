"""What the sharding check reads of an adapter's placed parameters, shared by the battery and the doctor: which
weights a `parameters()` key covers, which mesh axis splits it, and the shapes each device must hold."""
from __future__ import annotations

import re

import numpy as np

from llama_spec.layout import kv_replication, meta_weight_shapes

# Which axis of each Meta weight (out, in) the model axis splits, or None when replicated.
META_SPLIT_AXIS = {
    "tok_embeddings.weight": 0, "output.weight": 0,
    "wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "w1.weight": 0, "w3.weight": 0,
    "wo.weight": 1, "w2.weight": 1,
    "norm.weight": None,
}


def split_axis(meta_name: str):
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


def expected_local(full: np.ndarray, axis, rank: int, m: int) -> np.ndarray:
    if axis is None:
        return full
    size = full.shape[axis] // m
    return np.take(full, np.arange(rank * size, (rank + 1) * size), axis=axis)


STACKED = "layers.*."


def names_covered(key: str, weights) -> list[str]:
    """The Meta tensors behind a key: itself, or every layer's for 'layers.*.<name>'; [] for other names."""
    if key.startswith(STACKED):
        pattern = r"layers\.\d+\." + re.escape(key[len(STACKED):])
        return sorted((n for n in weights if re.fullmatch(pattern, n)), key=lambda n: int(n.split(".")[1]))
    return [key] if key in weights else []


def rank_of(mesh) -> dict:
    return {device: j for (_, j), device in np.ndenumerate(mesh.devices)}


def candidates(key, names, weights, config, m):
    """(label, global array in the placed orientation, split axis or None) for every known layout of `key`."""
    stacked = key.startswith(STACKED)
    axis = split_axis(names[0])
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


def contract_local_shapes(config, m: int) -> dict[str, tuple[int, ...]]:
    """Per-device shape of every Meta tensor under the contract (Meta orientation)."""
    copies = kv_replication(config, m)
    out = {}
    for name, shape in meta_weight_shapes(config).items():
        axis = split_axis(name)
        shape = list(shape)
        if name.endswith(("wk.weight", "wv.weight")):
            shape[0] *= copies
        if axis is not None:
            shape[axis] //= m
        out[name] = tuple(shape)
    return out


def check_array(key, array, names, weights, config, m, ranks, problems) -> str:
    """Per-device element counts, then the exact content when the array is in a known layout; the verdict."""
    local = contract_local_shapes(config, m)
    expected = sum(int(np.prod(local[n])) for n in names)  # a stack holds every layer's share
    wrong = sorted({s.data.size for s in array.addressable_shards if s.data.size != expected})
    if wrong:
        problems.append(f"{key}: {', '.join(map(str, wrong))} elements on a device, the contract {expected} "
                        f"({'split 1/' + str(m) if split_axis(names[0]) is not None else 'whole'} per device)")
        return "wrong share"
    matching = [c for c in candidates(key, names, weights, config, m) if c[1].shape == array.shape]
    if not matching:
        return "counted (orientation not recognised)"
    first_wrong = None
    for label, full, axis in matching:
        for shard in array.addressable_shards:
            rank = ranks[shard.device]
            want = expected_local(full, axis, rank, m).astype(shard.data.dtype)
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
