"""The adapter protocol itself (adapters/protocol.py): `--impl MODULE:ATTR`, by default the built-in tp_llama.

The implementation's decode path against its own full forward; then the protocol's failure modes: bad specs,
adapters that break the protocol, missing capabilities reported as not checked (never passed), an adapter that
raises becoming a failed record, and a planted bug the --impl path must catch.
"""

import numpy as np
import pytest

from adapters import protocol
from conformance import support
from conformance.components import ATTENTION, RMSNORM, check
from conformance.forward import check_intermediates, check_logits
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity
from parity.check import NOT_CHECKED_KEY, RECORD_KEY


def check_impl_decode(request, adapter, dtype, mesh, prefill=16, total=24):
    """Prefill then one-token steps give the logits of one full forward (the adapter against itself)."""
    if not isinstance(adapter, protocol.Decode):
        pytest.skip(f"not checked: {type(adapter).__name__} has no decode path (init_cache and step)")
    tokens = support.tokens(2, total, seed=3)
    full = host(adapter.forward(tokens))
    cache = adapter.init_cache(2, total)
    logits, cache = adapter.step(tokens[:, :prefill], 0, cache)
    stepped = [host(logits)]
    for pos in range(prefill, total):
        logits, cache = adapter.step(tokens[:, pos:pos + 1], pos, cache)
        stepped.append(host(logits))
    assert_parity(request, component="kv_cache", name="logits", actual=np.concatenate(stepped, axis=1),
                  expected=full, reference="self", dtype=dtype, mesh=mesh, logits=True)


def test_impl_decode(request, impl, dtype, mesh):
    support.data_split(mesh, 2)
    check_impl_decode(request, impl(mesh, dtype), dtype, mesh)


# ---- the protocol itself --------------------------------------------------------------------

def _example(tiny_config, tiny_weights, config=None):
    factory = protocol.load(support.EXAMPLE)
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
    probe = support.probe(request)
    with pytest.raises(pytest.skip.Exception, match=r"not checked: _Without does not capture 4 of 16"):
        check_intermediates(probe, partial, "meta", "float32", "1x1", "batch")
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
        check_intermediates(support.probe(request), Renamed(_example(tiny_config, tiny_weights)), "meta", "float32",
                                 "1x1", "batch")


def test_planted_bug_in_an_adapter_is_caught(request, tiny_config, tiny_weights):
    """The example model without Llama 3.1's RoPE scaling: its logits past position 8192 and its first q_rope fail."""
    unscaled = _example(tiny_config, tiny_weights, tiny_config.replace(rope_scaling=None))
    with pytest.raises(AssertionError, match="component 'logits'"):
        check_logits(support.probe(request), unscaled, "meta", "float32", "1x1", "past_8192")
    with pytest.raises(AssertionError, match="first failing 'layers.0.q_rope'"):
        check_intermediates(support.probe(request), unscaled, "meta", "float32", "1x1", "past_8192")


def test_an_adapter_that_raises_is_a_failed_record(request):
    """A crash inside the implementation leaves a failed record naming component, layer and error text."""
    class Crashing:
        def forward(self, tokens, start_pos=0, capture=False):
            raise RuntimeError("shape mismatch in my_attention")

        def rms_norm(self, x, layer, which):
            raise ValueError("no such norm")

    probe = support.probe(request)
    with pytest.raises(AssertionError, match=r"component 'logits': Crashing.forward raised RuntimeError: shape "
                                             "mismatch in my_attention"):
        check_logits(probe, Crashing(), "meta", "float32", "1x1", "batch")
    with pytest.raises(AssertionError, match=r"component 'rmsnorm', layer 1: .*ValueError: no such norm"):
        check(probe, RMSNORM, Crashing(), "meta", "float32", "1x1", layer_index=1, which="ffn_norm")
    records = [v for k, v in probe.node.user_properties if k == RECORD_KEY]
    assert [(r["component"], r["layer"], r["passed"]) for r in records] == [("logits", None, False),
                                                                           ("rmsnorm", 1, False)]
    assert "RuntimeError: shape mismatch" in records[0]["error"] and records[1]["bounds"], records


def test_a_missing_component_is_not_checked(request, tiny_config, tiny_weights):
    """An adapter with forward only: every component check ends skipped as not checked, naming the capability."""
    partial = _Without(_example(tiny_config, tiny_weights), keep=lambda name: True)
    probe = support.probe(request)
    with pytest.raises(pytest.skip.Exception, match=r"not checked: _Without has no rms_norm capability \(rms_norm\)"):
        check(probe, RMSNORM, partial, "meta", "float32", "1x1", layer_index=0, which="attention_norm")
    with pytest.raises(pytest.skip.Exception, match=r"has no attention capability"):
        check(probe, ATTENTION, partial, "meta", "float32", "1x1", case="cached", layer_index=0)
    entries = [v for k, v in probe.node.user_properties if k == NOT_CHECKED_KEY]
    assert [e["component"] for e in entries] == ["rmsnorm"] + ["attention"] * 4
    assert not [v for k, v in probe.node.user_properties if k == RECORD_KEY], "nothing may pass unchecked"
