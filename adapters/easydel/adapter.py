"""EasyDeL 0.3.0's Llama (`easydel.LlamaForCausalLM`, flax nnx) behind the adapter protocol (adapters/protocol.py),
sharded by EasyDeL's own partition rules on the suite's mesh (laid onto its five axes as dp = data, tp = model).
No decode, no attention component and no Meta checkpoint: EasyDeL's KV cache is driven only by its generation
engines, and it loads HF directories. Mesh, jit and intermediates: docs/adapter-internals.md#easydel.
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

from adapters.easydel import checkpoint as ckpt
from adapters.hf_checkpoint import tied, write_hf
from llama_spec.config import LlamaConfig

# EasyDeL's import-time auto-configuration (EASYDEL_AUTO, on by default) appends GPU-only flags to XLA_FLAGS,
# which the CPU jaxlib refuses (a fatal "Unknown flag in XLA_FLAGS") when the backend starts after the import.
os.environ.setdefault("EASYDEL_AUTO", "0")

import easydel as ed  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from llama_spec import config as spec
from llama_spec.convert import halves_to_interleaved_last_axis, interleaved_to_halves_last_axis, meta_to_hf
from llama_spec.layout import meta_weight_shapes

DATA, MODEL = "data", "model"
AXES = ("dp", "fsdp", "ep", "tp", "sp")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# ---- capturing sublayer outputs ---------------------------------------------------------------------------

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("easydel_capture", default=None)


_TAPPED: dict[tuple[type, str], type] = {}


def _tap(module, name: str, pick: Callable[[Any], Any] = lambda out: out) -> None:
    """Swap `module`'s class for a subclass whose __call__ stores pick(output) under `name` while capturing
    (Python looks __call__ up on the type, so the class is what must change)."""
    cls = type(module)
    key = (cls, name)
    if key not in _TAPPED:
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            store = _STORE.get()
            if store is not None:
                store[self._suite_tap] = pick(out)
            return out

        meta: Any = type(cls)  # nnx's metaclass, so the subclass is an nnx Module like its base
        _TAPPED[key] = meta(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})
    object.__setattr__(module, "_suite_tap", name)
    object.__setattr__(module, "__class__", _TAPPED[key])


def _tap_rotary(attention, prefix: str) -> None:
    cls = type(attention)
    key = (cls, "rotary")
    if key not in _TAPPED:
        def _apply_rotary(self, *args, **kwargs):
            q, k = cls._apply_rotary(self, *args, **kwargs)
            store = _STORE.get()
            if store is not None:
                store[self._suite_rope + "q_rope"] = halves_to_interleaved_last_axis(q)
                store[self._suite_rope + "k_rope"] = halves_to_interleaved_last_axis(k)
            return q, k

        meta: Any = type(cls)
        _TAPPED[key] = meta(f"Tapped{cls.__name__}", (cls,), {"_apply_rotary": _apply_rotary, "__module__": __name__})
    object.__setattr__(attention, "_suite_rope", prefix)
    object.__setattr__(attention, "__class__", _TAPPED[key])


def _install_taps(model) -> None:
    base = model.model
    _tap(base.embed_tokens, "embedding")
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}."
        _tap(layer.input_layernorm, p + "attention_norm")
        _tap_rotary(layer.self_attn, p)
        _tap(layer.self_attn, p + "attention_out", lambda out: out.attention_output)
        _tap(layer.post_attention_layernorm, p + "ffn_norm")
        _tap(layer.mlp, p + "mlp_out")
        _tap(layer, p + "block_out", lambda out: out.hidden_states)
    _tap(base.norm, "final_norm")


@contextlib.contextmanager
def _capturing(store: dict | None):
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


# ---- the mesh -----------------------------------------------------------------------------------------------

def easydel_mesh(mesh: Mesh) -> Mesh:
    """The suite's ('data', 'model') mesh as EasyDeL's five axes: the same devices in the same order, dp = data,
    tp = model, fsdp = ep = sp = 1."""
    data, model = mesh.shape[DATA], mesh.shape[MODEL]
    return Mesh(np.asarray(mesh.devices).reshape(data, 1, 1, model, 1), AXES)


def _check_placement(model, mesh: Mesh) -> None:
    wanted = set(np.asarray(mesh.devices).flat)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        held = set(variable.get_value().sharding.device_set)
        if held != wanted:
            raise RuntimeError(f"EasyDeL placed {'/'.join(map(str, path))} on {sorted(d.id for d in held)}, not on "
                               f"the mesh devices {sorted(d.id for d in wanted)}")


# ---- the adapter --------------------------------------------------------------------------------------------

class EasyDeLLlamaAdapter:
    """One built EasyDeL LlamaForCausalLM on one mesh, as jitted pure functions of its nnx state."""

    def __init__(self, model, mesh: Mesh, dtype: str, source: str):
        self.mesh, self.ed_mesh, self.dtype, self.source = mesh, easydel_mesh(mesh), dtype, source
        self.compute_dtype = _DTYPES[dtype]
        self.model = model
        _check_placement(model, mesh)
        _install_taps(model)
        self.graphdef, self.state = nnx.split(model)
        self.ed_config = model.config
        self._jitted: dict = {}

    @classmethod
    def placed(cls, model, mesh: Mesh, dtype: str, source: str) -> EasyDeLLlamaAdapter:
        """The model sharded by EasyDeL's partition rules on the suite's mesh (`shard_model`)."""
        ed_mesh = easydel_mesh(mesh)
        model.config.set_model_mesh(ed_mesh)
        with ed_mesh:
            model = model.shard_model(mesh=ed_mesh)
        return cls(model, mesh, dtype, source)

    # ---- running nnx statelessly under jax.jit ------------------------------------------------------------

    def _jit(self, key, fn: Callable) -> _InMesh:
        """jax.jit of fn(module, *args) over the state, run and lowered inside EasyDeL's mesh."""
        if key not in self._jitted:
            graphdef = self.graphdef

            def pure(state, *args):
                return fn(nnx.merge(graphdef, state), *args)

            self._jitted[key] = _InMesh(jax.jit(pure), self.ed_mesh, self.state)
        return self._jitted[key]

    def _replicated(self, x, dtype=None):
        return jax.device_put(jnp.asarray(np.asarray(x), dtype or self.compute_dtype), NamedSharding(self.mesh, P()))

    def _tokens(self, tokens):
        tokens = np.asarray(tokens, np.int32)
        spec = P(DATA, None) if tokens.shape[0] % self.mesh.shape[DATA] == 0 else P()
        return jax.device_put(jnp.asarray(tokens), NamedSharding(self.mesh, spec))

    def _positions(self, batch: int, seq: int, start_pos: int):
        positions = np.broadcast_to(np.arange(start_pos, start_pos + seq, dtype=np.int32), (batch, seq))
        return self._tokens(positions)

    # ---- forward ----------------------------------------------------------------------------------------

    @staticmethod
    def _forward_fn(capture: bool):
        def forward(model, tokens, positions):
            """LlamaForCausalLM's own call on a fresh sequence: position_ids start_pos.., no cache, no padding."""
            with _capturing({} if capture else None) as store:
                logits = model(input_ids=tokens, position_ids=positions).logits
            return (logits, dict(store)) if capture else logits

        return forward

    def forward(self, tokens, start_pos: int = 0, capture: bool = False):
        tokens = np.asarray(tokens)
        fn = self._jit(("forward", bool(capture)), self._forward_fn(bool(capture)))
        batch, seq = tokens.shape
        return fn(self._tokens(tokens), self._positions(batch, seq, int(start_pos)))

    def compiled_forward(self, batch: int, seq: int):
        fn = self._jit(("forward", False), self._forward_fn(False))
        tokens = np.zeros((batch, seq), np.int32)
        return fn.lower(self._tokens(tokens), self._positions(batch, seq, 0)).compile()

    def parameters(self) -> dict[str, Any]:
        """Meta names -> EasyDeL's placed kernels, in EasyDeL's shapes ((in, out) kernels, q/k rows in the half
        layout, embedding (vocab, dim), lm_head (dim, vocab))."""
        by_path = {"/".join(map(str, p)): v.get_value()
                   for p, v in nnx.to_flat_state(nnx.state(self.model, nnx.Param))}
        config = self.suite_config
        shapes = {name: np.zeros(shape, np.float32) for name, shape in meta_weight_shapes(config).items()}
        names = dict(zip(meta_to_hf(shapes, config), shapes))  # HF name -> Meta name, in order
        return {names[hf]: by_path[ckpt.easydel_path(hf)] for hf in names
                if not (hf == "lm_head.weight" and tied(config))}

    @property
    def suite_config(self) -> LlamaConfig:
        return _suite_config(self.ed_config)

    # ---- components: EasyDeL's own sublayers ------------------------------------------------------------

    @staticmethod
    def _layer(model, layer: int):
        return model.model.layers[layer]

    def rms_norm(self, x, layer: int, which: str):
        def norm(model, x):
            if which == "norm":
                return model.model.norm(x)
            block = self._layer(model, layer)
            return {"attention_norm": block.input_layernorm, "ffn_norm": block.post_attention_layernorm}[which](x)

        return self._jit(("rms_norm", layer, which), norm)(self._replicated(x))

    def rope(self, q, k, start_pos: int):
        """The attention layer's rotary module (`UnifiedAttention.rotary`) with the model's frequency table
        (`EasyDeLBaseModule.frequencies`, what LlamaModel passes every layer), on Meta-layout q/k converted to the
        half layout and back."""
        q, k = np.asarray(q), np.asarray(k)

        def rope(model, q, k, positions):
            rotary = self._layer(model, 0).self_attn.rotary
            q2, k2 = rotary(query=interleaved_to_halves_last_axis(q), key=interleaved_to_halves_last_axis(k),
                            positions=positions, frequencies=model.model.frequencies)
            return halves_to_interleaved_last_axis(q2), halves_to_interleaved_last_axis(k2)

        positions = self._positions(q.shape[0], q.shape[1], int(start_pos))
        return self._jit("rope", rope)(self._replicated(q), self._replicated(k), positions)

    def feed_forward(self, x, layer: int):
        return self._jit(("feed_forward", layer), lambda model, x: self._layer(model, layer).mlp(x))(
            self._replicated(x))

    def block(self, x, layer: int, start_pos: int):
        """LlamaDecoderLayer's own call, with what LlamaModel.__call__ gives it for a fresh sequence: the
        MaskInfo of an all-ones attention mask, position_ids start_pos.., train mode, no cache, the model's
        frequency table."""
        from easydel.caching import TransformerCache
        from eformer import common_types
        from ejkernel.types import MaskInfo

        x = np.asarray(x)

        def block(model, x, positions):
            base = model.model
            mask_info = MaskInfo.dynamic_init(mask_info=None, input_ids=None, inputs_embeds=x,
                                              attention_mask=jnp.ones(x.shape[:2], jnp.bool_))
            cache = TransformerCache.init_empty(len(base.layers))
            out = self._layer(model, layer)(hidden_states=x, mask_info=mask_info, position_ids=positions,
                                            mode=common_types.MODE_TRAIN, cache_view=cache.views[layer],
                                            frequencies=base.frequencies)
            return out.hidden_states

        positions = self._positions(x.shape[0], x.shape[1], int(start_pos))
        return self._jit(("block", layer), block)(self._replicated(x), positions)

    def head(self, h):
        """The final RMSNorm, then LlamaForCausalLM.compute_lm_logits (its lm_head, tied or not)."""
        return self._jit("head", lambda model, h: model.compute_lm_logits(model.model.norm(h)))(
            self._replicated(h))


