"""The sharding contract as data (docs/architecture.md#sharding-contract), mesh construction and weight placement.

Every parameter names its logical axes; one table maps logical axes to mesh axes. Run
`python -m tp_llama.shardings --preset 8b --mesh 1x4` to print the per-device layout without allocating.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping

import numpy as np

from llama_spec.config import PRESETS, LlamaConfig, preset
from llama_spec.layout import DATA, MODEL, check_splittable, kv_replication, make_mesh, parse_mesh  # noqa: F401

# Logical axes of every parameter, keyed by the last two keys of its path in the parameter tree.
PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tok_embeddings", "embedding"): ("vocab", "embed"),
    ("wq", "kernel"): ("embed", "q_heads"),
    ("wk", "kernel"): ("embed", "kv_heads"),
    ("wv", "kernel"): ("embed", "kv_heads"),
    ("wo", "kernel"): ("q_heads", "embed"),
    ("w1", "kernel"): ("embed", "mlp"),
    ("w3", "kernel"): ("embed", "mlp"),
    ("w2", "kernel"): ("mlp", "embed"),
    ("attention_norm", "weight"): ("embed",),
    ("ffn_norm", "weight"): ("embed",),
    ("norm", "weight"): ("embed",),
    ("output", "kernel"): ("embed", "vocab"),
}

# Logical axis -> mesh axis (None: replicated).
LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "seq": None,
    "head_dim": None,
}

# Activations and caches crossing the shard_map boundary.
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "seq"),
    "hidden": ("batch", "seq", "embed"),
    "q_heads": ("batch", "seq", "q_heads", "head_dim"),
    "kv_heads": ("batch", "seq", "kv_heads", "head_dim"),
    "logits": ("batch", "seq", "vocab"),
    "kv_cache": ("batch", "seq", "kv_heads", "head_dim"),
}


def spec(axes: tuple[str, ...]):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*(LOGICAL_TO_MESH[a] for a in axes))


def param_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    key = tuple(path[-2:])
    if key not in PARAM_AXES:
        raise KeyError(f"parameter {'/'.join(path)} has no sharding rule in tp_llama.shardings.PARAM_AXES")
    return PARAM_AXES[key]


# ---- meshes ---------------------------------------------------------------------------------

# ---- parameter shapes and placement ---------------------------------------------------------

def param_shapes(config: LlamaConfig, model_parallel: int = 1) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Global shapes of the placed parameter tree (kv projections widened by kv replication)."""
    d, hd, f, v = config.dim, config.head_dim, config.hidden_dim, config.vocab_size
    kv_cols = config.n_kv_heads * kv_replication(config, model_parallel) * hd
    shapes = {("tok_embeddings", "embedding"): (v, d)}
    for i in range(config.n_layers):
        layer = f"layers_{i}"
        shapes.update({
            (layer, "attention_norm", "weight"): (d,),
            (layer, "attention", "wq", "kernel"): (d, config.n_heads * hd),
            (layer, "attention", "wk", "kernel"): (d, kv_cols),
            (layer, "attention", "wv", "kernel"): (d, kv_cols),
            (layer, "attention", "wo", "kernel"): (config.n_heads * hd, d),
            (layer, "ffn_norm", "weight"): (d,),
            (layer, "feed_forward", "w1", "kernel"): (d, f),
            (layer, "feed_forward", "w3", "kernel"): (d, f),
            (layer, "feed_forward", "w2", "kernel"): (f, d),
        })
    shapes[("norm", "weight")] = (d,)
    shapes[("output", "kernel")] = (d, v)
    return shapes


def local_shape(shape: tuple[int, ...], axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    out = []
    for size, axis in zip(shape, axes):
        mesh_axis = LOGICAL_TO_MESH[axis]
        out.append(size // mesh_shape[mesh_axis] if mesh_axis else size)
    return tuple(out)


def replicate_kv_heads(kernel: np.ndarray, head_dim: int, copies: int) -> np.ndarray:
    """(dim, kv*hd) -> (dim, kv*copies*hd), each kv head's columns repeated in place (kv0, kv0, kv1, kv1...)."""
    if copies == 1:
        return kernel
    dim, cols = kernel.shape
    heads = kernel.reshape(dim, cols // head_dim, 1, head_dim)
    return np.broadcast_to(heads, (dim, cols // head_dim, copies, head_dim)).reshape(dim, cols * copies)


def tree_items(tree: Mapping, path=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from tree_items(value, (*path, key))
        else:
            yield (*path, key), value


def tree_from_items(items) -> dict:
    tree: dict = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def place_params(tree: Mapping, config: LlamaConfig, mesh, dtype) -> dict:
    """Put a host parameter tree (global shapes, JAX layout) on the mesh, each device receiving only its shard.

    Each array is cast to `dtype` on the host once and handed to `jax.make_array_from_callback`, which asks for
    one device's slice at a time, so no device ever holds more than its shard.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    m = mesh.shape[MODEL]
    check_splittable(config, m)
    copies = kv_replication(config, m)
    np_dtype = jnp.dtype(dtype)
    placed = []
    for path, value in tree_items(tree):
        axes = param_axes(path)
        host = np.asarray(value)
        if axes[-1] == "kv_heads":
            host = replicate_kv_heads(host, config.head_dim, copies)
        host = host.astype(np_dtype, copy=False)
        expected = param_shapes(config, m).get(tuple(path))
        if expected is not None and host.shape != expected:
            raise ValueError(f"parameter {'/'.join(path)}: shape {host.shape} does not match the config's {expected}")
        sharding = NamedSharding(mesh, spec(axes))
        placed.append((path, jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])))
    return tree_from_items(placed)


def param_specs(config: LlamaConfig) -> dict:
    """PartitionSpec tree matching the parameter tree (the shard_map in_specs)."""
    return tree_from_items((path, spec(param_axes(path))) for path in param_shapes(config))


# ---- the layout table -----------------------------------------------------------------------

def layout_rows(config: LlamaConfig, mesh_text: str, dtype_bytes: int = 2):
    """(name, global shape, PartitionSpec, per-device shape, per-device bytes) for every parameter."""
    d, m = parse_mesh(mesh_text)
    check_splittable(config, m)
    mesh_shape = {DATA: d, MODEL: m}
    for path, shape in param_shapes(config, m).items():
        axes = param_axes(path)
        local = local_shape(shape, axes, mesh_shape)
        yield "/".join(path), shape, spec(axes), local, int(np.prod(local)) * dtype_bytes


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tp_llama.shardings",
                                     description="Print every parameter's sharding without allocating weights.")
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    parser.add_argument("--mesh", default="1x4", help="DxM (data x model), default 1x4")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    config = preset(args.preset)
    nbytes = 2 if args.dtype == "bfloat16" else 4
    try:
        rows = list(layout_rows(config, args.mesh, nbytes))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    header = ("parameter", "global shape", "PartitionSpec", "per-device shape", "per-device")
    table = [(n, str(s), str(tuple(p)), str(local), _human(b)) for n, s, p, local, b in rows]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"preset {args.preset}, mesh {args.mesh} (data x model), {args.dtype}; "
          f"kv heads replicated x{kv_replication(config, parse_mesh(args.mesh)[1])}")
    for row in [header, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    total = sum(r[4] for r in rows)
    print(f"per-device total: {_human(total)} ({total} bytes) of parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
