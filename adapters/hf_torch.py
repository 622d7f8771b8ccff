"""transformers' PyTorch LlamaForCausalLM as the libraries that consume it (torchax, penzai) are given it: made from
the suite's config and Meta weights, or loaded from an HF directory by transformers itself."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import transformers

from llama_spec.config import LlamaConfig
from llama_spec.convert import meta_to_hf
from reference.torch_utils import load_module, torch_dtype


def from_suite_config(config: LlamaConfig, weights: Mapping[str, np.ndarray], dtype: str):
    """LlamaForCausalLM from `transformers.LlamaConfig(**config.to_hf())` (default attention, as a user gets it),
    parameters created at dtype as from_pretrained creates them (float32 rotary inv_freq), the suite's Meta weights
    loaded through llama_spec.convert.meta_to_hf (HF's q/k row permutation)."""
    td = torch_dtype(dtype)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config.to_hf()), dtype=td)
    return load_module(model, meta_to_hf(weights, config), td, cast=False)


def from_pretrained(path, dtype: str):
    """transformers' own loader on an HF directory, as a user loads a downloaded snapshot."""
    return transformers.LlamaForCausalLM.from_pretrained(Path(path), dtype=torch_dtype(dtype)).eval()
