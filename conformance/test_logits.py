"""The full forward of the implementation under test: every named intermediate it captures, then the logits
(KL, top-1, top-k as well); and its final norm + output projection alone (the `head` component).

'batch' is two sequences of 48 tokens; 'long' is one sequence of 512 tokens, because RoPE is close to the
identity at early positions and a partial-RoPE bug can pass short prompts. Intermediates the implementation
does not capture are reported as not checked (the test ends skipped and names them), never as passed.
"""
import pytest

from adapters import protocol
from conformance import support
from parity import assert_parity, assert_parity_many
from parity.check import record_not_checked
from reference import oracle
from reference.layers import intermediate_names

CASES = {"batch": (2, 48), "long": (1, 512)}


def check_logits(request, adapter, reference, dtype, mesh, case):
    batch, seq = CASES[case]
    scope = dict(component="logits", reference=reference, dtype=dtype, mesh=mesh)
    logits = support.run(request, adapter.forward, support.tokens(batch, seq, seed=16), start_pos=0, **scope,
                         name=f"logits.{case}")
    (ref_logits, _), (exact_logits, _) = support.full_forward(reference, dtype, batch, seq)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: support.oracle_forward(
        config, variant, dtype, batch, seq)[0])
    assert_parity(request, name=f"logits.{case}", actual=protocol.host(logits), expected=ref_logits,
                  oracle=exact_logits, logits=True, **scope, diagnose=diagnose)


def check_intermediates(request, adapter, reference, dtype, mesh, case):
    """Compare what the adapter captures; note the rest as not checked and end skipped when anything is."""
    batch, seq = CASES[case]
    scope = dict(component="intermediate", reference=reference, dtype=dtype, mesh=mesh)
    _, taps = support.run(request, protocol.forward, adapter, support.tokens(batch, seq, seed=16), **scope,
                          what=f"{type(adapter).__name__}.forward(capture=True)")
    (_, ref_taps), (_, exact_taps) = support.full_forward(reference, dtype, batch, seq)
    known = [n for n in intermediate_names(support.CONFIG.n_layers) if n != "logits"]
    unknown = sorted(set(taps) - set(known))
    if unknown:
        raise protocol.AdapterError(f"{type(adapter).__name__} captured names the suite does not know: {unknown}; "
                                    "use the names of reference/layers.py")
    provided = [n for n in known if n in taps]
    if provided:
        diagnose = lambda name: support.diagnosis(dtype, mesh, lambda config, variant: support.oracle_forward(  # noqa: E731
            config, variant, dtype, batch, seq)[1][name])
        assert_parity_many(request, actual={n: protocol.host(taps[n]) for n in provided},
                           expected={n: ref_taps[n] for n in provided}, oracle=exact_taps, **scope,
                           diagnose=diagnose)
    missing = [n for n in known if n not in taps]
    if missing:
        reason = (f"not checked: {type(adapter).__name__} does not capture {len(missing)} of {len(known)} "
                  f"intermediates ({', '.join(missing)})")
        record_not_checked(request, names=missing, reason=reason, **scope)
        pytest.skip(reason)


def check_head(request, adapter, reference, dtype, mesh):
    scope = dict(component="logits", reference=reference, dtype=dtype, mesh=mesh)
    support.require(request, adapter, "head", **scope, names=["head"])
    x = support.activations(dtype, 16, seed=17, spread=True)
    actual = support.run(request, adapter.head, x, **scope, name="head")
    expected, exact = support.head(reference, dtype)
    w = support.weights(dtype)
    diagnose = support.diagnosis(dtype, mesh, lambda config, variant: oracle.oracle_head(
        x, w["norm.weight"], w["output.weight"], config.norm_eps, variant))
    assert_parity(request, name="head", actual=protocol.host(actual), expected=expected, oracle=exact,
                  logits=True, **scope, diagnose=diagnose)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits(request, impl, reference, dtype, mesh, case):
    support.data_split(mesh, CASES[case][0])
    adapter = support.subject(request, impl, mesh, dtype, component="logits", reference=reference)
    check_logits(request, adapter, reference, dtype, mesh, case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_intermediates(request, impl, reference, dtype, mesh, case):
    support.data_split(mesh, CASES[case][0])
    adapter = support.subject(request, impl, mesh, dtype, component="intermediate", reference=reference)
    check_intermediates(request, adapter, reference, dtype, mesh, case)


def test_head(request, impl, reference, dtype, mesh):
    support.data_split(mesh, support.BATCH)
    adapter = support.subject(request, impl, mesh, dtype, component="logits", reference=reference)
    check_head(request, adapter, reference, dtype, mesh)