class _InMesh:
    """A jitted pure function of the nnx state, called and lowered inside EasyDeL's mesh (its sharding constraints
    read the mesh in context)."""

    def __init__(self, jitted, ed_mesh: Mesh, state):
        self.jitted, self.ed_mesh, self.state = jitted, ed_mesh, state

    def __call__(self, *args):
        with self.ed_mesh:
            return self.jitted(self.state, *args)

    def lower(self, *args):
        with self.ed_mesh:
            return self.jitted.lower(self.state, *args)


def _suite_config(ed_config) -> LlamaConfig:
    """The suite config EasyDeL's model computes with (what it was told, whatever the source)."""
    scaling = getattr(ed_config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    rope = (spec.RopeScaling(**{k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")})
            if kind == "llama3" else None)
    return spec.LlamaConfig(dim=ed_config.hidden_size, n_layers=ed_config.num_hidden_layers,
                            n_heads=ed_config.num_attention_heads, n_kv_heads=ed_config.num_key_value_heads,
                            vocab_size=ed_config.vocab_size, multiple_of=ed_config.intermediate_size,
                            norm_eps=ed_config.rms_norm_eps, rope_theta=float(ed_config.rope_theta),
                            rope_scaling=rope, tie_word_embeddings=bool(ed_config.tie_word_embeddings),
                            max_seq_len=int(ed_config.max_position_embeddings))


# ---- the factories ----------------------------------------------------------------------------------------

def _build_direct(config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh: Mesh, dtype: str):
    """easydel.LlamaConfig(**every field) + LlamaForCausalLM(config, dtype, param_dtype), each parameter set from
    the Meta tensor, then EasyDeL's shard_model on the suite's mesh."""
    values = ckpt.easydel_weights(weights, config)
    ed_config = ed.LlamaConfig(**ckpt.config_kwargs(config, dtype))
    ed_mesh = easydel_mesh(mesh)
    ed_config.set_model_mesh(ed_mesh)
    jdtype = _DTYPES[dtype]
    with ed_mesh:
        model = ed.LlamaForCausalLM(config=ed_config, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    by_path = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
    unknown, untouched = sorted(set(values) - set(by_path)), sorted(set(by_path) - set(values))
    if unknown or untouched:
        raise RuntimeError(f"EasyDeL LlamaForCausalLM parameters and the suite's weights disagree: no parameter for "
                           f"{unknown}, no weight for {untouched}")
    for path, value in values.items():
        if by_path[path].get_value().shape != value.shape:
            raise RuntimeError(f"EasyDeL parameter {path} has shape {by_path[path].get_value().shape}, the suite's "
                               f"weight {value.shape}")
        by_path[path].set_value(jnp.asarray(value, jdtype))
    nnx.update(model, params)
    return EasyDeLLlamaAdapter.placed(model, mesh, dtype, "direct")


def _load_hf(path, mesh: Mesh, dtype: str):
    """EasyDeL's own Hugging Face loader on a local directory, as a user loads a downloaded snapshot:
    AutoEasyDeLModelForCausalLM.from_pretrained(DIR, dtype, param_dtype, attn_dtype=dtype). Its mesh spans every
    device (fsdp = -1 takes what the suite's data x model leaves: EasyDeL cannot build a mesh over fewer devices
    than the process has); shard_model then places the model on exactly the suite's mesh."""
    path = str(Path(path).resolve())
    jdtype = _DTYPES[dtype]
    data, model_axis = mesh.shape[DATA], mesh.shape[MODEL]
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        path, dtype=jdtype, param_dtype=jdtype, sharding_axis_dims=(data, -1, 1, model_axis, 1),
        config_kwargs={"attn_dtype": jdtype, "attn_softmax_dtype": jnp.float32}, auto_shard_model=False,
        verbose=False, local_files_only=True)
    return EasyDeLLlamaAdapter.placed(model, mesh, dtype, f"hf:{path}")


class EasyDeLLlama:
    """Built directly from the suite's config and weights: easydel.LlamaConfig(**every config field) and
    LlamaForCausalLM, each parameter set from the Meta tensor (adapters/easydel/checkpoint.py)."""

    package = "easydel"  # the distribution under test, for the JSON environment and the report title

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> EasyDeLLlamaAdapter:
        return _build_direct(config, weights, mesh, dtype)

    @classmethod
    def build_from_checkpoint(cls, path, mesh, dtype: str, fmt: str) -> EasyDeLLlamaAdapter:
        """EasyDeL's own loader: Hugging Face directories only."""
        if fmt != "hf":
            raise NotImplementedError(f"EasyDeL {ed.__version__} has no loader for {fmt!r} checkpoints (Meta's "
                                      "params.json + consolidated.NN.pth); it loads Hugging Face directories "
                                      "(config.json + safetensors) with AutoEasyDeLModelForCausalLM.from_pretrained")
        return _load_hf(path, mesh, dtype)


class EasyDeLLlamaHF(EasyDeLLlama):
    """Loaded by EasyDeL's Hugging Face loader: build() writes the suite's weights as the suite's HF checkpoint
    (float32 safetensors) with config.json in transformers 5's `rope_parameters` style into a temporary directory
    and loads it with AutoEasyDeLModelForCausalLM.from_pretrained(DIR)."""

    style = "rope_parameters"

    @classmethod
    def build(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray], mesh, dtype: str) -> EasyDeLLlamaAdapter:
        directory = Path(tempfile.mkdtemp(prefix=f"easydel_{cls.style}_"))
        try:
            write_hf(directory, config, weights, cls.style)
            return _load_hf(directory, mesh, dtype)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class EasyDeLLlamaHFHub(EasyDeLLlamaHF):
    """As EasyDeLLlamaHF, with config.json in the hub's style (Llama 3.1's own file): top-level rope_theta and a
    rope_scaling dict."""

    style = "rope_scaling"
