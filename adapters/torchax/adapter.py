"""transformers' PyTorch `LlamaForCausalLM` run as JAX through torchax 0.0.13 (`torchax.extract_jax`), behind the
adapter protocol (adapters/protocol.py), as torchax's users run HF models: the state placed on the suite's mesh by
Megatron-style NamedShardings, the function jax.jit-ed, so XLA's partitioner decides the communication. No Meta
checkpoint (transformers loads HF directories only). Placement table, intermediates and decode:
docs/adapter-internals.md#torchax.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers.masking_utils import create_causal_mask
from transformers.models.llama import modeling_llama

from adapters.hf_torch import from_pretrained, from_suite_config
from adapters.torchax.compat import import_torchax
from fixtures.checkpoints import write_hf_checkpoint
from llama_spec.config import LlamaConfig
from llama_spec.convert import halves_to_interleaved_last_axis, interleaved_to_halves_last_axis

torchax = import_torchax()
from torchax.interop import JittableModule  # noqa: E402

DATA, MODEL = "data", "model"
_PER_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
              "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
              "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
              "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight"}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_COLUMN = ("embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
           "up_proj.weight", "lm_head.weight")
_ROW = ("o_proj.weight", "down_proj.weight")


def meta_name(hf_name: str) -> str | None:
    """The Meta name of an HF LlamaForCausalLM parameter, None for buffers (rotary inv_freq)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _PER_LAYER:
        return f"layers.{parts[2]}.{_PER_LAYER[parts[3]]}"
    return None


def partition_spec(hf_name: str, shape: Sequence[int], hf_config, model_size: int) -> P:
    """The Megatron placement of one HF parameter (docs/adapter-internals.md#torchax); replicated where the axis
    does not divide."""
    if hf_name.endswith(("k_proj.weight", "v_proj.weight")) and hf_config.num_key_value_heads % model_size:
        return P()
    if hf_name.endswith(_COLUMN) and shape[0] % model_size == 0:
        return P(MODEL, None)
    if hf_name.endswith(_ROW) and shape[1] % model_size == 0:
        return P(None, MODEL)
    return P()


def _to_meta_heads(t):
    """(batch, heads, seq, hd) rotate-half -> (batch, seq, heads, hd) interleaved."""
    return halves_to_interleaved_last_axis(jnp.swapaxes(t, 1, 2))


def _to_hf_heads(x):
    return jnp.swapaxes(interleaved_to_halves_last_axis(x), 1, 2)


