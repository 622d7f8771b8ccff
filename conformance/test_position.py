"""Error against position: RoPE, attention over cached chunks, the full forward and the decode path at start
positions from 0 to 131,071, each against the reference and the float64 oracle, then a check that the error does
not grow with position faster than the reference's own (parity.drift), so that drift fails even where every point
is within its bound. Missing or wrong RoPE scaling is zero at position 0 and grows with distance, as does a phase
computed at too low a precision, hence positions at the scaling band edges and past them (`profile_groups`).
The positions, cases and record names: docs/internals.md#error-against-position.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from adapters import decoding, protocol
from conformance import components, support
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity
from parity.check import record_not_checked
from parity.drift import record_drift
from parity.metrics import rel_l2
from reference import hf, meta, oracle
from tp_llama import layers
from tp_llama.adapter import TPLlamaAdapter

LAST_POSITION = 131071  # Llama 3.1's extended context, 131,072 tokens
ROPE_WINDOW = 16        # the RoPE record's tokens (conformance.components.ROPE)
# forward and decode cases, attention chunks: the shapes of test_kv_cache's and test_attention's 'cached' cases,
# so the programs compiled for those serve these
SEQ, BATCH = 24, 2
CHUNKS = (12, 6, 1, 1)
PREFILL = 16
WINDOW = max(ROPE_WINDOW, SEQ)  # the longest case: every case at a profile position ends by LAST_POSITION
WINDOWS = {"q_rope": ROPE_WINDOW, "k_rope": ROPE_WINDOW, "attention": sum(CHUNKS)}  # the others: SEQ


def profile_groups(config, window: int = WINDOW, last: int = LAST_POSITION) -> dict[str, list[int]]:
    """Start positions of the profile by why they are there (see the module docstring); every window
    [p, p + window) ends by `last`."""
    end = last + 1 - window
    groups = {"log-spaced": [0] + [2 ** k for k in range(int(math.log2(window)), int(math.log2(end)) + 1)] + [end]}
    scaling = config.rope_scaling
    if scaling is not None:
        original = scaling.original_max_position_embeddings
        plain = oracle.rope_frequencies(config.head_dim, config.rope_theta, None)
        scaled = oracle.rope_frequencies(config.head_dim, config.rope_theta, scaling)
        changed = plain != scaled
        sides = {"band edges": [original / scaling.high_freq_factor, original / scaling.low_freq_factor],
                 "first radian, scaled": list(1.0 / scaled[changed]),
                 "first radian, unscaled": list(1.0 / plain[changed])}
        for group, edges in sides.items():
            groups[group] = [p for edge in edges for p in (math.ceil(edge) - window, math.ceil(edge)) if 0 <= p <= end]
    return groups


def profile_positions(config, window: int = WINDOW, last: int = LAST_POSITION) -> list[int]:
    return sorted({p for group in profile_groups(config, window, last).values() for p in group})


GROUPS = profile_groups(support.CONFIG)
POSITIONS = profile_positions(support.CONFIG)
# The default run's share: every band edge's two sides, the scaled long wavelengths' first radian, and every other
# log-spaced point with both ends (enough for a slope); `slow` sweeps all of POSITIONS.
DEFAULT_POSITIONS = sorted({*GROUPS["log-spaced"][::2], GROUPS["log-spaced"][-1], *GROUPS.get("band edges", []),
                            *GROUPS.get("first radian, scaled", [])})


def position_subject(request, impl_factory, mesh, dtype, *, reference):
    """The --impl factory built for the whole context: config and size hints at 131,072 positions (once)."""
    __tracebackhide__ = True
    config = support.CONFIG.replace(max_seq_len=LAST_POSITION + 1)
    return support.built_once(
        request, (impl_factory, mesh, dtype, "positions"),
        lambda: protocol.build(impl_factory, config, support.weight_set(), make_mesh(mesh), dtype,
                               max_batch_size=support.BATCH, max_seq_len=LAST_POSITION + 1),
        component="position", reference=reference, dtype=dtype, mesh=mesh,
        what=f"building --impl on {mesh} at {dtype} for {LAST_POSITION + 1} positions")


@functools.lru_cache(maxsize=None)
def expected_forward(reference: str, dtype: str, start_pos: int):
    """(reference logits, oracle logits) of the forward case at start_pos, without the intermediates."""
    (ref, _), (exact, _) = support.full_forward(reference, dtype, BATCH, SEQ, start_pos)
    return ref, exact


def decode_logits(adapter, start_pos: int) -> np.ndarray:
    """Logits of every position of the forward case's tokens: a prefill of PREFILL, then one-token steps."""
    tokens = support.tokens(BATCH, SEQ, seed=16)
    cache = adapter.init_cache(BATCH, SEQ)
    logits, cache = adapter.step(tokens[:, :PREFILL], 0, cache, offset=start_pos)
    out = [host(logits)]
    for slot in range(PREFILL, SEQ):
        logits, cache = adapter.step(tokens[:, slot:slot + 1], slot, cache, offset=start_pos)
        out.append(host(logits))
    return np.concatenate(out, axis=1)


