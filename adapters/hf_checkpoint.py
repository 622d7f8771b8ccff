"""HF checkpoint facts the library adapters share: a suite config's RoPE scaling under HF's names, whether its
embeddings are tied, and HF checkpoint directories written in either config.json style.

Plain data, JSON and NumPy (no keras, easydel, torch or jax import), so every adapter can use it and none imports
another library's adapter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fixtures.checkpoints import write_hf_checkpoint
from llama_spec import config as spec
from llama_spec.config import LlamaConfig

CONFIG_STYLES = ("rope_parameters", "rope_scaling")
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling_of(config: LlamaConfig) -> dict[str, float] | None:
    """The Llama 3 RoPE scaling parameters of a suite config under HF's names, None when RoPE is unscaled.
    (Reads both LlamaConfig generations: `use_scaled_rope` with Llama 3.1's constants, or a `rope_scaling`
    object carrying the four parameters.)"""
    if not config.use_scaled_rope:
        return None
    scaling = getattr(config, "rope_scaling", None)
    if scaling is None:
        return dict(spec.LLAMA31_ROPE_SCALING)
    if isinstance(scaling, Mapping):
        return {k: scaling[k] for k in _ROPE_KEYS}
    return {k: getattr(scaling, k) for k in _ROPE_KEYS}


def tied(config: LlamaConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def restyle_config_json(data: Mapping[str, Any], style: str) -> dict[str, Any]:
    """An HF config.json in the other style, the same model:
    - 'rope_parameters' (transformers 5): rope_theta and the scaling inside `rope_parameters`;
    - 'rope_scaling' (the hub's, Llama 3.1's own file): a top-level `rope_theta` and a `rope_scaling` dict with
      rope_type 'llama3', factor, low/high_freq_factor, original_max_position_embeddings (null when unscaled)."""
    if style not in CONFIG_STYLES:
        raise ValueError(f"config.json style {style!r}; choose one of {CONFIG_STYLES}")
    data = dict(data)
    rope = dict(data.pop("rope_parameters", None) or {})
    hub = data.pop("rope_scaling", None)
    theta = rope.pop("rope_theta", data.pop("rope_theta", None))
    if hub:
        rope = {**hub, **rope}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    scaled = rope_type != "default"
    if style == "rope_parameters":
        data["rope_parameters"] = {"rope_theta": theta, "rope_type": rope_type,
                                   **({k: rope[k] for k in _ROPE_KEYS} if scaled else {})}
    else:
        data["rope_theta"] = theta
        data["rope_scaling"] = {"rope_type": rope_type, **{k: rope[k] for k in _ROPE_KEYS}} if scaled else None
    return data


def write_hf(directory: str | Path, config: LlamaConfig, weights: Mapping[str, np.ndarray], style: str) -> Path:
    """The suite's own HF checkpoint writer (fixtures.checkpoints, float32 safetensors, HF's q/k permutation),
    then config.json in `style`."""
    directory = write_hf_checkpoint(directory, config, weights, dtype="float32")
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(restyle_config_json(json.loads(path.read_text()), style), indent=2) + "\n")
    return Path(directory)