class _Capture:
    """Forward hooks on HF's modules and the RoPE function wrapped, recording torchax tensors while a program is
    traced (the names of reference/layers.py)."""

    def __init__(self, model):
        inner = model.model
        self.outputs = {"embedding": inner.embed_tokens, "final_norm": inner.norm}
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            self.outputs.update({p + "attention_norm": layer.input_layernorm,
                                 p + "attention_out": layer.self_attn.o_proj,
                                 p + "ffn_norm": layer.post_attention_layernorm, p + "mlp_out": layer.mlp.down_proj,
                                 p + "block_out": layer})
        self.attentions = [layer.self_attn for layer in inner.layers]

    def __enter__(self) -> dict:
        store: dict = {}
        current: list = [None]
        self.handles = []
        for name, module in self.outputs.items():
            self.handles.append(module.register_forward_hook(
                lambda module, args, output, name=name: store.__setitem__(name, output)))
        for i, attention in enumerate(self.attentions):
            self.handles.append(attention.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
            self.handles.append(attention.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        self.original = original = modeling_llama.apply_rotary_pos_emb

        def recording_rope(q, k, *args, **kwargs):
            q_out, k_out = original(q, k, *args, **kwargs)
            if current[0] is not None:
                store[f"layers.{current[0]}.q_rope"], store[f"layers.{current[0]}.k_rope"] = q_out, k_out
            return q_out, k_out

        modeling_llama.apply_rotary_pos_emb = recording_rope
        return store

    def __exit__(self, *exc) -> None:
        modeling_llama.apply_rotary_pos_emb = self.original
        for handle in self.handles:
            handle.remove()


class TorchaxLlamaAdapter:
    """A transformers LlamaForCausalLM (PyTorch) run as jitted JAX through torchax, its state placed on the mesh."""

    def __init__(self, model, mesh, dtype: str, source: str):
        self.model = model.eval()
        self.hf_config = model.config
        self.mesh, self.dtype, self.source = mesh, dtype, source
        self.compute_dtype = jnp.dtype(dtype)
        self.env = torchax.default_env()
        states, self._forward_fn = torchax.extract_jax(self.model, self.env)
        self._module = JittableModule(self.model)
        self.states = self._place(states)
        self._capture = _Capture(self.model)
        self._programs: dict[Any, Any] = {}  # jax.jit-wrapped functions (.lower for compiled_forward)

    # ---- placement ----------------------------------------------------------------------------------------

    def _place(self, states: Mapping[str, Any]) -> dict[str, jax.Array]:
        m = self.mesh.shape[MODEL]
        return {name: jax.device_put(value, NamedSharding(self.mesh, partition_spec(name, value.shape, self.hf_config,
                                                                                    m)))
                for name, value in states.items()}

    def parameters(self) -> dict[str, jax.Array]:
        """Meta names -> the placed HF tensors, in HF's orientation ((out, in); q/k rows in rotate-half order)."""
        named = {name: meta_name(name) for name in self.states}
        return {meta: self.states[name] for name, meta in named.items() if meta is not None}

    def _replicated(self, x, dtype=None):
        return jax.device_put(jnp.asarray(np.asarray(x), dtype or self.compute_dtype), NamedSharding(self.mesh, P()))

    def _tokens(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        spec = P(DATA, None) if tokens.shape[0] % self.mesh.shape[DATA] == 0 else P()
        return jax.device_put(jnp.asarray(tokens), NamedSharding(self.mesh, spec))

    def _positions(self, start_pos: int, seq: int):
        return self._replicated(start_pos + np.arange(seq)[None, :], jnp.int32)

    # ---- the forward: extract_jax's function, jitted ---------------------------------------------------------

    def _forward_program(self, capture: bool) -> Any:
        key = ("forward", capture)
        if key not in self._programs:
            run = self._forward_fn

            def forward(states, tokens, positions):
                kwargs = dict(input_ids=tokens, position_ids=positions, use_cache=False)
                if not capture:
                    return run(states, (), kwargs).logits
                with self._capture as store:
                    logits = run(states, (), kwargs).logits
                taps = self.env.t2j_iso(store)
                return logits, {name: _to_meta_heads(v) if name.endswith(("q_rope", "k_rope")) else v
                                for name, v in taps.items()}

            self._programs[key] = jax.jit(forward)
        return self._programs[key]

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        """A fresh sequence at position_ids start_pos + arange(seq), no cache (LlamaForCausalLM.forward)."""
        tokens = np.asarray(tokens)
        return self._forward_program(bool(capture))(self.states, self._tokens(tokens),
                                                    self._positions(int(start_pos), tokens.shape[1]))

    def compiled_forward(self, batch: int, seq: int):
        tokens = self._tokens(np.zeros((batch, seq)))
        spec = jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=tokens.sharding)
        return self._forward_program(False).lower(self.states, spec, self._positions(0, seq)).compile()

    # ---- decode: transformers' StaticCache, carried between steps as arrays -------------------------------------

    def init_cache(self, batch: int, length: int):
        """An empty StaticCache as arrays: per layer (keys, values) of (batch, kv heads, length, head_dim), zeros at
        the run dtype (StaticLayer.lazy_initialization's shape), batch on 'data' when it divides."""
        c = self.hf_config
        shape = (batch, c.num_key_value_heads, length, c.hidden_size // c.num_attention_heads)
        spec = P(DATA) if batch % self.mesh.shape[DATA] == 0 else P()
        zeros = jax.device_put(jnp.zeros(shape, self.compute_dtype), NamedSharding(self.mesh, spec))
        return tuple((zeros, zeros) for _ in range(c.num_hidden_layers))

    def _step_program(self, length: int) -> Callable:
        key = ("step", length)
        if key not in self._programs:
            config = self.hf_config

            def step(model, tokens, positions, valid, cache, start):
                static = transformers.StaticCache(config=config, max_cache_len=length)
                for layer, (keys, values) in zip(static.layers, cache):
                    # what StaticLayer.lazy_initialization sets, from the carried arrays instead of zeros
                    layer.keys, layer.values, layer.device = keys, values, keys.device
                    layer.batch_size, layer.num_heads = keys.shape[:2]
                    layer.k_head_dim = layer.v_head_dim = keys.shape[-1]
                    layer.cumulative_length = start.clone()
                    layer.is_initialized = True
                logits = model(input_ids=tokens, position_ids=positions, attention_mask=valid, cache=static,
                               use_cache=True).logits
                return logits, tuple((layer.keys, layer.values) for layer in static.layers)

            self._programs[key] = self._program(key, step)
        return self._programs[key]

    def step(self, tokens, start_pos: int, cache, *, pad=None, offset: int = 0):
        """LlamaForCausalLM.forward with a StaticCache whose write index is start_pos (slots start_pos..), RoPE at
        position_ids offset + slot - pad[i], and the 2-D attention_mask of HF's padded batches (slots before pad[i]
        are 0), as `generate` passes them."""
        tokens = np.asarray(tokens)
        batch, seq = tokens.shape
        length = cache[0][0].shape[2]
        pad = np.zeros(batch, np.int64) if pad is None else np.asarray(pad, np.int64)
        slots = start_pos + np.arange(seq)
        positions = self._replicated(offset + slots[None, :] - pad[:, None], jnp.int32)
        valid = self._replicated(np.arange(length)[None, :] >= pad[:, None], jnp.int32)
        return self._step_program(length)(self.states, self._tokens(tokens), positions, valid, cache,
                                          self._replicated(start_pos, jnp.int32))

    # ---- components: HF's own submodules, run the same way -------------------------------------------------

    def _program(self, key, torch_fn: Callable) -> Callable:
        """jax.jit of torch_fn(model, *tensors) on the placed state, as extract_jax runs `forward`."""
        if key not in self._programs:
            module, env = self._module, self.env

            def program(states, *args):
                params = {k: states[k] for k in module.params}
                buffers = {k: states[k] for k in module.buffers}
                params, buffers, args = env.j2t_iso((params, buffers, args))
                with env:
                    out = module.functional_call(torch_fn, params, buffers, *args)
                return env.t2j_iso(out)

            self._programs[key] = jax.jit(program)
        return self._programs[key]

    def _layer(self, model, layer: int):
        return model.model.layers[layer]

    def rms_norm(self, x, layer: int, which: str):
        attr = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

        def norm(model, x):
            return model.model.norm(x) if which == "norm" else getattr(self._layer(model, layer), attr[which])(x)

        return self._program(("rms_norm", layer, which), norm)(self.states, self._replicated(x))

    def rope(self, q, k, start_pos: int):
        """LlamaRotaryEmbedding (the model's own, float32 inv_freq) + apply_rotary_pos_emb at start_pos.."""
        def rope(model, q, k, positions):
            cos, sin = model.model.rotary_emb(q, positions)
            return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)

        q, k = self._replicated(q), self._replicated(k)
        q_out, k_out = self._program("rope", rope)(self.states, _to_hf_heads(q), _to_hf_heads(k),
                                                   self._positions(int(start_pos), q.shape[1]))
        return _to_meta_heads(q_out), _to_meta_heads(k_out)

    def _chunked(self, key, layer: int, chunks, start_pos: int, attention_only: bool):
        """Consecutive chunks through one LlamaAttention / LlamaDecoderLayer sharing a DynamicCache (one chunk: no
        cache), with the mask LlamaModel builds (create_causal_mask), all in one traced program."""
        config = self.hf_config
        sizes = [np.shape(c)[1] for c in chunks]

        def run(model, xs, all_positions):
            module = self._layer(model, layer)
            module = module.self_attn if attention_only else module
            cache = transformers.DynamicCache(config=config) if len(xs) > 1 else None
            outputs = []
            for h, positions in zip(xs, all_positions):
                # the cache's length is read from this layer's slot (LlamaModel fills every layer's, this only one)
                mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, cache=cache,
                                          position_ids=positions, layer_idx=layer)
                embeddings = model.model.rotary_emb(h, positions)
                if attention_only:
                    out, _ = module(h, position_embeddings=embeddings, attention_mask=mask, cache=cache)
                else:
                    out = module(h, attention_mask=mask, position_ids=positions, cache=cache,
                                 use_cache=cache is not None, position_embeddings=embeddings)
                outputs.append(out)
            return outputs

        starts = start_pos + np.cumsum([0, *sizes[:-1]])
        program = self._program((key, layer, start_pos, tuple(np.shape(c) for c in chunks)), run)
        return program(self.states, [self._replicated(c) for c in chunks],
                       [self._positions(int(s), size) for s, size in zip(starts, sizes)])

    def attention(self, chunks, layer: int, start_pos: int):
        return self._chunked("attention", layer, list(chunks), int(start_pos), attention_only=True)

    def block(self, x, layer: int, start_pos: int):
        return self._chunked("block", layer, [x], int(start_pos), attention_only=False)[0]

    def feed_forward(self, x, layer: int):
        return self._program(("mlp", layer), lambda model, x: self._layer(model, layer).mlp(x))(
            self.states, self._replicated(x))

    def head(self, h):
        return self._program("head", lambda model, h: model.lm_head(model.model.norm(h)))(
            self.states, self._replicated(h))


# ---- the factories ----------------------------------------------------------------------------------------

class TorchaxLlama:
    """Built directly: LlamaForCausalLM(LlamaConfig(**config.to_hf())) with the suite's weights, through torchax."""

    package = "torchax"  # the distribution under test, for the JSON environment and the report title

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> TorchaxLlamaAdapter:
        return TorchaxLlamaAdapter(from_suite_config(config, weights, dtype), mesh, dtype, "direct")

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> TorchaxLlamaAdapter:
        """LlamaForCausalLM.from_pretrained(DIR): Hugging Face directories only."""
        if fmt != "hf":
            raise NotImplementedError(f"transformers {transformers.__version__} loads Hugging Face directories "
                                      f"(config.json + safetensors), not {fmt!r} checkpoints (Meta's params.json + "
                                      "consolidated.NN.pth need its separate conversion script)")
        return TorchaxLlamaAdapter(from_pretrained(path, dtype), mesh, dtype, f"hf:{path}")


class TorchaxLlamaHF(TorchaxLlama):
    """Loaded by from_pretrained: build() writes the suite's HF checkpoint (float32 safetensors, config.json in
    transformers 5's `rope_parameters` style) into a temporary directory and loads it."""

    style = "rope_parameters"

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> TorchaxLlamaAdapter:
        directory = Path(tempfile.mkdtemp(prefix=f"torchax_{cls.style}_"))
        try:
            write_hf_checkpoint(directory, config, weights, dtype="float32", style=cls.style)
            return TorchaxLlamaAdapter(from_pretrained(directory, dtype), mesh, dtype, f"hf:{cls.style}")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class TorchaxLlamaHFHub(TorchaxLlamaHF):
    """As TorchaxLlamaHF, config.json in the hub's style (top-level rope_theta + rope_scaling, Llama 3.1's file)."""

    style = "hub"
