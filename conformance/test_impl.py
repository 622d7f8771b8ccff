"""The implementation under test through the adapter protocol (tp_llama/adapter.py): `--impl MODULE:ATTR`, by
default the built-in tp_llama.

Logits (KL, top-1, top-k), every named intermediate the adapter provides, and its decode path if it has one,
against the same references and bounds as test_logits.py and test_kv_cache.py. Intermediates or a decode path
an adapter does not provide are reported as not checked (the test ends skipped and says which), never as passed.
The protocol's own failure modes are tested at the end, including a planted bug the --impl path must catch.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from conformance import support
from parity import assert_parity, assert_parity_many
from parity.check import NOT_CHECKED_KEY, RECORD_KEY, record_not_checked
from reference.layers import intermediate_names
from tp_llama import adapter as protocol
from llama_spec.layout import make_mesh, parse_mesh

CASES = {"batch": (2, 48), "long": (1, 512)}  # as test_logits.py
EXAMPLE = "examples.simple_llama.adapter:SimpleLlamaAdapter"


def _splits(mesh: str, batch: int) -> None:
    data = parse_mesh(mesh)[0]
    if batch % data:
        pytest.skip(f"batch {batch} does not split over the data axis of {mesh}")


def check_impl_logits(request, adapter, reference, dtype, mesh, case):
    batch, seq = CASES[case]
    logits = protocol.host(adapter.forward(support.tokens(batch, seq, seed=16), start_pos=0))
    (ref_logits, _), (exact_logits, _) = support.full_forward(reference, dtype, batch, seq)
    assert_parity(request, component="logits", name=f"logits.{case}", actual=logits, expected=ref_logits,
                  oracle=exact_logits, reference=reference, dtype=dtype, mesh=mesh, logits=True)


def check_impl_intermediates(request, adapter, reference, dtype, mesh, case):
    """Compare what the adapter captures; note the rest as not checked and end skipped when anything is."""
    batch, seq = CASES[case]
    _, taps = protocol.forward(adapter, support.tokens(batch, seq, seed=16))
    (_, ref_taps), (_, exact_taps) = support.full_forward(reference, dtype, batch, seq)
    known = [n for n in intermediate_names(support.CONFIG.n_layers) if n != "logits"]
    unknown = sorted(set(taps) - set(known))
    if unknown:
        raise protocol.AdapterError(f"{type(adapter).__name__} captured names the suite does not know: {unknown}; "
                                    "use the names of reference/layers.py")
    provided = [n for n in known if n in taps]
    if provided:
        assert_parity_many(request, component="intermediate", actual=taps,
                           expected={n: ref_taps[n] for n in provided}, oracle=exact_taps, reference=reference,
                           dtype=dtype, mesh=mesh)
    missing = [n for n in known if n not in taps]
    if missing:
        reason = (f"not checked: {type(adapter).__name__} does not capture {len(missing)} of {len(known)} "
                  f"intermediates ({', '.join(missing)})")
        record_not_checked(request, component="intermediate", names=missing, reason=reason, reference=reference,
                           dtype=dtype, mesh=mesh)
        pytest.skip(reason)


def check_impl_decode(request, adapter, dtype, mesh, prefill=16, total=24):
    """Prefill then one-token steps give the logits of one full forward (the adapter against itself)."""
    if not isinstance(adapter, protocol.DecodingAdapter):
        pytest.skip(f"not checked: {type(adapter).__name__} has no decode path (init_cache and step)")
    tokens = support.tokens(2, total, seed=3)
    full = protocol.host(adapter.forward(tokens))
    cache = adapter.init_cache(2, total)
    logits, cache = adapter.step(tokens[:, :prefill], 0, cache)
    stepped = [protocol.host(logits)]
    for pos in range(prefill, total):
        logits, cache = adapter.step(tokens[:, pos:pos + 1], pos, cache)
        stepped.append(protocol.host(logits))
    assert_parity(request, component="kv_cache", name="logits", actual=np.concatenate(stepped, axis=1),
                  expected=full, reference="self", dtype=dtype, mesh=mesh, logits=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_impl_logits(request, impl, reference, dtype, mesh, case):
    _splits(mesh, CASES[case][0])
    check_impl_logits(request, impl(mesh, dtype), reference, dtype, mesh, case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_impl_intermediates(request, impl, reference, dtype, mesh, case):
    _splits(mesh, CASES[case][0])
    check_impl_intermediates(request, impl(mesh, dtype), reference, dtype, mesh, case)


def test_impl_decode(request, impl, dtype, mesh):
    _splits(mesh, 2)
    check_impl_decode(request, impl(mesh, dtype), dtype, mesh)


# ---- the protocol itself --------------------------------------------------------------------

def _probe(request):
    """A request stand-in whose records stay here instead of in this test's report."""
    return SimpleNamespace(config=request.config, node=SimpleNamespace(nodeid="probe", user_properties=[]))


