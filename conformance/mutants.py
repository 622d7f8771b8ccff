"""The catalogue of known deviations: realistic mistakes, each both planted and predicted.

One entry per deviation (`MUTANTS`, the only list): its name and description; the planted bug, one function of
tp_llama.layers or tp_llama.model replaced with a wrong version at test time (the model's source never
changes); and, where exact math can say what it computes, the prediction: a changed config and/or switches of
the float64 oracle's `Variant` (reference/oracle.py). The suite must kill every planted one:
`python -m conformance.kill_matrix` runs pytest once per mutant (`pytest --mutant NAME`) and prints which tests
killed it and the diagnosis of the first failure; tests/test_mutants.py checks a fast subset in the
default run. Run in reverse, the predictions name the bug behind a failing record (`predictions`, called by
conformance.support.diagnosis for parity.diagnosis); tests/test_diagnosis.py is the confusion matrix.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from llama_spec import generation
from llama_spec.convert import interleaved_to_halves_last_axis
from llama_spec.layout import parse_mesh
from parity.diagnosis import Prediction, residual
from reference import oracle
from tp_llama import layers, model

F32, BF16 = jnp.float32, jnp.bfloat16
_original_rope_frequencies = layers.rope_frequencies
_original_rope_angles = layers.rope_angles
_original_all_reduce = model.all_reduce
_original_write_cache = layers.write_cache


def _rope_without_scaling(head_dim, theta, scaling):
    return _original_rope_frequencies(head_dim, theta, None)


def _rope_with(**changes):
    """RoPE frequencies from a misread config (theta or scaling fields), the model's own code otherwise."""
    theta_change = changes.pop("rope_theta", None)

    def frequencies(head_dim, theta, scaling):
        return _original_rope_frequencies(head_dim, theta_change or theta,
                                          dataclasses.replace(scaling, **changes) if changes else scaling)
    return frequencies


@dataclasses.dataclass(frozen=True)
class UncheckedScaling:
    """RopeScaling's fields without its validation, as a loader that never checked them would hold."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def _swapped(scaling):
    """The scaling with low_freq_factor and high_freq_factor swapped (not a valid RopeScaling)."""
    return UncheckedScaling(scaling.factor, scaling.high_freq_factor, scaling.low_freq_factor,
                            scaling.original_max_position_embeddings)


def _rope_low_high_swapped(head_dim, theta, scaling):
    """Meta's apply_scaling (the oracle's order of cases) fed low_freq_factor and high_freq_factor swapped."""
    return jnp.asarray(oracle.rope_frequencies(head_dim, theta, _swapped(scaling)), F32)


def _rope_angles_in_bf16(positions, freqs):
    angles = positions.astype(BF16)[..., None] * freqs.astype(BF16)
    return jnp.cos(angles).astype(F32), jnp.sin(angles).astype(F32)


def _rope_tables_in_bf16(positions, freqs):
    cos, sin = _original_rope_angles(positions, freqs)
    return cos.astype(BF16).astype(F32), sin.astype(BF16).astype(F32)


def _rotate_half(x, cos, sin):
    """HF's rotate-half applied to weights in Meta's interleaved layout."""
    half = x.shape[-1] // 2
    xf = x.astype(F32)
    x0, x1 = xf[..., :half], xf[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)


_original_apply_rope = layers.apply_rope


def _rope_on_twice_permuted(x, cos, sin):
    """Interleaved RoPE on q/k whose head_dim carries HF's permutation twice (an HF loader permuting again)."""
    return _original_apply_rope(x[..., oracle.hf_permutation_twice(x.shape[-1])], cos, sin)


def _rope_in_half_layout(x, cos, sin):
    """Meta's interleaved RoPE, its output handed over in HF's half layout: q.k is unchanged (q and k share the
    permutation), the rotated q/k an adapter reports are not."""
    return interleaved_to_halves_last_axis(_original_apply_rope(x, cos, sin))


def _rms_norm_without_upcast(x, weight, eps):
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + jnp.asarray(eps, x.dtype))
    return normed * weight.astype(x.dtype)


