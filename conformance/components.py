"""The component checks, each declared once as a record (in the manner of PyTorch's OpInfo and JAX's args_maker).

A record names the adapter capability it calls (adapters/protocol.py), how its inputs are made, how each side
(the implementation, Meta, HF, the float64 oracle) is called on them, what its outputs are named and which row of
the tolerance table judges them. `check` runs any record: it makes the inputs once and hands the same arrays to
every side, so a test and a mutant run can never compare different inputs. The oracle under a deviation's config
and variant is also the diagnosis's prediction.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import numpy as np

from conformance import support
from fixtures import extremes
from llama_spec.host import host
from parity import assert_parity
from reference import hf, meta, oracle


@dataclasses.dataclass(frozen=True, eq=False)  # compared and cached by identity: one record per check
class Component:
    """One component check. Every callable takes the case's keywords (`**case`, e.g. layer_index, start_pos)."""
    key: str  # the records' component and the tolerance table's row
    capability: str  # the adapter method, e.g. 'rms_norm'
    inputs: Callable[..., tuple]  # (dtype, **case) -> the arrays every side gets
    subject: Callable[..., Any]  # (adapter method, arrays, **case) -> its output(s)
    meta: Callable[..., Any]  # Meta's function for this component (reference/meta.py)
    hf: Callable[..., Any]  # HF's (reference/hf.py), same signature
    reference: Callable[..., Any]  # (meta or hf, arrays, dtype, **case) -> its output(s)
    oracle: Callable[..., Any]  # (arrays, config, variant, **case) -> float64 output(s)
    names: Callable[..., list[str]]  # (**case) -> one record name per output
    several: bool = False  # the outputs are a sequence, one per name
    logits: bool = False  # judged as logits (KL, top-1)
    layered: bool = True  # the records carry the case's layer_index
    precondition: Callable[..., None] | None = None  # (arrays, dtype, **case): asserts what the inputs must reach


def _named(base: str, extreme: str | None) -> str:
    return base if extreme is None else f"{base}.{extreme}"


RMSNORM = Component(
    key="rmsnorm", capability="rms_norm",
    inputs=lambda dtype, layer_index, which, extreme=None: (
        support.activations(dtype, 16, seed=11, spread=True, extreme=extreme),
        support.layer(dtype, layer_index)[which]),
    subject=lambda fn, arrays, layer_index, which, **_: fn(arrays[0], layer_index, which),
    meta=meta.meta_rms_norm, hf=hf.hf_rms_norm,
    reference=lambda side, arrays, dtype, **_: side(arrays[0], arrays[1], support.CONFIG.norm_eps, dtype),
    oracle=lambda arrays, config, variant, **_: oracle.oracle_rms_norm(arrays[0], arrays[1], config.norm_eps, variant),
    names=lambda which, extreme=None, **_: [_named(which, extreme)],
)

ROPE = Component(
    key="rope", capability="rope", several=True, layered=False,
    inputs=lambda dtype, start_pos, extreme=None: support.heads(dtype, 16, seed=12, extreme=extreme),
    subject=lambda fn, arrays, start_pos, **_: fn(arrays[0], arrays[1], start_pos),
    meta=meta.meta_rope, hf=hf.hf_rope,
    reference=lambda side, arrays, dtype, start_pos, **_: side(arrays[0], arrays[1], support.CONFIG, dtype,
                                                               start_pos=start_pos),
    oracle=lambda arrays, config, variant, start_pos, **_: oracle.oracle_rope(arrays[0], arrays[1], config, start_pos,
                                                                              variant),
    names=lambda start_pos, extreme=None: [f"{which}@{start_pos}" + ("" if extreme is None else f".{extreme}")
                                           for which in ("q_rope", "k_rope")],
    precondition=lambda arrays, dtype, start_pos, extreme=None: _peaked(arrays, start_pos, extreme),
)


def _peaked(arrays, start_pos: int, extreme: str | None) -> None:
    """A 'peaked' query's scores after rotation reach extremes.MIN_SCORE (on the oracle's rotation)."""
    if extreme == "peaked":
        q, k = oracle.oracle_rope(arrays[0], arrays[1], support.CONFIG, start_pos)
        assert extremes.max_causal_score(q, k) >= extremes.MIN_SCORE


# name -> (chunk sizes, start position, extreme input or None); see conformance/test_attention.py
ATTENTION_CASES = {
    "prefill": ((20,), 0, None),
    "cached": ((12, 6, 1, 1), 0, None),
    "pos9000": ((20,), 9000, None),
    "extreme": ((12, 6, 1, 1), 0, "scores"),
    "prefill128": ((128,), 0, None),
}


