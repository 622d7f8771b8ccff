"""keras-hub's Llama 3 (`Llama3Backbone` + `Llama3CausalLM`, JAX backend) behind the adapter protocol
(adapters/protocol.py), sharded with Keras' own distribution API and keras-hub's own Llama layout map (not
Megatron's: XLA's partitioner decides the communication, and the communication check reads it). Decode without `pad`
or `offset`, and no Meta checkpoint: keras-hub's cache API and loaders cannot express them. How it is built (layout
table, jit of the stateless call, intermediates): docs/adapter-internals.md#keras-hub.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from adapters.hf_checkpoint import tied, write_hf
from adapters.keras_hub import checkpoint as ckpt
from llama_spec.config import LlamaConfig
from llama_spec.convert import halves_to_interleaved_last_axis, interleaved_to_halves_last_axis

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    raise ImportError(f"adapters.keras_hub needs KERAS_BACKEND=jax (set: {os.environ['KERAS_BACKEND']!r})")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

if keras.config.backend() != "jax":
    raise ImportError(f"adapters.keras_hub needs the JAX backend, but keras was imported with "
                      f"{keras.config.backend()!r}; set KERAS_BACKEND=jax before anything imports keras")

from keras_hub.src.layers.modeling.transformer_layer_utils import compute_causal_mask  # noqa: E402

from llama_spec import config as spec
from llama_spec.layout import meta_weight_shapes

DATA, MODEL = "data", "model"

# ---- capturing sublayer outputs ---------------------------------------------------------------------------
# While a forward is traced with capture on, each wrapped sublayer writes its output under the suite's name.

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("keras_hub_capture", default=None)
_OVERRIDE: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar("keras_hub_override", default=None)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _wrap(layer, record: Callable[[dict, Any, tuple, dict], None]) -> None:
    """Replace `layer.call` by one that runs the original (or an override, for the component checks) and lets
    `record` store its output while a capture is active."""
    original = layer.call

    def call(*args, **kwargs):
        override = (_OVERRIDE.get() or {}).get(id(layer))
        output = override(*args, **kwargs) if override is not None else original(*args, **kwargs)
        store = _STORE.get()
        if store is not None:
            record(store, output, args, kwargs)
        return output

    object.__setattr__(layer, "call", call)  # bypass Keras' attribute tracking


def _install_taps(backbone) -> None:
    def put(name):
        return lambda store, out, args, kwargs: store.__setitem__(name, _first(out))

    def embedding(store, out, args, kwargs):
        if not kwargs.get("reverse", args[1] if len(args) > 1 else False):
            store["embedding"] = out

    _wrap(backbone.token_embedding, embedding)
    for i, decoder in enumerate(backbone.transformer_layers):
        p = f"layers.{i}."
        attention = decoder._self_attention_layer
        _wrap(decoder._self_attention_layernorm, put(p + "attention_norm"))
        _wrap(decoder._feedforward_layernorm, put(p + "ffn_norm"))
        _wrap(decoder._feedforward_output_dense, put(p + "mlp_out"))
        _wrap(decoder, put(p + "block_out"))

        def attention_out(store, out, args, kwargs, p=p):
            store[p + "attention_out"] = _first(out)
            store.pop(p + "rope_calls", None)

        def rope(store, out, args, kwargs, p=p):
            # LlamaAttention.call applies RoPE to the query first, then to the key (its _compute_key_value).
            calls = store.setdefault(p + "rope_calls", [])
            calls.append(out)
            store[p + ("q_rope" if len(calls) == 1 else "k_rope")] = halves_to_interleaved_last_axis(out)

        _wrap(attention, attention_out)
        _wrap(attention.rotary_embedding_layer, rope)
    _wrap(backbone.layer_norm, put("final_norm"))


@contextlib.contextmanager
def _capturing(store: dict | None, overrides: Mapping | None = None):
    token = _STORE.set(store)
    token2 = _OVERRIDE.set(overrides)
    try:
        yield store
    finally:
        _STORE.reset(token)
        _OVERRIDE.reset(token2)


# ---- the adapter ------------------------------------------------------------------------------------------

def keras_distribution(mesh):
    """keras-hub's own model-parallel layout on exactly the suite's mesh: (distribution, layout_map)."""
    device_mesh = keras.distribution.DeviceMesh(shape=tuple(mesh.devices.shape), axis_names=(DATA, MODEL),
                                                devices=mesh.devices)
    layout_map = keras_hub.models.Llama3Backbone.get_layout_map(device_mesh, model_parallel_dim_name=MODEL,
                                                                data_parallel_dim_name=DATA)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=DATA), layout_map


class KerasHubLlamaAdapter:
    """A built, placed keras-hub Llama3CausalLM; every capability keras-hub's API allows
    (docs/adapter-internals.md#keras-hub)."""

    def __init__(self, causal_lm, mesh, dtype: str, source: str):
        self.causal_lm, self.backbone = causal_lm, causal_lm.backbone
        self.mesh, self.dtype, self.source = mesh, dtype, source
        self.compute_dtype = jnp.dtype(dtype)
        self._variables = list(causal_lm.variables)
        self._check_placement()
        _install_taps(self.backbone)
        self._jitted: dict[Any, Callable] = {}
        self.config = _config_of(self.backbone)

    # ---- building ---------------------------------------------------------------------------------------

    @classmethod
    def from_backbone_builder(cls, build_backbone: Callable[[], Any], mesh, dtype: str, source: str):
        distribution, _ = keras_distribution(mesh)
        with distribution.scope():
            backbone = build_backbone()
            causal_lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)
        return cls(causal_lm, mesh, dtype, source)

    def _check_placement(self) -> None:
        """Every variable must live on exactly the suite's mesh devices (not keras' default jax.devices())."""
        wanted = set(self.mesh.devices.flat)
        for variable in self._variables:
            held = set(variable.value.sharding.device_set)
            if held != wanted:
                raise RuntimeError(f"keras-hub variable {variable.path} is placed on {sorted(d.id for d in held)}, "
                                   f"not on the mesh devices {sorted(d.id for d in wanted)}")

    # ---- running keras-hub statelessly under jax.jit ----------------------------------------------------

    def _values(self):
        return [v.value for v in self._variables]

    def _pure(self, fn: Callable) -> Callable:
        variables = self._variables

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return pure

    def _jit(self, key, fn: Callable, static_argnums=()) -> Callable:
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._pure(fn), static_argnums=tuple(i + 1 for i in static_argnums))
        return self._jitted[key]

    def _replicated(self, x, dtype=None):
        x = np.asarray(x)
        return jax.device_put(jnp.asarray(x, dtype or self.compute_dtype), NamedSharding(self.mesh, P()))

    def _tokens(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        data = self.mesh.shape[DATA]
        spec = P(DATA, None) if tokens.shape[0] % data == 0 else P()
        return jax.device_put(jnp.asarray(tokens), NamedSharding(self.mesh, spec))

    # ---- forward ----------------------------------------------------------------------------------------

    def _forward_fn(self, capture: bool, start_pos: int):
        lm, backbone = self.causal_lm, self.backbone

        def fresh(tokens):
            """Llama3CausalLM's own call (the backbone's functional graph, then the reverse embedding)."""
            return lm({"token_ids": tokens, "padding_mask": jnp.ones_like(tokens)})

        def at_offset(tokens):
            """A fresh sequence at positions start_pos..: keras-hub's cached path (call_with_cache's layer loop),
            slots 0..start_pos-1 empty and hidden by the decoder's attention mask, RoPE at the cache index."""
            batch, seq = tokens.shape
            length = start_pos + seq
            mask = jnp.broadcast_to(jnp.arange(length)[None, None, :] >= start_pos, (batch, seq, length))
            x = backbone.token_embedding(tokens)
            for layer in backbone.transformer_layers:
                x, _ = layer(x, decoder_attention_mask=mask, self_attention_cache=self._empty_cache(batch, length),
                             self_attention_cache_update_index=start_pos)
            return backbone.token_embedding(backbone.layer_norm(x), reverse=True)

        run = fresh if start_pos == 0 else at_offset

        def forward(tokens):
            with _capturing({} if capture else None) as store:
                logits = run(tokens)
            if not capture:
                return logits
            return logits, {k: v for k, v in store.items() if not k.endswith("rope_calls")}

        return forward

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        fn = self._jit(("forward", bool(capture), int(start_pos)), self._forward_fn(bool(capture), int(start_pos)))
        return fn(self._values(), self._tokens(tokens))

    def compiled_forward(self, batch: int, seq: int):
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=self._tokens(np.zeros((batch, seq))).sharding)
        fn = self._jit(("forward", False, 0), self._forward_fn(False, 0))
        return fn.lower(self._values(), tokens).compile()

    def parameters(self) -> dict[str, Any]:
        """Meta names -> keras-hub's placed variables, in keras-hub's shapes (see adapters/keras_hub/checkpoint.py:
        q/k/v kernels (dim, heads, head_dim) with q/k rows in the half layout, wo (heads, head_dim, dim), the
        other kernels (in, out), output (dim, vocab))."""
        by_path = {v.path: v.value for v in self._variables}
        out = {}
        for name in meta_weight_shapes(self.config):
            path = ckpt.keras_path(name)
            if name == "output.weight" and tied(self.config):
                continue
            out[name] = by_path[path]
        return out

    # ---- decode: keras-hub's call_with_cache ------------------------------------------------------------

    def _empty_cache(self, batch: int, length: int):
        c = self.config
        return jnp.zeros((batch, 2, length, c.n_kv_heads, c.head_dim), self.compute_dtype)

    def init_cache(self, batch: int, length: int):
        """keras-hub's cache layout (Llama3CausalLM._build_cache): (batch, layers, 2, length, kv heads, head_dim)."""
        c = self.config
        cache = jnp.zeros((batch, c.n_layers, 2, length, c.n_kv_heads, c.head_dim), self.compute_dtype)
        spec = P(DATA) if batch % self.mesh.shape[DATA] == 0 else P()
        return jax.device_put(cache, NamedSharding(self.mesh, spec))

    def step(self, tokens, start_pos: int, cache):
        """Llama3CausalLM.call_with_cache(tokens, cache, start_pos) -> (logits, cache). No pad/offset: keras-hub's
        cache index is the RoPE position and the slot of the whole batch."""
        lm = self.causal_lm

        def step(tokens, cache, index):
            logits, _, cache = lm.call_with_cache(tokens, cache, index)
            return logits, cache

        fn = self._jit("step", step)
        return fn(self._values(), self._tokens(tokens), cache, jnp.int32(start_pos))

    # ---- components: keras-hub's own sublayers --------------------------------------------------------

    def _decoder(self, layer: int):
        return self.backbone.transformer_layers[layer]

    def rms_norm(self, x, layer: int, which: str):
        def norm(x):
            if which == "norm":
                return self.backbone.layer_norm(x)
            decoder = self._decoder(layer)
            return {"attention_norm": decoder._self_attention_layernorm,
                    "ffn_norm": decoder._feedforward_layernorm}[which](x)

        return self._jit(("rms_norm", layer, which), norm)(self._values(), self._replicated(x))

    def rope(self, q, k, start_pos: int):
        """The attention layer's LlamaRotaryEmbedding at start_index=start_pos, on Meta-layout q/k converted to
        keras-hub's half layout and back."""
        rotary = self._decoder(0)._self_attention_layer.rotary_embedding_layer

        def rope(q, k, start):
            return (halves_to_interleaved_last_axis(rotary(interleaved_to_halves_last_axis(q), start_index=start)),
                    halves_to_interleaved_last_axis(rotary(interleaved_to_halves_last_axis(k), start_index=start)))

        return self._jit("rope", rope)(self._values(), self._replicated(q), self._replicated(k), jnp.int32(start_pos))

    def attention(self, chunks, layer: int, start_pos: int):
        """LlamaAttention over consecutive chunks: one chunk from position 0 runs uncached under the causal mask,
        as in the forward; otherwise keras-hub's cache (slot = position, cache_update_index = position of the
        chunk's first token) with slots before start_pos hidden by the attention mask."""
        attention = self._decoder(layer)._self_attention_layer
        chunks = [np.asarray(c) for c in chunks]
        batch = chunks[0].shape[0]
        if len(chunks) == 1 and start_pos == 0:
            seq = chunks[0].shape[1]

            def uncached(x):
                return attention(hidden_states=x, attention_mask=compute_causal_mask(batch, seq, seq, 0))

            # the mask's shape is baked into the closure: one program per (batch, seq)
            return [self._jit(("attention", layer, batch, seq), uncached)(self._values(),
                                                                          self._replicated(chunks[0]))]
        length = start_pos + sum(c.shape[1] for c in chunks)

        def cached(x, cache, index):
            seq = x.shape[1]
            mask = jnp.logical_and(compute_causal_mask(batch, length, seq, index),
                                   jnp.arange(length)[None, None, :] >= start_pos)
            return attention(hidden_states=x, attention_mask=mask, cache=cache, cache_update_index=index)

        fn = self._jit(("attention_cached", layer, start_pos, length, batch), cached)
        cache, index, outs = self._empty_cache(batch, length), start_pos, []
        for chunk in chunks:
            out, cache = fn(self._values(), self._replicated(chunk), cache, jnp.int32(index))
            outs.append(out)
            index += chunk.shape[1]
        return outs

    def feed_forward(self, x, layer: int):
        """keras-hub has no feed-forward sublayer: its SwiGLU is inline in LlamaTransformerDecoder.call. So the
        decoder's own call runs with its attention returning zeros and its ffn norm passing through, and the
        output of its feedforward_output_dense (w2) is read: w2(silu(w1 x) * w3 x) as keras-hub computes it."""
        decoder = self._decoder(layer)
        overrides = {id(decoder._self_attention_layer): lambda hidden_states, **kw: jnp.zeros_like(hidden_states),
                     id(decoder._feedforward_layernorm): lambda x: x}

        def mlp(x):
            with _capturing({}, overrides) as store:
                decoder(x)
            return store[f"layers.{layer}.mlp_out"]

        return self._jit(("feed_forward", layer), mlp)(self._values(), self._replicated(x))

    def block(self, x, layer: int, start_pos: int):
        decoder = self._decoder(layer)
        x = np.asarray(x)
        batch, seq = x.shape[:2]
        if start_pos == 0:
            return self._jit(("block", layer), lambda x: decoder(x))(self._values(), self._replicated(x))
        length = start_pos + seq

        def at_offset(x):
            mask = jnp.broadcast_to(jnp.arange(length)[None, None, :] >= start_pos, (batch, seq, length))
            out, _ = decoder(x, decoder_attention_mask=mask, self_attention_cache=self._empty_cache(batch, length),
                             self_attention_cache_update_index=start_pos)
            return out

        return self._jit(("block", layer, start_pos, batch, seq), at_offset)(self._values(), self._replicated(x))

    def head(self, h):
        """The final LlamaLayerNorm, then ReversibleEmbedding(reverse=True), as Llama3CausalLM does."""
        backbone = self.backbone
        return self._jit("head", lambda h: backbone.token_embedding(backbone.layer_norm(h), reverse=True))(
            self._values(), self._replicated(h))


