"""Layer-by-layer conformance for models too large to hold at once (the real 8B on one 24 GiB host).

A 1xM CPU-simulated mesh keeps all M "devices" in host memory, so the whole 8B model (16 GB in bfloat16) does
not fit beside two references. Here each part of the model in turn, the embedding, every block, then the final
norm and logits, has only its own weights read (memory-mapped by llama_spec.checkpoint), placed on the mesh shard
by shard (`place_params` hands each device its slice), run by the JAX model, by each reference and by the
float64 oracle, and dropped. Peak memory is one part plus activations, whatever the depth.

Every side gets the same input for every part: the float64 oracle's output of the part before, rounded to the
run dtype. Each part is so checked in isolation (errors do not compound across layers), and the oracle, also
computing with weights rounded to the run dtype, measures only each side's own arithmetic.

The caller compares: `run_layerwise` returns the outputs and never judges them.
"""
from __future__ import annotations

import dataclasses
import gc
import math
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from llama_spec.checkpoint import check_mesh, numpy_to_torch
from llama_spec.config import LlamaConfig
from llama_spec.host import host
from llama_spec.layout import meta_weight_shapes
from reference import hf, meta, oracle
from reference.layers import layer_state, layer_weights
from reference.torch_utils import to_numpy, to_torch, torch_dtype
from tp_llama import components
from tp_llama.convert import meta_to_jax
from tp_llama.model import Linear, RMSNorm, TPLlama, VocabParallelEmbed
from tp_llama.shardings import ACTIVATION_AXES, make_mesh, param_specs, parse_mesh, place_params, spec

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Vocab rows per float64 block of the oracle's logits (8192 x 4096 x 8 bytes = 256 MiB at 8B widths).
_ORACLE_VOCAB_BLOCK = 8192


@dataclasses.dataclass
class LayerwiseRun:
    """Outputs named as in reference/layers.py: 'embedding', 'layers.{i}.block_out', 'logits'."""
    actual: dict[str, np.ndarray]                # the JAX model on the mesh, float32
    expected: dict[str, dict[str, np.ndarray]]   # reference name -> outputs, float32
    oracle: dict[str, np.ndarray]                # float64


def _at(array, dtype: str) -> np.ndarray:
    """`array` rounded to the run dtype (no copy when it already is)."""
    return np.asarray(array).astype(_NP_DTYPES[dtype], copy=False)


def _input(carry: np.ndarray, dtype: str) -> np.ndarray:
    """The oracle's float64 activations as every side receives them: float32 holding run-dtype values."""
    return _at(carry.astype(np.float32), dtype).astype(np.float32)


# ---- the JAX side, one part at a time -------------------------------------------------------------------


def _shard_run(model, local, in_specs, out_specs, *args):
    import jax

    return jax.jit(jax.shard_map(local, mesh=model.mesh, in_specs=in_specs, out_specs=out_specs))(*args)


def jax_embedding(model, table, tokens) -> np.ndarray:
    """The vocab-parallel embedding (model.VocabParallelEmbed) with only its table placed on the mesh."""
    import jax.numpy as jnp


    params = place_params({"tok_embeddings": {"embedding": table}}, model.config, model.mesh, model.dtype)
    module = VocabParallelEmbed(model.dims)
    out = _shard_run(model, lambda w, t: module.apply({"params": w}, t, model.dtype),
                     (param_specs(model.config)["tok_embeddings"], spec(ACTIVATION_AXES["tokens"])),
                     spec(ACTIVATION_AXES["hidden"]), params["tok_embeddings"], jnp.asarray(tokens, jnp.int32))
    return host(out)


def jax_block(model, layer: Mapping[str, np.ndarray], index: int, x, start_pos: int) -> np.ndarray:
    """tp_llama.components.block with only layer `index`'s weights (short keys, Meta layout) on the mesh."""
    params = model.place(meta_to_jax(layer_state(layer, index)))
    return components.block(model, params, x, layer=index, start_pos=start_pos)


def jax_head(model, norm_weight, output_weight, x) -> np.ndarray:
    """Final RMSNorm and vocab-parallel logits, as the last lines of model.Transformer, on the mesh."""
    import jax.numpy as jnp


    config = model.config
    params = place_params({"norm": {"weight": norm_weight}, "output": {"kernel": np.asarray(output_weight).T}},
                          config, model.mesh, model.dtype)
    norm, output = RMSNorm(config.dim, config.norm_eps), Linear(config.dim, model.dims.vocab)

    def local(p, h):
        h = norm.apply({"params": p["norm"]}, h)
        return output.apply({"params": p["output"]}, h).astype(model.dtype).astype(jnp.float32)

    specs = param_specs(config)
    out = _shard_run(model, local, ({"norm": specs["norm"], "output": specs["output"]},
                                    spec(ACTIVATION_AXES["hidden"])),
                     spec(ACTIVATION_AXES["logits"]), params, jnp.asarray(x, model.dtype))
    return host(out)


# ---- the references and the oracle, one part at a time ----------------------------------------------------