def _attention_inputs(dtype: str, case: str, layer_index: int) -> tuple:
    sizes, start_pos, extreme = ATTENTION_CASES[case]
    return (support.attention_chunks(dtype, sizes, extreme, layer_index, start_pos),
            support.layer(dtype, layer_index))


def _scores_reached(arrays, dtype: str, case: str, layer_index: int) -> None:
    sizes, start_pos, extreme = ATTENTION_CASES[case]
    if extreme:
        _, q, k = oracle.attention(np.concatenate(arrays[0], axis=1), arrays[1], support.CONFIG,
                                   start_pos + np.arange(sum(sizes)))
        reached = extremes.max_causal_score(q, k)
        assert reached >= extremes.MIN_SCORE, f"case {case}: scores reach only {reached:.1f}"


ATTENTION = Component(
    key="attention", capability="attention", several=True,
    inputs=_attention_inputs,
    subject=lambda fn, arrays, case, layer_index: fn(arrays[0], layer_index, ATTENTION_CASES[case][1]),
    meta=meta.meta_attention, hf=hf.hf_attention,
    reference=lambda side, arrays, dtype, case, **_: side(arrays[0], arrays[1], support.CONFIG, dtype,
                                                          start_pos=ATTENTION_CASES[case][1]),
    oracle=lambda arrays, config, variant, case, **_: oracle.oracle_attention(
        arrays[0], arrays[1], config, ATTENTION_CASES[case][1], variant),
    names=lambda case, **_: [f"{case}.chunk{chunk}" for chunk in range(len(ATTENTION_CASES[case][0]))],
    precondition=_scores_reached,
)

MLP = Component(
    key="mlp", capability="feed_forward",
    inputs=lambda dtype, layer_index, extreme=None: (support.activations(dtype, 16, seed=14, extreme=extreme),
                                                     support.layer(dtype, layer_index)),
    subject=lambda fn, arrays, layer_index, **_: fn(arrays[0], layer_index),
    meta=meta.meta_feed_forward, hf=hf.hf_feed_forward,
    reference=lambda side, arrays, dtype, **_: side(arrays[0], arrays[1]["w1"], arrays[1]["w2"], arrays[1]["w3"],
                                                    dtype),
    oracle=lambda arrays, config, variant, **_: oracle.oracle_feed_forward(
        arrays[0], arrays[1]["w1"], arrays[1]["w2"], arrays[1]["w3"], variant),
    names=lambda extreme=None, **_: [_named("mlp_out", extreme)],
)

BLOCK = Component(
    key="block", capability="block",
    inputs=lambda dtype, layer_index, start_pos, extreme=None: (
        support.activations(dtype, 16, seed=15, extreme=extreme), support.layer(dtype, layer_index)),
    subject=lambda fn, arrays, layer_index, start_pos, **_: fn(arrays[0], layer_index, start_pos),
    meta=meta.meta_block, hf=hf.hf_block,
    reference=lambda side, arrays, dtype, start_pos, **_: side(arrays[0], arrays[1], support.CONFIG, dtype,
                                                               start_pos=start_pos),
    oracle=lambda arrays, config, variant, start_pos, **_: oracle.oracle_block(arrays[0], arrays[1], config, start_pos,
                                                                               variant),
    names=lambda start_pos, extreme=None, **_: [_named(f"block_out@{start_pos}", extreme)],
)

HEAD = Component(
    key="logits", capability="head", logits=True, layered=False,
    inputs=lambda dtype, extreme=None: (support.activations(dtype, 16, seed=17, spread=True, extreme=extreme),
                                        support.weights(dtype)["norm.weight"], support.weights(dtype)["output.weight"]),
    subject=lambda fn, arrays, **_: fn(arrays[0]),
    meta=meta.meta_head, hf=hf.hf_head,
    reference=lambda side, arrays, dtype, **_: side(arrays[0], arrays[1], arrays[2], support.CONFIG.norm_eps, dtype),
    oracle=lambda arrays, config, variant, **_: oracle.oracle_head(arrays[0], arrays[1], arrays[2], config.norm_eps,
                                                                   variant),
    names=lambda extreme=None: [_named("head", extreme)],
    precondition=lambda arrays, dtype, extreme=None: _dominant(arrays, extreme),
)


def _dominant(arrays, extreme: str | None) -> None:
    """A 'dominant' input puts one token's probability above extremes.MIN_TOP_PROBABILITY everywhere (oracle's)."""
    if extreme == "dominant":
        exact = oracle.oracle_head(arrays[0], arrays[1], arrays[2], support.CONFIG.norm_eps)
        assert extremes.top_probability(exact).min() > extremes.MIN_TOP_PROBABILITY


