"""Capture helpers for adapters: a model's own intermediate tensors under the suite's names (reference/layers.py).

A model records tensors under its own paths (Flax NNX `Module.sow` inside `nnx.capture`, Flax linen
`capture_intermediates` or `self.sow`, or a plain `Recorder` for a jax.numpy model); a `Taps` table maps those
paths to the suite's names, `{i}` standing for the layer index ('layers.{i}.attn.q' -> 'layers.{i}.q_rope').
Paths the table does not name are left out (their checks end "not checked"). With `halves_qk=True` q_rope and
k_rope are converted from HF's rotate-half layout to Meta's interleaved one, which the suite compares.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from llama_spec.convert import halves_to_interleaved_last_axis
from reference.layers import PER_LAYER_NAMES

TOP_NAMES = ("embedding", "final_norm", "logits")
ROTATED = ("q_rope", "k_rope")  # the names whose last axis is in a RoPE layout
LAYER = "{i}"


def _is_suite_name(pattern: str) -> bool:
    return pattern in TOP_NAMES or pattern in {f"layers.{LAYER}.{name}" for name in PER_LAYER_NAMES}


def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape(LAYER), r"(?P<i>\d+)") + r"\Z")


class Taps:
    """A table {the model's path: the suite's name}; paths are dot-joined ('layers.0.attn.q'), `{i}` a layer."""

    def __init__(self, table: Mapping[str, str], *, halves_qk: bool = False):
        unknown = sorted(name for name in table.values() if not _is_suite_name(name))
        if unknown:
            known = ", ".join(TOP_NAMES + tuple(f"layers.{LAYER}.{n}" for n in PER_LAYER_NAMES))
            raise ValueError(f"Taps: {unknown} are not the suite's intermediate names; use one of {known}")
        self.rules = [(_regex(path), name) for path, name in table.items()]
        self.halves_qk = halves_qk

    def suite_name(self, path: str) -> str | None:
        """The suite's name for one of the model's paths, or None when the table does not name it."""
        for regex, name in self.rules:
            match = regex.match(path)
            if match:
                return name.replace(LAYER, match.group("i")) if LAYER in name else name
        return None

    def convert(self, name: str, value: Any) -> Any:
        """The tensor as the suite wants it: q/k moved to Meta's interleaved layout when `halves_qk`."""
        if self.halves_qk and name.rsplit(".", 1)[-1] in ROTATED:
            return halves_to_interleaved_last_axis(value)
        return value

    def rename(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """{model path: tensor} -> {suite name: tensor}; paths the table does not name are left out."""
        named = {}
        for path, value in flat.items():
            name = self.suite_name(path)
            if name is not None:
                if name in named:
                    raise ValueError(f"Taps: two paths of the model map to {name!r} (the second is {path!r}); "
                                     f"make the table's paths specific enough to name one tensor each")
                named[name] = self.convert(name, value)
        return named


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a Flax `State`'s pure dict, a linen collection) -> {'a.0.b': leaf}. A sown value is a
    tuple of every call's tensor: the last call's is kept."""
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, tuple):
        tree = tree[-1]
    return {prefix[:-1]: tree}


class Recorder:
    """For a plain jax.numpy model: `record(path, x)` keeps x under `path` and returns it, inside or outside jit
    (return `recorder.taps` from the jitted function)."""

    def __init__(self) -> None:
        self.taps: dict[str, Any] = {}

    def record(self, path: str, x: Any) -> Any:
        self.taps[path] = x
        return x


def nnx_intermediates(module: Any, *args: Any, taps: Taps, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Call a Flax NNX module under `nnx.capture`, collecting what it sowed as `nnx.Intermediate`:
    (its output, {suite name: tensor})."""
    from flax import nnx  # lazy: flax is heavy and only NNX adapters need it

    output, state = nnx.capture(module, nnx.Intermediate)(*args, **kwargs)
    return output, taps.rename(flatten(nnx.to_pure_dict(state)))


def linen_intermediates(module: Any, variables: Any, *args: Any, taps: Taps,
                        capture: bool | Callable[..., bool] = True, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`module.apply(variables, *args)` with the 'intermediates' collection mutable: what it sowed there, and the
    method outputs `capture_intermediates` keeps (`capture`: True, or a filter(module, method_name)), under paths
    such as 'layers_0.attention.__call__'. Returns (its output, {suite name: tensor})."""
    output, state = module.apply(variables, *args, capture_intermediates=capture, mutable=["intermediates"],
                                 **kwargs)
    return output, taps.rename(flatten(state.get("intermediates", {})))
