"""The full-forward checks, shared by the battery's tests: the logits and every captured intermediate of an
implementation against a reference and the float64 oracle on the cases below, and the layer-by-layer run's
comparison (conformance.layerwise runs it, this judges it)."""
from __future__ import annotations

import pytest

from adapters import protocol
from conformance import support
from llama_spec.host import host
from parity import assert_parity, assert_parity_many
from parity.check import record_not_checked
from reference.layers import intermediate_names

# case -> (batch, seq, start_pos, weight set)
CASES = {"batch": (2, 48, 0, "canonical"), "long": (1, 512, 0, "canonical"),
         "past_8192": (2, 48, 9000, "canonical"), "small_rows": (2, 48, 0, "small_rows")}


def case_subject(request, impl, impl_factory, mesh, dtype, case, component, reference):
    kind = CASES[case][3]
    if kind == "canonical":
        return support.subject(request, impl, mesh, dtype, component=component, reference=reference)
    return support.subject_with(request, impl_factory, mesh, dtype, kind, component=component, reference=reference)


# the reaching cases first, so a run stopping at its first failure (-x, the mutant kill matrix) reports the widest
# margin
ORDER = ["past_8192", "small_rows", "batch", "long"]


def check_logits(request, adapter, reference, dtype, mesh, case):
    batch, seq, start_pos, kind = CASES[case]
    scope = dict(component="logits", reference=reference, dtype=dtype, mesh=mesh)
    logits = support.run(request, adapter.forward, support.tokens(batch, seq, seed=16), start_pos=start_pos,
                         **scope, name=f"logits.{case}")
    (ref_logits, _), (exact_logits, _) = support.full_forward(reference, dtype, batch, seq, start_pos, kind)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: support.oracle_forward(
        config, variant, dtype, batch, seq, start_pos, kind)[0])
    assert_parity(request, name=f"logits.{case}", actual=host(logits), expected=ref_logits,
                  oracle=exact_logits, logits=True, **scope, diagnose=diagnose)


def check_intermediates(request, adapter, reference, dtype, mesh, case):
    """Compare what the adapter captures; note the rest as not checked and end skipped when anything is."""
    batch, seq, start_pos, kind = CASES[case]
    scope = dict(component="intermediate", reference=reference, dtype=dtype, mesh=mesh)
    _, taps = support.run(request, protocol.forward, adapter, support.tokens(batch, seq, seed=16), start_pos,
                          **scope, what=f"{type(adapter).__name__}.forward(capture=True)")
    (_, ref_taps), (_, exact_taps) = support.full_forward(reference, dtype, batch, seq, start_pos, kind)
    known = [n for n in intermediate_names(support.CONFIG.n_layers) if n != "logits"]
    unknown = sorted(set(taps) - set(known))
    if unknown:
        raise protocol.AdapterError(f"{type(adapter).__name__} captured names the suite does not know: {unknown}; "
                                    "use the names of reference/layers.py")
    provided = [n for n in known if n in taps]
    if provided:
        diagnose = lambda name: support.diagnosis(dtype, mesh, lambda config, variant: support.oracle_forward(  # noqa: E731
            config, variant, dtype, batch, seq, start_pos, kind)[1][name])
        assert_parity_many(request, actual={n: host(taps[n]) for n in provided},
                           expected={n: ref_taps[n] for n in provided}, oracle=exact_taps, **scope,
                           diagnose=diagnose)
    missing = [n for n in known if n not in taps]
    if missing:
        reason = (f"not checked: {type(adapter).__name__} does not capture {len(missing)} of {len(known)} "
                  f"intermediates ({', '.join(missing)})")
        record_not_checked(request, names=missing, reason=reason, **scope)
        pytest.skip(reason)



# Far past Llama 3.1's original 8192-token context, so every RoPE frequency, scaled or not, has turned.
LAYERWISE_START = 9000


def check_layerwise(request, run, references, dtype, mesh) -> None:
    """Every part of a layer-by-layer run against each reference, with the oracle for noise_ratio; one failure
    listing every reference that failed."""
    __tracebackhide__ = True
    problems = []
    blocks = [name for name in run.actual if name.startswith("layers.")]
    for ref in references:
        expected = run.expected[ref]
        checks = [
            dict(component="intermediate", name="embedding", actual=run.actual["embedding"],
                 expected=expected["embedding"], oracle=run.oracle["embedding"]),
            dict(component="logits", name="logits", actual=run.actual["logits"], expected=expected["logits"],
                 oracle=run.oracle["logits"], logits=True),
        ]
        try:
            assert_parity_many(request, component="block", actual={n: run.actual[n] for n in blocks},
                               expected={n: expected[n] for n in blocks}, oracle=run.oracle, reference=ref,
                               dtype=dtype, mesh=mesh)
        except AssertionError as err:
            problems.append(str(err))
        for check in checks:
            try:
                assert_parity(request, reference=ref, dtype=dtype, mesh=mesh, **check)
            except AssertionError as err:
                problems.append(str(err))
    if problems:
        raise AssertionError("\n".join(problems))
