"""penzai 0.2.5's Llama (`penzai.models.transformer.variants.llama`), converted from transformers' PyTorch
`LlamaForCausalLM`, behind the adapter protocol (adapters/protocol.py). Two factories, because penzai's documented
converter refuses every Llama 3 model under transformers 5 (`PenzaiLlama`: the suite records the refusal on every
check), and users get past it with the unchecked one (`PenzaiLlamaUnchecked`). Sharded by penzai's own named axes.
No `attention` component and no decode `offset`: penzai's cache and positions cannot express them. Details:
docs/adapter-internals.md#penzai.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz
from penzai.models.transformer import model_parts, sampling_mode
from penzai.models.transformer.variants import llama, llamalike_common
from penzai.toolshed import sharding_util

from adapters.hf_torch import from_pretrained, from_suite_config
from llama_spec.config import LlamaConfig
from llama_spec.convert import halves_to_interleaved_last_axis, interleaved_to_halves_last_axis

DATA, MODEL = "data", "model"
PAD = -1  # the caching model's pad id: no real token (penzai treats every token equal to it as padding)


def checked_conversion(hf_model):
    """penzai's documented converter (raises its own ValueError on what it does not handle)."""
    return llama.llama_from_huggingface_model(hf_model)


def unchecked_conversion(hf_model):
    """penzai's llama-like converter without the attribute check, the HF config given back `rope_theta`."""
    config = hf_model.config
    if getattr(config, "rope_theta", None) is None:
        config.rope_theta = (config.rope_parameters or {})["rope_theta"]
    return llamalike_common.llamalike_from_huggingface_model(hf_model)


def axis_to_mesh(metadata: model_parts.TransformerMetadata, mesh) -> dict[str, str]:
    """penzai's named axes -> the mesh axis they are split on (docs/adapter-internals.md#penzai); an axis the mesh
    does not divide is left out (replicated)."""
    m = mesh.shape[MODEL]
    heads = metadata.common_head_axes | metadata.query_only_head_axes
    sizes = {"vocabulary": metadata.vocab_size, "neurons": metadata.mlp_hidden_dim}
    for name in ("heads", "head_groups", "query_heads"):
        if name in heads and heads[name] % m == 0:
            sizes[name] = heads[name]
            break
    return {name: MODEL for name, size in sizes.items() if size % m == 0}