EMBEDDING = Component(
    key="embedding", capability="embed", layered=False,
    inputs=lambda dtype, seq: (support.tokens(support.BATCH, seq, seed=19),
                               support.weights(dtype)["tok_embeddings.weight"]),
    subject=lambda fn, arrays, **_: fn(arrays[0]),
    meta=meta.meta_embedding, hf=hf.hf_embedding,
    reference=lambda side, arrays, dtype, **_: side(arrays[0], arrays[1], dtype),
    oracle=lambda arrays, config, variant, **_: oracle.oracle_embedding(arrays[0], arrays[1], variant),
    names=lambda seq: [f"embedding.seq{seq}"],
)

ALL = (RMSNORM, ROPE, ATTENTION, MLP, BLOCK, HEAD, EMBEDDING)


def _key(case: Mapping[str, Any]) -> tuple:
    return tuple(sorted(case.items()))


@functools.lru_cache(maxsize=None)
def _inputs(component: Component, dtype: str, case: tuple) -> tuple:
    return component.inputs(dtype, **dict(case))


def inputs(component: Component, dtype: str, **case) -> tuple:
    """The arrays every side of `component`'s check gets for this case (made once per process)."""
    return _inputs(component, dtype, _key(case))


@functools.lru_cache(maxsize=None)
def _expected(component: Component, reference: str, dtype: str, case: tuple):
    sides = {"meta": component.meta, "hf": component.hf}
    if reference not in sides:
        raise ValueError(f"--reference {reference}: component references are {sorted(sides)} (the oracle is always "
                         "consulted for noise_ratio)")
    arrays = _inputs(component, dtype, case)
    return (component.reference(sides[reference], arrays, dtype, **dict(case)),
            component.oracle(arrays, support.CONFIG, oracle.EXACT, **dict(case)))


def clear_caches() -> None:
    """Forget the inputs and expectations made so far (the battery's model changed: support.use_model)."""
    _inputs.cache_clear()
    _expected.cache_clear()


def expected(component: Component, reference: str, dtype: str, **case):
    """(the reference's output(s), the float64 oracle's) on the case's inputs, computed once per process."""
    return _expected(component, reference, dtype, _key(case))


def check(request, component: Component, adapter, reference: str, dtype: str, mesh: str, **case) -> None:
    """Run `component` on the adapter for this case and record one parity comparison per output: not checked when
    the adapter lacks the capability, a failed record when it raises."""
    scope = dict(component=component.key, reference=reference, dtype=dtype, mesh=mesh)
    names = component.names(**case)
    layer = case.get("layer_index") if component.layered else None
    support.require(request, adapter, component.capability, **scope, names=names)
    arrays = inputs(component, dtype, **case)
    if component.precondition is not None:
        component.precondition(arrays, dtype, **case)
    method = getattr(adapter, component.capability)
    actual = support.run(request, component.subject, method, arrays, **case, **scope, layer=layer, name=names[0],
                         what=f"{type(adapter).__name__}.{component.capability}")
    ref, exact = expected(component, reference, dtype, **case)
    actual, ref, exact = ((list(actual), ref, exact) if component.several else ([actual], [ref], [exact]))
    if len(actual) != len(names):
        raise AssertionError(f"component '{component.key}'{'' if layer is None else f', layer {layer}'}: "
                             f"{len(names)} outputs expected, {len(actual)} back")
    for index, (name, a, e, o) in enumerate(zip(names, actual, ref, exact)):
        def predict(config, variant, index=index):
            out = component.oracle(arrays, config, variant, **case)
            return out[index] if component.several else out
        assert_parity(request, name=name, layer=layer, actual=host(a), expected=e, oracle=o, **scope,
                      logits=component.logits, diagnose=support.diagnosis(dtype, mesh, predict))


@dataclasses.dataclass(frozen=True)
class Judge:
    """One test's subject and scope: the pytest request, the --impl implementation, reference, dtype and mesh."""
    request: Any
    impl: Callable[[str, str], Any]
    reference: str
    dtype: str
    mesh: str

    def subject(self, key: str):
        """The implementation on this mesh at this dtype; a build that raises is a failed record of `key`."""
        return support.subject(self.request, self.impl, self.mesh, self.dtype, component=key, reference=self.reference)

    def check(self, component: Component, **case) -> None:
        check(self.request, component, self.subject(component.key), self.reference, self.dtype, self.mesh, **case)