def _rms_norm_llama2_eps(x, weight, eps):
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def _rms_norm_without_weight(x, weight, eps):
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _rms_norm_over_all_axes(x, weight, eps):
    """Mean square taken over the whole tensor instead of per token: rows leak into each other."""
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def _kv_groups_interleaved(q, n_kv_heads):
    """Query head h reads kv head h % n_kv (jnp.tile order) instead of h // group (repeat order)."""
    b, s, h, d = q.shape
    return q.reshape(b, s, h // n_kv_heads, n_kv_heads, d).swapaxes(2, 3)


def _softmax_in_activation_dtype(scores, mask):
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def _causal_mask_sees_next(q_slots, kv_valid):
    t = jnp.arange(kv_valid.shape[-1])
    return (t[None, None, :] <= q_slots[:, :, None] + 1) & kv_valid[:, None, :]


_original_causal_mask = layers.causal_mask


def _decode_mask_hides_current(q_slots, kv_valid):
    """Decode steps (one query) cannot see the token being decoded; prefill is untouched."""
    if q_slots.shape[1] != 1:
        return _original_causal_mask(q_slots, kv_valid)
    t = jnp.arange(kv_valid.shape[-1])
    return (t[None, None, :] < q_slots[:, :, None]) & kv_valid[:, None, :]


def _attention_scores_in_bf16(q, k, v, mask):
    """layers.attention with the q.k scores rounded to bfloat16 whatever the activation dtype."""
    b, s, h, d = q.shape
    qg = layers.group_query_heads(q, k.shape[2])
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=F32).astype(BF16)
    scores = scores / layers.score_divisor(d)
    probs = layers.attention_softmax(scores, mask[:, None, None, :, :]).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=F32).astype(q.dtype)
    return out.reshape(b, s, h * d)


def _swiglu_swapped(gate, up):
    return layers.silu_f32(up) * gate


def _silu_in_activation_dtype(gate, up):
    return gate * jax.nn.sigmoid(gate) * up


def _skip_reduce_at(site):
    return lambda x, where: x if where == site else _original_all_reduce(x, where)


def _reduce_twice_at(site):
    def reduce(x, where):
        once = _original_all_reduce(x, where)
        return _original_all_reduce(once, where) if where == site else once
    return reduce


def _vocab_shards_reversed(local_vocab):
    return (jax.lax.psum(1, model.MODEL) - 1 - jax.lax.axis_index(model.MODEL)) * local_vocab


def _decode_writes_one_slot_late(cache, new, index):
    return _original_write_cache(cache, new, index + (new.shape[1] == 1))


def _stop_rule_mutants():
    """Planted in the suite's own generation rules (llama_spec.generation), not in the model: each reference's rule
    is its library's, so only the comparison with those catches them (conformance/test_stop_tokens.py)."""
    return [
        Mutant("stop_without_eot", "the suite's stop set lacks <|eot_id|> 128009", generation, "stop_tokens",
               lambda: (128001, 128008)),
        Mutant("stop_one_token_late", "a row ends one token after its stop token", generation, "ends",
               lambda row, stops: len(row) >= 2 and int(row[-2]) in stops),
    ]