class PenzaiLlamaAdapter:
    """A converted penzai TransformerLM, its parameters placed on the mesh by penzai's sharding utility."""

    def __init__(self, lm: model_parts.TransformerLM, mesh, dtype: str, source: str):
        self.mesh, self.dtype, self.source = mesh, dtype, source
        self.metadata = lm.metadata
        self.unbound, params = pz.unbind_params(lm)
        values = [p.freeze() for p in params]
        self.axis_map = axis_to_mesh(lm.metadata, mesh)
        self.params = sharding_util.name_to_name_device_put(values, mesh, self.axis_map)
        self._programs: dict[Any, Any] = {}  # jax.jit-wrapped functions (.lower for compiled_forward)
        self._caching: dict[tuple[int, int], Any] = {}  # (batch, length) -> the caching model without its state

    def parameters(self) -> dict[str, jax.Array]:
        """penzai's own labels ('transformer/block_0/attention/query.weights', ...) -> placed arrays (penzai's
        named-axis shapes, e.g. query (head_groups, query_heads, projection, embedding))."""
        return {p.label: p.value.data_array for p in self.params}

    def _tokens(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        spec = P(DATA, None) if tokens.shape[0] % self.mesh.shape[DATA] == 0 else P()
        return jax.device_put(jnp.asarray(tokens), NamedSharding(self.mesh, spec))

    def _replicated(self, x):
        return jax.device_put(jnp.asarray(np.asarray(x), self.dtype), NamedSharding(self.mesh, P()))

    def _jit(self, key, fn) -> Any:
        """jax.jit of fn(model, *args) on the placed parameters, the model bound inside the trace."""
        if key not in self._programs:
            unbound = self.unbound
            self._programs[key] = jax.jit(lambda params, *args: fn(pz.bind_variables(unbound, params), *args))
        return self._programs[key]

    # ---- forward: the body's sublayers one by one, each block opened at its two residual branches -------------

    def _forward_fn(self, capture: bool):
        def forward(model, tokens, start_pos):
            batch, seq = tokens.shape
            positions = _positions(start_pos, batch, seq)
            x = pz.nx.wrap(tokens).tag("batch", "seq")
            taps: dict = {}
            for sublayer in model.body.sublayers:
                if isinstance(sublayer, model_parts.TransformerBlock) and capture:
                    x = _block_with_taps(sublayer, x, positions, taps, f"layers.{_count_blocks(taps)}.")
                    continue
                x = sublayer(x, token_positions=positions)
                if isinstance(sublayer, pz.nn.EmbeddingLookup):
                    taps["embedding"] = x
                elif isinstance(sublayer, pz.nn.RMSLayerNorm):
                    taps["final_norm"] = x
            logits = x.untag("batch", "seq", "vocabulary").unwrap()
            if not capture:
                return logits
            return logits, {name: _heads_out(v) if name.endswith(("q_rope", "k_rope")) else _positional(v)
                            for name, v in taps.items()}

        return forward

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        """A fresh sequence at token_positions start_pos.. (penzai's causal mask reads the same positions)."""
        fn = self._jit(("forward", bool(capture)), self._forward_fn(bool(capture)))
        return fn(self.params, self._tokens(tokens), jnp.int32(start_pos))

    def compiled_forward(self, batch: int, seq: int):
        tokens = self._tokens(np.zeros((batch, seq)))
        spec = jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=tokens.sharding)
        return self._jit(("forward", False), self._forward_fn(False)).lower(self.params, spec, jnp.int32(0)).compile()

    # ---- decode: penzai's KVCachingTransformerLM, its state carried between steps as frozen values ----------------

    def init_cache(self, batch: int, length: int):
        """KVCachingTransformerLM.from_uncached(model, cache_len=length, batch_axes={'batch': batch}, pad_id=-1) (no
        token id is padding unless the step marks it), its state variables frozen and placed on the mesh."""
        lm = pz.bind_variables(self.unbound, self.params)
        caching = sampling_mode.KVCachingTransformerLM.from_uncached(lm, cache_len=length, batch_axes={"batch": batch},
                                                                      pad_id=PAD)
        unbound, state = pz.unbind_state_vars(caching)
        self._caching[(batch, length)] = unbound
        axes = dict(self.axis_map)
        if batch % self.mesh.shape[DATA] == 0:
            axes["batch"] = DATA
        return [self._placed_state(v.freeze(), axes) for v in state]

    def _placed_state(self, value, axes):
        """A frozen state value on the mesh: its NamedArrays by their axis names, anything else replicated."""
        def place(leaf):
            if isinstance(leaf, pz.nx.NamedArray):
                return sharding_util.name_to_name_device_put(leaf, self.mesh, axes)
            return jax.device_put(jnp.asarray(leaf), NamedSharding(self.mesh, P()))

        placed = jax.tree_util.tree_map(place, value.value, is_leaf=lambda x: isinstance(x, pz.nx.NamedArray))
        return dataclasses.replace(value, value=placed)

    def step(self, tokens, start_pos: int, cache, *, pad=None):
        """The caching model on tokens written at slots start_pos.. (its cache_end_index set to start_pos). penzai
        derives positions from padding tokens: slots before pad[i] get the pad id, so row i's positions are
        slot - pad[i] and its pad slots are masked, as penzai's own sampler pads. No `offset`: penzai's positions
        always count from the first non-padding token."""
        tokens = np.asarray(tokens, np.int32).copy()
        batch, seq = tokens.shape
        if pad is not None:
            slots = start_pos + np.arange(seq)
            tokens[slots[None, :] < np.asarray(pad)[:, None]] = PAD
        length = next(v.value for v in cache if v.label.endswith("previous_tokens")).named_shape["seq"]
        unbound = self._caching[(batch, length)]

        def run(unbound, state, tokens, start):
            variables = [v.unfreeze_as_copy() for v in state]
            for v in variables:
                if v.label.endswith("cache_end_index"):
                    v.value = start
            model = pz.bind_variables(unbound, variables)
            logits = model(pz.nx.wrap(tokens).tag("batch", "seq"))
            return logits.untag("batch", "seq", "vocabulary").unwrap(), [v.freeze() for v in variables]

        if "step" not in self._programs:
            self._programs["step"] = jax.jit(run)
        return self._programs["step"](unbound, cache, self._tokens(tokens), jnp.int32(start_pos))

    # ---- components: penzai's own sublayers ------------------------------------------------------------------

    def rms_norm(self, x, layer: int, which: str):
        def norm(model, x):
            if which == "norm":
                return _positional(_sublayers(model)["final_norm"](_hidden(x)))
            branch = {"attention_norm": 0, "ffn_norm": 1}[which]
            return _positional(_blocks(model)[layer].sublayers[branch].delta.sublayers[0](_hidden(x)))

        return self._jit(("rms_norm", layer, which), norm)(self.params, self._replicated(x))

    def feed_forward(self, x, layer: int):
        def mlp(model, x):
            return _positional(_blocks(model)[layer].sublayers[1].delta.sublayers[1](_hidden(x)))

        return self._jit(("mlp", layer), mlp)(self.params, self._replicated(x))

    def block(self, x, layer: int, start_pos: int):
        def block(model, x, start):
            h = _hidden(x)
            return _positional(_blocks(model)[layer](h, token_positions=_positions(start, *x.shape[:2])))

        return self._jit(("block", layer), block)(self.params, self._replicated(x), jnp.int32(start_pos))

    def head(self, h):
        def head(model, h):
            parts = _sublayers(model)
            return parts["lm_head"](parts["final_norm"](_hidden(h))).untag("batch", "seq", "vocabulary").unwrap()

        return self._jit("head", head)(self.params, self._replicated(h))

    def rope(self, q, k, start_pos: int):
        """The ApplyRoPE layers of layer 0's query and key, on Meta-layout q/k converted to penzai's half layout and
        its head axes (and back)."""
        metadata = self.metadata

        def rope(model, q, k, start):
            attention = _blocks(model)[0].sublayers[0].delta.sublayers[1]
            positions = _positions(start, *q.shape[:2])
            q_named = _heads_in(interleaved_to_halves_last_axis(q),
                                {**metadata.common_head_axes, **metadata.query_only_head_axes})
            k_named = _heads_in(interleaved_to_halves_last_axis(k), metadata.common_head_axes)
            q_out = attention.input_to_query.sublayers[1](q_named, token_positions=positions)
            k_out = attention.input_to_key.sublayers[1](k_named, token_positions=positions)
            return _heads_out(q_out), _heads_out(k_out)

        return self._jit("rope", rope)(self.params, self._replicated(q), self._replicated(k), jnp.int32(start_pos))