def quantities(adapter) -> tuple[dict, dict[str, str]]:
    """{quantity: (actual at start_pos, (reference, oracle) at start_pos, logits?)} as functions of (request,
    reference, dtype, start_pos), and {quantity: reason} for those the adapter cannot run."""
    def rope(index):
        def compute(request, reference, dtype, start_pos, scope):
            q, k = components.inputs(components.ROPE, dtype, start_pos=start_pos)
            actual = support.run(request, adapter.rope, q, k, start_pos, **scope, name=f"rope@{start_pos}")
            expected, exact = components.expected(components.ROPE, reference, dtype, start_pos=start_pos)
            return host(actual[index]), expected[index], exact[index]
        return compute, False

    def attention(request, reference, dtype, start_pos, scope):
        chunks = support.attention_chunks(dtype, CHUNKS, start_pos=start_pos)
        actual = support.run(request, adapter.attention, chunks, 0, start_pos, **scope, name=f"attention@{start_pos}")
        weights = support.layer(dtype, 0)
        side = {"meta": meta.meta_attention, "hf": hf.hf_attention}[reference]
        expected = side(chunks, weights, support.CONFIG, dtype, start_pos=start_pos)
        exact = oracle.oracle_attention(chunks, weights, support.CONFIG, start_pos)
        join = lambda parts: np.concatenate([host(p) for p in parts], axis=1)  # noqa: E731
        return join(actual), join(expected), join(exact)

    def forward(request, reference, dtype, start_pos, scope):
        actual = support.run(request, adapter.forward, support.tokens(BATCH, SEQ, seed=16), start_pos=start_pos,
                             **scope, name=f"forward@{start_pos}")
        return (host(actual), *expected_forward(reference, dtype, start_pos))

    def decode(request, reference, dtype, start_pos, scope):
        actual = support.run(request, decode_logits, adapter, start_pos, **scope, name=f"decode@{start_pos}",
                             what=f"{type(adapter).__name__}.step(offset={start_pos})")
        return (actual, *expected_forward(reference, dtype, start_pos))

    available = {"q_rope": rope(0), "k_rope": rope(1), "attention": (attention, False), "forward": (forward, True),
                 "decode": (decode, True)}
    reasons = {}
    for name, capability in (("q_rope", "rope"), ("k_rope", "rope"), ("attention", "attention")):
        reason = protocol.missing(adapter, capability)
        if reason:
            reasons[name] = reason
    reason = decoding.unsupported(adapter, [[0] * SEQ], start_pos=1)
    if reason:
        reasons["decode"] = reason
    return {k: v for k, v in available.items() if k not in reasons}, reasons