def _fragile_formulation_mutants():
    """Formulations right on tame inputs and wrong at real-world magnitudes (fixtures/extremes.py): the extremes
    cases of the component tests must kill them."""
    def softmax_without_max(scores, mask):
        e = jnp.where(mask, jnp.exp(scores.astype(F32)), 0.0)  # exp overflows float32 at scores above 88.7
        return e / jnp.sum(e, axis=-1, keepdims=True)

    def rms_norm_square_in_activation_dtype(x, weight, eps):
        squares = x * x  # rounded to the activation dtype, and summed there, before the float32 normalisation
        mean = jax.lax.reduce(squares, jnp.zeros((), x.dtype), jax.lax.add, (x.ndim - 1,))[..., None] / x.shape[-1]
        normed = x.astype(F32) * jax.lax.rsqrt(mean.astype(F32) + eps)
        return normed.astype(x.dtype) * weight.astype(x.dtype)

    return [
        Mutant("softmax_no_max_subtraction", "attention softmax as exp(scores) / sum, without subtracting the row "
               "max", layers, "attention_softmax", softmax_without_max),
        Mutant("rmsnorm_square_in_activation_dtype", "RMSNorm's mean of squares in the activation dtype", layers,
               "rms_norm", rms_norm_square_in_activation_dtype),
    ]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One catalogued deviation: planted by replacing `target.attribute` with `replacement`; predicted (when
    `configure` or `switches` is given) by the float64 oracle on the changed config with those Variant switches,
    which `evidence` names in a diagnosis ("the output matches <evidence>")."""
    name: str
    description: str
    target: object
    attribute: str
    replacement: Callable
    evidence: str | None = None
    configure: Callable | None = None  # LlamaConfig -> the config the deviating implementation really used
    switches: dict = dataclasses.field(default_factory=dict)  # reference.oracle.Variant fields

    @property
    def predicted(self) -> bool:
        return bool(self.evidence)


def _changed(**changes):
    return lambda config: config.replace(**changes)


def _scaling(**changes):
    """A change of the RoPE scaling; on a model without scaling (SmolLM2) there is nothing to change."""
    return lambda config: (config if config.rope_scaling is None else
                           config.replace(rope_scaling=dataclasses.replace(config.rope_scaling, **changes)))


def _switched(text, **switches):
    return dict(evidence=f"the float64 oracle with {text}", switches=switches)


def _configured(text, configure, **switches):
    return dict(evidence=f"the float64 oracle with {text}", configure=configure, switches=switches)


def _swap_low_high(config):
    if config.rope_scaling is None:  # nothing to swap on a model without RoPE scaling
        return config
    swapped = dataclasses.replace(config)
    object.__setattr__(swapped, "rope_scaling", _swapped(config.rope_scaling))
    return swapped


MUTANTS: dict[str, Mutant] = {m.name: m for m in [
    Mutant("rope_unscaled", "Llama 3.1 RoPE scaling not applied", layers, "rope_frequencies",
           _rope_without_scaling, **_configured("use_scaled_rope=False", _changed(rope_scaling=None))),
    Mutant("rope_theta_1e4", "rope_theta 10000 (Llama 2's) instead of the config's 500000", layers,
           "rope_frequencies", _rope_with(rope_theta=1e4), **_configured("rope_theta=10000", _changed(rope_theta=1e4))),
    Mutant("rope_factor_32", "RoPE scaling factor 32 (Llama 3.2's) instead of the config's 8", layers,
           "rope_frequencies", _rope_with(factor=32.0), **_configured("rope scaling factor 32", _scaling(factor=32.0))),
    Mutant("rope_low_high_swapped", "RoPE scaling with low_freq_factor and high_freq_factor swapped", layers,
           "rope_frequencies", _rope_low_high_swapped,
           **_configured("low_freq_factor and high_freq_factor swapped", _swap_low_high)),
    Mutant("rope_original_context", "RoPE scaling with original_max_position_embeddings 131072 (the extended "
           "context) instead of 8192", layers, "rope_frequencies",
           _rope_with(original_max_position_embeddings=131072),
           **_configured("original_max_position_embeddings=131072",
                         _scaling(original_max_position_embeddings=131072))),
    Mutant("rope_bf16_phases", "RoPE angles computed in bfloat16", layers, "rope_angles", _rope_angles_in_bf16,
           **_switched("position x frequency rounded to bfloat16", rope_angles_bf16=True)),
    Mutant("rope_tables_bf16", "RoPE cos/sin tables rounded to bfloat16", layers, "rope_angles",
           _rope_tables_in_bf16, **_switched("cos/sin rounded to bfloat16", rope_tables_bf16=True)),
    Mutant("rope_rotate_half", "rotate-half applied to the interleaved layout (the HF/Meta permutation missing)",
           layers, "apply_rope", _rotate_half, **_switched("rotate-half pairing", rope_rotate_half=True)),
    Mutant("rope_permuted_twice", "q/k rows in HF's permutation applied twice (an HF checkpoint permuted again)",
           layers, "apply_rope", _rope_on_twice_permuted,
           **_switched("HF's q/k permutation applied twice", rope_permuted_twice=True)),
    Mutant("rope_half_layout", "rotated q/k in HF's half layout, not Meta's interleaved pairs (a permutation of "
           "head_dim: HF-layout weights, or q/k captured before the conversion back)", layers, "apply_rope",
           _rope_in_half_layout, **_switched("q/k in HF's half layout", rope_half_layout=True)),
    Mutant("rmsnorm_no_upcast", "RMSNorm computed in the activation dtype", layers, "rms_norm",
           _rms_norm_without_upcast, **_switched("RMSNorm rounded at the activation dtype", norm_in_dtype=True)),
    Mutant("rmsnorm_eps", "RMSNorm with eps 1e-6 (Llama 2's) instead of the config's 1e-5", layers, "rms_norm",
           _rms_norm_llama2_eps, **_configured("norm_eps=1e-6", _changed(norm_eps=1e-6))),
    Mutant("rmsnorm_no_weight", "RMSNorm without its weight", layers, "rms_norm", _rms_norm_without_weight,
           **_switched("RMSNorm weight left out", norm_without_weight=True)),
    Mutant("rmsnorm_all_axes", "RMSNorm's mean taken over the whole batch, not per token", layers, "rms_norm",
           _rms_norm_over_all_axes, **_switched("RMSNorm mean over all axes", norm_over_all_axes=True)),
    Mutant("kv_group_order", "kv heads repeated in tile order instead of repeat order", layers,
           "group_query_heads", _kv_groups_interleaved,
           **_switched("query heads grouped in tile order", kv_tile_order=True)),
    Mutant("scores_bf16", "attention scores in bfloat16 when float32 was asked", layers, "attention",
           _attention_scores_in_bf16, **_switched("scores rounded to bfloat16", scores_in_bf16=True)),
    Mutant("softmax_bf16", "attention softmax in the activation dtype", layers, "attention_softmax",
           _softmax_in_activation_dtype, **_switched("softmax rounded at the activation dtype",
                                                     softmax_in_dtype=True)),
    Mutant("attention_scale", "scores divided by head_dim instead of sqrt(head_dim)", layers, "score_divisor",
           lambda head_dim: float(head_dim), **_switched("scores / head_dim", score_divisor_head_dim=True)),
    Mutant("causal_off_by_one", "causal mask lets each token see the next one", layers, "causal_mask",
           _causal_mask_sees_next, **_switched("a causal mask one token wide", causal_sees_next=True)),
    Mutant("gate_up_swapped", "SwiGLU gate (w1) and up (w3) swapped", layers, "swiglu", _swiglu_swapped,
           **_switched("w1 and w3 swapped", gate_up_swapped=True)),
    Mutant("silu_bf16", "SiLU in the activation dtype", layers, "swiglu", _silu_in_activation_dtype,
           **_switched("SiLU rounded at the activation dtype", silu_in_dtype=True)),
    Mutant("missing_psum_wo", "no all-reduce after the attention output projection", model, "all_reduce",
           _skip_reduce_at("wo"), **_switched("device 0's partial sum after wo", missing_reduce="wo")),
    Mutant("double_psum_wo", "the attention all-reduce applied twice", model, "all_reduce", _reduce_twice_at("wo"),
           **_switched("wo's output summed twice (M times too large)", double_reduce="wo")),
    Mutant("missing_psum_w2", "no all-reduce after the MLP down projection", model, "all_reduce",
           _skip_reduce_at("w2"), **_switched("device 0's partial sum after w2", missing_reduce="w2")),
    Mutant("double_psum_w2", "the MLP all-reduce applied twice", model, "all_reduce", _reduce_twice_at("w2"),
           **_switched("w2's output summed twice (M times too large)", double_reduce="w2")),
    Mutant("vocab_shards_reversed", "vocab shards of the embedding taken in reverse order", model,
           "vocab_shard_start", _vocab_shards_reversed,
           **_switched("the embedding's vocab shards reversed", vocab_shards_reversed=True)),
    # decode-only: a one-token step after a prefill; no component check sees them, so no prediction (the
    # kv_cache check compares decode with the implementation's own forward, not with exact math).
    Mutant("decode_cache_slot", "decode writes the KV cache one slot late", layers, "write_cache",
           _decode_writes_one_slot_late),
    Mutant("decode_mask_off_by_one", "decode steps cannot see the token being decoded", layers, "causal_mask",
           _decode_mask_hides_current),
    *_stop_rule_mutants(),
    *_fragile_formulation_mutants(),
]}


def combined(*names: str) -> Mutant:
    """Several catalogued deviations at once (an implementation can have more than one bug), as one hypothesis
    named 'a+b': their config changes and oracle switches together; nothing to plant."""
    parts = [MUTANTS[name] for name in names]

    def configure(config):
        for part in parts:
            config = part.configure(config) if part.configure else config
        return config

    switches = {key: value for part in parts for key, value in part.switches.items()}
    evidence = " and ".join(part.evidence.removeprefix("the float64 oracle with ") for part in parts)
    return Mutant("+".join(names), " and ".join(part.description for part in parts), None, "", None,
                  f"the float64 oracle with {evidence}", configure, switches)


def predictions(config, dtype: str, mesh: str, compute: Callable, combinations=()) -> dict:
    """{name: parity.diagnosis.Prediction} of every predicted deviation that changes this output, and of each
    combination of catalogued names in `combinations` (e.g. [("rmsnorm_eps", "rope_unscaled")]).

    compute(config, variant) -> the float64 oracle's output on the failing check's own inputs; it is called once
    exactly and once per predicted deviation (the cost of a diagnosis). A deviation whose prediction equals the
    exact output here (a dtype switch at float32, a reduce switch on one device) cannot be told from a correct
    result and is left out."""
    base = oracle.Variant(dtype=dtype, shards=parse_mesh(mesh)[1] if mesh else 1)
    exact = compute(config, base)
    out = {}
    for mutant in [*MUTANTS.values(), *(combined(*names) for names in combinations)]:
        if not mutant.predicted:
            continue
        changed = mutant.configure(config) if mutant.configure else config
        value = compute(changed, dataclasses.replace(base, **mutant.switches))
        if residual(value, exact) > 1e-12:
            out[mutant.name] = Prediction(mutant.description, mutant.evidence, value)
    return out


def apply(name: str) -> Callable[[], None]:
    """Plant mutant `name`; returns the function that removes it."""
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose one of: {', '.join(MUTANTS)}")
    mutant = MUTANTS[name]
    original = getattr(mutant.target, mutant.attribute)
    setattr(mutant.target, mutant.attribute, mutant.replacement)
    return lambda: setattr(mutant.target, mutant.attribute, original)


@contextlib.contextmanager
def planted(name: str):
    undo = apply(name)
    try:
        yield MUTANTS[name]
    finally:
        undo()


# Measured statements, as data beside the catalogue: (mutant, dtype) -> why the deviation is below that dtype's
# resolution at every realistic magnitude, so the matrix shows the cell as "below resolution" rather than a miss.
BELOW_RESOLUTION: dict[tuple[str, str], str] = {
    ("rmsnorm_no_upcast", "float32"): "the activation dtype is float32: the mutant computes exactly what the "
                                      "upcast computes (no-op).",
    ("softmax_bf16", "float32"): "the activation dtype is float32: softmax already runs in float32 (no-op).",
    ("silu_bf16", "float32"): "the activation dtype is float32: SiLU already runs in float32 (no-op).",
    ("rmsnorm_square_in_activation_dtype", "float32"): "the activation dtype is float32: the squares are already "
                                                        "taken in float32 (no-op).",
    ("scores_bf16", "bfloat16"): "the activation dtype is bfloat16: the scores are already rounded to bfloat16 "
                                 "there, as Meta's bfloat16 matmul rounds them (no-op).",
}