_HEAD_AXES = ("heads", "head_groups", "query_heads")


def _positions(start, batch: int, seq: int):
    return pz.nx.wrap(jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))).tag("batch", "seq")


def _hidden(x):
    return pz.nx.wrap(x).tag("batch", "seq", "embedding")


def _positional(v):
    return v.untag("batch", "seq", "embedding").unwrap()


def _sublayers(model) -> dict:
    """The body's embedding, final norm and lm_head (EmbeddingLookup, RMSLayerNorm, Linear, in that order)."""
    body = model.body.sublayers
    return {"embedding": body[0], "final_norm": body[-2], "lm_head": body[-1]}


def _blocks(model) -> list:
    return [s for s in model.body.sublayers if isinstance(s, model_parts.TransformerBlock)]


def _count_blocks(taps) -> int:
    return sum(name.endswith(".block_out") for name in taps)


def _heads_in(x, head_axes: Mapping[str, int]):
    """(batch, seq, heads, hd) -> a NamedArray with penzai's head axes (kv group major, as the converter reshapes
    HF's q_proj rows) and 'projection'."""
    names = [n for n in _HEAD_AXES if n in head_axes]
    x = jnp.reshape(x, (*x.shape[:2], *(head_axes[n] for n in names), x.shape[-1]))
    return pz.nx.wrap(x).tag("batch", "seq", *names, "projection")


def _heads_out(v):
    """A NamedArray with head axes and 'projection' -> (batch, seq, heads, hd) in Meta's interleaved layout."""
    names = [n for n in _HEAD_AXES if n in v.named_shape]
    x = v.untag("batch", "seq", *names, "projection").unwrap()
    return halves_to_interleaved_last_axis(jnp.reshape(x, (*x.shape[:2], -1, x.shape[-1])))


def _block_with_taps(block, x, positions, taps: dict, prefix: str):
    """A TransformerBlock run as its two Residual(Sequential[RMSLayerNorm, ...]) branches, recording the suite's
    per-layer tensors; q and k after RoPE recomputed from the attention's own query/key paths (XLA shares them)."""
    attention_branch, ffn_branch = (residual.delta.sublayers for residual in block.sublayers)
    norm, attention = attention_branch
    h = norm(x)
    taps[prefix + "attention_norm"] = h
    taps[prefix + "q_rope"] = attention.input_to_query.sublayers[1](attention.input_to_query.sublayers[0](h),
                                                                    token_positions=positions)
    taps[prefix + "k_rope"] = attention.input_to_key.sublayers[1](attention.input_to_key.sublayers[0](h),
                                                                  token_positions=positions)
    out = attention(h, token_positions=positions)
    taps[prefix + "attention_out"] = out
    x = x + out
    h = ffn_branch[0](x)
    taps[prefix + "ffn_norm"] = h
    out = ffn_branch[1](h)
    taps[prefix + "mlp_out"] = out
    x = x + out
    taps[prefix + "block_out"] = x
    return x


# ---- the factories ----------------------------------------------------------------------------------------

class PenzaiLlama:
    """The documented path: LlamaForCausalLM (from the suite's config and weights) -> llama_from_huggingface_model."""

    package = "penzai"  # the distribution under test, for the JSON environment and the report title
    convert = staticmethod(checked_conversion)

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> PenzaiLlamaAdapter:
        return PenzaiLlamaAdapter(cls.convert(from_suite_config(config, weights, dtype)), mesh, dtype, "direct")

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> PenzaiLlamaAdapter:
        """transformers' from_pretrained(DIR), then penzai's converter: Hugging Face directories only."""
        if fmt != "hf":
            raise NotImplementedError(f"penzai converts a transformers LlamaForCausalLM, which loads Hugging Face "
                                      f"directories (config.json + safetensors), not {fmt!r} checkpoints")
        return PenzaiLlamaAdapter(cls.convert(from_pretrained(path, dtype)), mesh, dtype, f"hf:{path}")


class PenzaiLlamaUnchecked(PenzaiLlama):
    """The converter without penzai's attribute check (docs/adapter-internals.md#penzai): Llama 3.1's RoPE scaling
    is not applied."""

    convert = staticmethod(unchecked_conversion)