def check_positions(request, adapter, reference, dtype, mesh, positions=POSITIONS, only=None):
    """Every quantity (or those in `only`) at every position (a record each), then its drift; fails listing every
    failure."""
    __tracebackhide__ = True
    scope = dict(component="position", reference=reference, dtype=dtype, mesh=mesh)
    runnable, reasons = quantities(adapter)
    if only is not None:
        runnable = {k: v for k, v in runnable.items() if k in only}
        reasons = {k: v for k, v in reasons.items() if k in only}
    problems = []
    for quantity, reason in reasons.items():
        record_not_checked(request, names=[f"{quantity}@{p}" for p in positions], reason=reason, **scope)
    for quantity, (compute, logits) in runnable.items():
        errors, own = [], []
        for start_pos in positions:
            actual, expected, exact = compute(request, reference, dtype, start_pos, scope)
            try:
                assert_parity(request, name=f"{quantity}@{start_pos}", actual=actual, expected=expected,
                              oracle=exact, logits=logits, **scope, extra={"position": start_pos,
                                                                           "quantity": quantity})
            except AssertionError as err:
                problems.append(str(err))
            errors.append(rel_l2(actual, exact))
            own.append(rel_l2(expected, exact))
        try:
            record_drift(request, quantity=quantity, positions=positions, actual_errors=errors,
                         reference_errors=own, reference=reference, dtype=dtype, mesh=mesh,
                         window=WINDOWS.get(quantity, SEQ))
        except AssertionError as err:
            problems.append(str(err))
    if problems:
        raise AssertionError(f"{len(problems)} failures over {len(positions)} positions:\n" + "\n".join(problems))
    if reasons:
        pytest.skip("; ".join(f"{q}: {r}" for q, r in reasons.items()))


def _error_against_position(request, impl_factory, reference, dtype, mesh, positions):
    if reference == "oracle":
        pytest.skip("the float64 oracle is consulted for noise_ratio; positions are compared with meta and hf")
    support.data_split(mesh, BATCH)
    adapter = position_subject(request, impl_factory, mesh, dtype, reference=reference)
    check_positions(request, adapter, reference, dtype, mesh, positions)


def test_error_against_position(request, impl_factory, reference, dtype, mesh):
    _error_against_position(request, impl_factory, reference, dtype, mesh, DEFAULT_POSITIONS)


@pytest.mark.slow
def test_error_against_every_profile_position(request, impl_factory, reference, dtype, mesh):
    _error_against_position(request, impl_factory, reference, dtype, mesh, POSITIONS)


# A phase error growing as (p / 131072)^2 radians x DRIFT_AMPLITUDE: at every position within the point bounds
# (noise_ratio <= 1.75 at 131048, float32), yet rising from 0.29x to 1.75x the reference's error along the profile
DRIFT_AMPLITUDE = 1.3e-3
_original_rope_angles = layers.rope_angles


def _rope_angles_drifting(positions, freqs):
    p = positions.astype(jnp.float32)[..., None]
    angles = p * freqs + DRIFT_AMPLITUDE * (p / (LAST_POSITION + 1)) ** 2
    return jnp.cos(angles), jnp.sin(angles)


def test_a_phase_error_growing_with_position_fails_the_drift_check(request, builtin_only, monkeypatch):
    """The drift check catches what no point bound does: the planted error passes at every position."""

    monkeypatch.setattr(layers, "rope_angles", _rope_angles_drifting)
    fresh = TPLlamaAdapter.build(support.CONFIG, support.weight_set(), make_mesh("1x1"), "float32")
    scratch = support.scratch_request(request.config)
    with pytest.raises(AssertionError, match="q_rope drift"):
        check_positions(scratch, fresh, "meta", "float32", "1x1", DEFAULT_POSITIONS, only=("q_rope",))
    records = [value for key, value in scratch.node.user_properties if key == "parity_record"]
    points = [r for r in records if r["component"] == "position"]
    assert points and all(r["passed"] for r in points), [r["name"] for r in points if not r["passed"]]
    (drift,) = [r for r in records if r["component"] == "position_drift"]
    assert drift["failed_metrics"] == ["drift_rise"], drift


def test_profile_positions_cover_the_band_edges_and_the_context():
    positions = POSITIONS
    assert positions[0] == 0 and positions[-1] == LAST_POSITION + 1 - WINDOW
    for edge in (2048, 8192):
        assert edge - WINDOW in positions and edge in positions, edge
    assert len(positions) == len(set(positions)) and positions == sorted(positions)