def _example(tiny_config, tiny_weights, config=None):
    factory = protocol.load(EXAMPLE)
    return protocol.build(factory, config or tiny_config, tiny_weights, make_mesh("1x1"), "float32")


class _Without:
    """An adapter that captures only some intermediates and has no decode path."""

    def __init__(self, inner, keep):
        self.inner, self.keep = inner, keep

    def forward(self, tokens, start_pos=0, capture=False):
        logits, taps = self.inner.forward(tokens, start_pos=start_pos, capture=True)
        return (logits, {k: v for k, v in taps.items() if self.keep(k)}) if capture else logits


@pytest.mark.parametrize("spec, message", [
    ("examples.simple_llama.adapter", "expected MODULE:ATTR"),
    ("no_such_module_xyz:Thing", "cannot import no_such_module_xyz"),
    ("examples.simple_llama.adapter:Missing", "has no attribute Missing"),
    ("examples.simple_llama.model:run", r"run has no build\(config, weights, mesh, dtype\)"),
])
def test_load_says_what_is_wrong(spec, message):
    with pytest.raises(protocol.AdapterError, match=message):
        protocol.load(spec)


def test_build_rejects_adapters_that_break_the_protocol(tiny_config, tiny_weights):
    class NoForward:
        @classmethod
        def build(cls, *args):
            return object()

    class HalfDecode:
        @classmethod
        def build(cls, *args):
            return cls()

        def forward(self, tokens, start_pos=0, capture=False):
            return tokens

        def step(self, tokens, start_pos, cache):
            return tokens, cache

    mesh = make_mesh("1x1")
    with pytest.raises(protocol.AdapterError, match="has no forward"):
        protocol.build(NoForward, tiny_config, tiny_weights, mesh, "float32")
    with pytest.raises(protocol.AdapterError, match="has step but not init_cache"):
        protocol.build(HalfDecode, tiny_config, tiny_weights, mesh, "float32")


def test_missing_intermediates_are_not_checked_not_passed(request, tiny_config, tiny_weights):
    partial = _Without(_example(tiny_config, tiny_weights), keep=lambda name: not name.endswith("_rope"))
    probe = _probe(request)
    with pytest.raises(pytest.skip.Exception, match=r"not checked: _Without does not capture 4 of 16"):
        check_impl_intermediates(probe, partial, "meta", "float32", "1x1", "batch")
    records = [v for k, v in probe.node.user_properties if k == RECORD_KEY]
    not_checked = [v for k, v in probe.node.user_properties if k == NOT_CHECKED_KEY]
    assert sorted(r["name"] for r in not_checked) == [f"layers.{i}.{t}" for i in (0, 1) for t in ("k_rope", "q_rope")]
    assert len(records) == 12 and all(r["passed"] for r in records), "the captured intermediates must be compared"
    with pytest.raises(pytest.skip.Exception, match="has no decode path"):
        check_impl_decode(probe, partial, "float32", "1x1")


def test_unknown_intermediate_names_fail(request, tiny_config, tiny_weights):
    class Renamed:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, tokens, start_pos=0, capture=False):
            logits, taps = self.inner.forward(tokens, start_pos=start_pos, capture=True)
            return logits, {name.replace("q_rope", "q_rotated"): value for name, value in taps.items()}

    with pytest.raises(protocol.AdapterError, match=r"does not know: \['layers.0.q_rotated'"):
        check_impl_intermediates(_probe(request), Renamed(_example(tiny_config, tiny_weights)), "meta", "float32",
                                 "1x1", "batch")


def test_planted_bug_in_an_adapter_is_caught(request, tiny_config, tiny_weights):
    """The example model without Llama 3.1's RoPE scaling: its long-prompt logits and its first q_rope fail."""
    unscaled = _example(tiny_config, tiny_weights, tiny_config.replace(rope_scaling=None))
    with pytest.raises(AssertionError, match="component 'logits'"):
        check_impl_logits(_probe(request), unscaled, "meta", "float32", "1x1", "long")
    with pytest.raises(AssertionError, match="first failing 'layers.0.q_rope'"):
        check_impl_intermediates(_probe(request), unscaled, "meta", "float32", "1x1", "long")
