"""The built-in model's parameter tree from Meta's checkpoint, and its parameter paths back to Meta's names.

Meta Linear weights are (out, in); the JAX kernels are (in, out). Embedding and norms keep their shape.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _jax_path(meta_name: str) -> tuple[str, ...]:
    m = _LAYER.fullmatch(meta_name)
    if m:
        parts = m.group(2).split(".")
        path = (f"layers_{m.group(1)}", *parts)
    else:
        path = tuple(meta_name.split("."))
    leaf = path[-1]
    if leaf != "weight":
        raise KeyError(f"{meta_name}: not a Meta Llama parameter name")
    if path[0] == "tok_embeddings":
        return ("tok_embeddings", "embedding")
    if path[-2].endswith("norm") or path[0] == "norm":
        return path  # (..., 'attention_norm', 'weight')
    return (*path[:-1], "kernel")


def _is_linear(meta_name: str) -> bool:
    return not (meta_name.startswith("tok_embeddings") or meta_name.endswith("norm.weight"))


def meta_to_jax(state: Mapping[str, np.ndarray]) -> dict:
    """Meta state dict -> nested parameter tree of the JAX model (global, unsharded shapes)."""
    tree: dict = {}
    for name, value in state.items():
        path = _jax_path(name)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value).T if _is_linear(name) else np.asarray(value)
    return tree


def meta_name_of(path: tuple[str, ...]) -> str:
    """A JAX parameter path ('layers_0', 'attention', 'wq', 'kernel') -> its Meta name (inverse of `_jax_path`)."""
    if path[0].startswith("layers_"):
        return "layers." + path[0][len("layers_"):] + "." + ".".join(path[1:-1]) + ".weight"
    if path[0] == "tok_embeddings":
        return "tok_embeddings.weight"
    return ".".join(path[:-1]) + ".weight"