def _config_of(backbone) -> LlamaConfig:
    """The suite config keras-hub's backbone computes (what it was told, whatever the source)."""
    hidden = backbone.intermediate_dim
    scaled = backbone.rope_low_freq_factor is not None
    base = spec.LlamaConfig(dim=backbone.hidden_dim, n_layers=backbone.num_layers, n_heads=backbone.num_query_heads,
                            n_kv_heads=backbone.num_key_value_heads, vocab_size=backbone.vocabulary_size,
                            multiple_of=hidden, norm_eps=backbone.layer_norm_epsilon,
                            rope_theta=float(backbone.rope_max_wavelength))
    fields = {f for f in base.__dataclass_fields__}
    changes: dict[str, Any] = {}
    if "tie_word_embeddings" in fields:
        changes["tie_word_embeddings"] = bool(backbone.tie_word_embeddings)
    if "use_scaled_rope" in fields:
        changes["use_scaled_rope"] = scaled
    elif not scaled:
        changes["rope_scaling"] = None
    return base.replace(**changes)


# ---- the factories ----------------------------------------------------------------------------------------

def _build_direct(config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> KerasHubLlamaAdapter:
    values = ckpt.keras_weights(weights, config)

    def build():
        backbone = keras_hub.models.Llama3Backbone(**ckpt.backbone_kwargs(config), dtype=dtype)
        by_path = {v.path: v for v in backbone.variables}
        unknown = sorted(set(values) - set(by_path))
        untouched = sorted(set(by_path) - set(values))
        if unknown or untouched:
            raise RuntimeError(f"keras-hub Llama3Backbone variables and the suite's weights disagree: no variable "
                               f"for {unknown}, no weight for {untouched}")
        for path, value in values.items():
            by_path[path].assign(value)
        return backbone

    return KerasHubLlamaAdapter.from_backbone_builder(build, mesh, dtype, "direct")


def _load_hf(path, mesh, dtype: str) -> KerasHubLlamaAdapter:
    """keras-hub's own Hugging Face loader on a local directory, as a user loads a downloaded snapshot:
    Llama3Backbone.from_preset(DIR) (TransformersPresetLoader -> convert_llama3 + SafetensorLoader)."""
    path = str(Path(path).resolve())
    return KerasHubLlamaAdapter.from_backbone_builder(
        lambda: keras_hub.models.Llama3Backbone.from_preset(path, dtype=dtype), mesh, dtype, f"hf:{path}")


class KerasHubLlama:
    """Built directly from the suite's config and weights: Llama3Backbone(**arguments for every config field),
    each variable assigned from the Meta tensor (adapters/keras_hub/checkpoint.py)."""

    package = "keras-hub"  # the distribution under test, for the JSON environment and the report title

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> KerasHubLlamaAdapter:
        return _build_direct(config, weights, mesh, dtype)

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> KerasHubLlamaAdapter:
        """keras-hub's own loader: Hugging Face directories only."""
        if fmt != "hf":
            raise NotImplementedError(f"keras-hub {keras_hub.__version__} has no loader for {fmt!r} checkpoints "
                                      "(Meta's params.json + consolidated.NN.pth); it loads Hugging Face "
                                      "directories (config.json + safetensors) through its transformers converter")
        return _load_hf(path, mesh, dtype)


class KerasHubLlamaHF(KerasHubLlama):
    """Loaded through keras-hub's Hugging Face converter: build() writes the suite's weights as the suite's HF
    checkpoint (float32 safetensors) with config.json in transformers 5's `rope_parameters` style into a temporary
    directory and loads it with Llama3Backbone.from_preset(DIR)."""

    style = "rope_parameters"

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> KerasHubLlamaAdapter:
        directory = Path(tempfile.mkdtemp(prefix=f"keras_hub_{cls.style}_"))
        try:
            write_hf(directory, config, weights, cls.style)
            return _load_hf(directory, mesh, dtype)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class KerasHubLlamaHFHub(KerasHubLlamaHF):
    """As KerasHubLlamaHF, with config.json in the hub's style (Llama 3.1's own file): top-level rope_theta and a
    rope_scaling dict."""

    style = "rope_scaling"
