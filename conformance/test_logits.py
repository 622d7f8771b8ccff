"""The full forward of the implementation under test: every named intermediate it captures, then the logits
(KL, top-1, top-k as well); and its final norm + output projection alone (the `head` component).

'batch' is two sequences of 48 tokens; 'long' is one sequence of 512 tokens, because RoPE is close to the
identity at early positions and a partial-RoPE bug can pass short prompts. 'past_8192' is the batch at positions
9000.. (past the Llama 3.1 scaling ramp, where a missing scaling or bf16 phases turn long wavelengths by radians);
'small_rows' is the batch on weights whose embedding rows are half scaled down to mean square 1e-7 .. 1e-4, where
RMSNorm's eps (1e-5) decides the output (support.WEIGHT_SETS). Intermediates the implementation
does not capture are reported as not checked (the test ends skipped and names them), never as passed.

Extremes (fixtures/extremes.py): the head on hidden states each along one output row (a dominant token,
probability > 0.999), and the full model built through the --impl factory from crafted weights on a prompt with a
long run of one repeated token: outlier channels 10^3 times the rest in the embeddings of a few tokens (massive
activations), layer 0's scores >= 100, output scaled so that most positions have a token of probability > 0.999
(each asserted on the float64 oracle's tensors).
"""
import functools

import numpy as np
import pytest

from adapters import protocol
from conformance import support
from conformance.components import HEAD
from fixtures import extremes
from llama_spec.host import host
from llama_spec.layout import make_mesh
from parity import assert_parity, assert_parity_many
from parity.check import record_not_checked
from reference import hf, meta, oracle
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


@pytest.mark.parametrize("case", ORDER)
def test_logits(request, impl, impl_factory, reference, dtype, mesh, case):
    support.data_split(mesh, CASES[case][0])
    adapter = case_subject(request, impl, impl_factory, mesh, dtype, case, "logits", reference)
    check_logits(request, adapter, reference, dtype, mesh, case)


@pytest.mark.parametrize("case", ORDER)
def test_intermediates(request, impl, impl_factory, reference, dtype, mesh, case):
    support.data_split(mesh, CASES[case][0])
    adapter = case_subject(request, impl, impl_factory, mesh, dtype, case, "intermediate", reference)
    check_intermediates(request, adapter, reference, dtype, mesh, case)


def test_head(judge):
    support.data_split(judge.mesh, support.BATCH)
    judge.check(HEAD)


def test_head_extremes(judge):
    """A dominant token at every position: the softmax the KL is taken over is nearly one-hot (the record's
    precondition asserts it on the oracle's)."""
    support.data_split(judge.mesh, support.BATCH)
    judge.check(HEAD, extreme="dominant")


EXTREME_BATCH, EXTREME_SEQ = 2, 48


@functools.lru_cache(maxsize=1)
def _extreme_case():
    """(tokens, crafted float32 weights) of the full-model extremes."""
    tokens = extremes.repeated_tokens(support.tokens(EXTREME_BATCH, EXTREME_SEQ, seed=16))
    return tokens, extremes.extreme_weights(support.canonical_weights("tiny"), tokens)


@functools.lru_cache(maxsize=None)
def _extreme_expected(reference: str, dtype: str):
    """(reference logits, oracle logits and intermediates) on the crafted weights."""
    tokens, weights = _extreme_case()
    if reference == "meta":
        ref = meta.MetaReference(support.CONFIG, weights, dtype, max_batch_size=EXTREME_BATCH,
                                 max_seq_len=EXTREME_SEQ).forward(tokens, 0)
    elif reference == "hf":
        ref = hf.HFReference(support.CONFIG, weights, dtype).forward(tokens, 0)
    else:
        raise ValueError(f"--reference {reference}: full-model references are meta and hf")
    rounded = {k: support.rounded(v, dtype) for k, v in weights.items()}
    return ref, oracle.oracle_forward(support.CONFIG, rounded, tokens, 0, capture=True)


_extreme_builds: dict = {}


def test_logits_extremes(request, impl_factory, reference, dtype, mesh):
    """The full model on crafted weights reaching all three extremes at once; logits against the reference."""
    support.data_split(mesh, EXTREME_BATCH)
    if reference == "oracle":
        pytest.skip("the float64 oracle is consulted for noise_ratio; logits are compared with meta and hf")
    tokens, weights = _extreme_case()
    ref_logits, (exact_logits, taps) = _extreme_expected(reference, dtype)
    outliers = extremes.outlier_ratio(taps["embedding"])
    scores = extremes.max_causal_score(taps["layers.0.q_rope"], taps["layers.0.k_rope"])
    dominant = float(np.mean(extremes.top_probability(exact_logits) > extremes.MIN_TOP_PROBABILITY))
    assert (outliers >= extremes.MIN_OUTLIER_RATIO and scores >= extremes.MIN_SCORE
            and dominant >= extremes.MIN_DOMINANT_SHARE), \
        f"extremes not reached: outlier ratio {outliers:.3g}, max score {scores:.3g}, share of positions with " \
        f"p > {extremes.MIN_TOP_PROBABILITY}: {dominant:.2f}"
    scope = dict(component="logits", reference=reference, dtype=dtype, mesh=mesh)
    key = (protocol.name_of(impl_factory), mesh, dtype)
    if key not in _extreme_builds:
        _extreme_builds[key] = support.run(request, protocol.build, impl_factory, support.CONFIG, weights,
                                           make_mesh(mesh), dtype, max_batch_size=EXTREME_BATCH,
                                           max_seq_len=EXTREME_SEQ, **scope, what=f"building --impl on {mesh}")
    logits = support.run(request, _extreme_builds[key].forward, tokens, start_pos=0, **scope, name="logits.extreme")
    assert_parity(request, name="logits.extreme", actual=host(logits), expected=ref_logits,
                  oracle=exact_logits, logits=True, **scope)