def reference_embedding(table, tokens, dtype: str) -> np.ndarray:
    """What both references' embeddings compute (fairscale VocabParallelEmbedding at model-parallel size 1 and
    nn.Embedding are both F.embedding over the table at the run dtype), without copying the table to float32."""
    import torch


    with torch.inference_mode():
        return to_numpy(torch.nn.functional.embedding(torch.from_numpy(np.asarray(tokens, np.int64)),
                                                      numpy_to_torch(table, dtype)))


def reference_block(name: str, x, layer: Mapping[str, np.ndarray], config: LlamaConfig, dtype: str,
                    start_pos: int) -> np.ndarray:
    """The reference's own transformer block (Meta's TransformerBlock, HF's LlamaDecoderLayer) for one layer."""
    block = {"meta": meta.meta_block, "hf": hf.hf_block}[name]
    return block(x, layer, config, dtype, start_pos)


def reference_head(name: str, x, norm_weight, output_weight, config: LlamaConfig, dtype: str) -> np.ndarray:
    """The reference's own final RMSNorm, then its output projection: both run F.linear at the run dtype (fairscale
    ColumnParallelLinear at size 1, nn.Linear) and hand back float32, done here on the (vocab, dim) weight as
    stored rather than building a float32 module around it."""
    import torch


    rms_norm = {"meta": meta.meta_rms_norm, "hf": hf.hf_rms_norm}[name]
    normed = rms_norm(x, norm_weight, config.norm_eps, dtype)
    with torch.inference_mode():
        return to_numpy(torch.nn.functional.linear(to_torch(normed, torch_dtype(dtype)),
                                                   numpy_to_torch(output_weight, dtype)))


def oracle_head(x, norm_weight, output_weight, config: LlamaConfig) -> np.ndarray:
    """float64 logits, the output weight converted a block of vocab rows at a time."""
    normed = oracle.rms_norm(x, norm_weight, config.norm_eps)
    logits = np.empty((*normed.shape[:-1], output_weight.shape[0]))
    for start in range(0, output_weight.shape[0], _ORACLE_VOCAB_BLOCK):
        rows = np.asarray(output_weight[start:start + _ORACLE_VOCAB_BLOCK], np.float64)
        logits[..., start:start + rows.shape[0]] = normed @ rows.T
    return logits


# ---- memory ------------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process, so a measurement covers one run only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM: the most memory this process has held resident since start or `reset_peak_rss`, memory-mapped
    checkpoint pages included."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


# ---- the runner -------------------------------------------------------------------------------------------


# A part's reference modules and placed arrays are collected before the next part is read, where a part is large:
# a collection with JAX, torch and transformers loaded is slow enough that collecting after every tiny part
# dominated the tiny-width tests (docs/results.md#real-checkpoints-at-8b-widths).
COLLECT_ABOVE_BYTES = 64 * 2**20


def _block_bytes(config: LlamaConfig) -> int:
    """A block's weights in float32 (the widest copy any side holds): 832 MiB at 8B widths, 0.7 MiB tiny."""
    shapes = meta_weight_shapes(config)
    return 4 * sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("layers.0."))


def run_layerwise(config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh: str, dtype: str, tokens,
                  references: Sequence[str] = ("meta", "hf"), start_pos: int = 0) -> LayerwiseRun:
    """Run the embedding, every block and the head of `weights` (Meta layout; a checkpoint's lazy weights or a
    dict) part by part on the JAX model over `mesh`, on each reference and on the float64 oracle.

    Blocks see a fresh sequence at positions start_pos.. (no earlier context), as reference/meta.py's
    `meta_block` reads `start_pos`. A checkpoint the mesh cannot split fails before any weight is read, naming
    its config file.
    """
    source = getattr(weights, "config_path", None)
    if source is not None:
        check_mesh(config, parse_mesh(mesh)[1], source)
    model = TPLlama(config, make_mesh(mesh), dtype)
    tokens = np.asarray(tokens, np.int32)
    run = LayerwiseRun(actual={}, expected={name: {} for name in references}, oracle={})

    collect = _block_bytes(config) > COLLECT_ABOVE_BYTES

    def record(name, actual, expected, exact):
        run.actual[name] = actual
        for ref in references:
            run.expected[ref][name] = expected[ref]
        run.oracle[name] = exact
        if collect:
            gc.collect()  # reference modules and placed arrays of this part go before the next part is read

    table = _at(weights["tok_embeddings.weight"], dtype)
    carry = np.asarray(table[tokens], np.float64)
    record("embedding", jax_embedding(model, table, tokens),
           {ref: reference_embedding(table, tokens, dtype) for ref in references}, carry)
    del table

    for i in range(config.n_layers):
        layer = layer_weights(weights, i)
        x = _input(carry, dtype)
        actual = jax_block(model, layer, i, x, start_pos)
        expected = {ref: reference_block(ref, x, layer, config, dtype, start_pos) for ref in references}
        carry = oracle.oracle_block(x, {k: _at(v, dtype) for k, v in layer.items()}, config, start_pos)
        del layer
        record(f"layers.{i}.block_out", actual, expected, carry)

    norm_weight, output_weight = _at(weights["norm.weight"], dtype), _at(weights["output.weight"], dtype)
    x = _input(carry, dtype)
    record("logits", jax_head(model, norm_weight, output_weight, x),
           {ref: reference_head(ref, x, norm_weight, output_weight, config, dtype) for ref in references},
           oracle_head(x, norm_weight, output_weight, config))
    return run
