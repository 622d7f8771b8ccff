"""What the sharding contract and Meta's checkpoint fix independently of any implementation: the tensors of a
Meta checkpoint, the ('data', 'model') mesh, and whether a model axis can split a config
(docs/architecture.md#sharding-contract).

The built-in model, the references, the fixtures and the checks all read these, so none of them has to import
another's code.
"""
from __future__ import annotations

import re

import numpy as np

from llama_spec.config import LlamaConfig

DATA, MODEL = "data", "model"


def meta_weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta checkpoint (model-parallel size 1) with its shape, in checkpoint order."""
    d, hd, f = config.dim, config.head_dim, config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (config.n_heads * hd, d),
            p + "attention.wk.weight": (config.n_kv_heads * hd, d),
            p + "attention.wv.weight": (config.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, config.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def parse_mesh(text: str) -> tuple[int, int]:
    """'DxM' -> (D, M)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"mesh {text!r} is not of the form DxM with positive integers, for example 1x4 "
                         "(D-way data parallel by M-way tensor parallel)")
    return int(m.group(1)), int(m.group(2))


def make_mesh(text: str, devices=None):
    """A ('data', 'model') mesh over the first D*M devices."""
    import jax
    from jax.sharding import Mesh

    d, m = parse_mesh(text)
    devices = list(jax.devices() if devices is None else devices)
    if d * m > len(devices):
        platform = devices[0].platform if devices else "?"
        hint = ("simulate more CPU devices with jax.config.update('jax_num_cpu_devices', N) before JAX starts, "
                "or pytest --cpu-devices N") if platform == "cpu" else "use a smaller mesh"
        raise ValueError(f"mesh {text} needs {d * m} devices but only {len(devices)} {platform} device(s) are "
                         f"present; {hint}")
    return Mesh(np.array(devices[: d * m]).reshape(d, m), (DATA, MODEL))


def kv_replication(config: LlamaConfig, model_parallel: int) -> int:
    """How many copies of each kv head the model axis holds (>1 when it exceeds n_kv_heads)."""
    return max(1, model_parallel // config.n_kv_heads)


def check_splittable(config: LlamaConfig, model_parallel: int, where: str = "") -> None:
    """Raise a one-line ValueError when the model axis cannot split heads, kv heads, SwiGLU width or vocab."""
    m, problems = model_parallel, []
    if config.n_heads % m:
        problems.append(f"n_heads={config.n_heads} is not divisible by the model axis {m}")
    kv = config.n_kv_heads
    if kv % m and m % kv:
        problems.append(f"n_kv_heads={kv} and the model axis {m} divide neither way (kv heads can be split "
                        "or replicated, not both)")
    if config.hidden_dim % m:
        problems.append(f"SwiGLU width {config.hidden_dim} is not divisible by the model axis {m}")
    if config.vocab_size % m:
        problems.append(f"vocab_size={config.vocab_size} is not divisible by the model axis {m}")
    if problems:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}cannot shard over a model axis of {m}: " + "; ".join(problems)
                         + "; choose a model axis that divides them")
