"""The pooled diagnosis (parity/pooled.py): a deviation of about one bfloat16 rounding per record, consistent over
many failing records, is named; noise is not.

- On synthetic diagnoses: consistent evidence is named with its numbers; a record past its own match threshold, or
  evidence that points both ways, is not.
- False-positive guards: the committed baseline's records get no pooled diagnosis, and neither does a clean
  bfloat16 run of the built-in whose every full-forward record is diagnosed as if it had failed (the clean model is
  as close to each deviation's prediction as rounding makes it, the case pooling must not mistake for evidence).
- A planted "RoPE scaling missing" in an --impl adapter (examples.planted:UnscaledRoPEAdapter), run at bfloat16
  only through test_logits' checks: most failing records alone say "no known cause", pooled they name it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import support
from conformance.forward import CASES, case_subject, check_intermediates, check_logits
from examples.planted import UnscaledRoPEAdapter
from llama_spec.layout import make_mesh
from parity import calibrate, diagnosis
from parity.check import RECORD_KEY
from parity.metrics import as_float64
from parity.pooled import pooled_diagnosis

pytestmark = pytest.mark.usefixtures("builtin_only")


def synthetic(multiple: float, exact_multiple: float, name: str = "rope_unscaled", noise: float = 4e-3) -> dict:
    """A failing record whose diagnosis has `name` at multiple x noise and exact math at exact_multiple x noise."""
    rows = [{"name": name, "description": "Llama 3.1 RoPE scaling not applied", "evidence": "",
             "residual": multiple * noise, "matched": False},
            {"name": "rope_theta_1e4", "description": "rope_theta 10000", "evidence": "",
             "residual": 40 * noise, "matched": False}]
    return {"test": f"t{multiple}{exact_multiple}", "passed": False,
            "diagnosis": {"cause": None, "summary": "", "noise": noise, "correct_residual": 2 * noise,
                          "exact_residual": exact_multiple * noise, "hypotheses": rows}}


def test_a_consistent_deviation_at_one_rounding_is_named():
    named = pooled_diagnosis([synthetic(1.0, 1.3) for _ in range(16)])
    assert [row["cause"] for row in named] == ["rope_unscaled"]
    assert named[0]["summary"].startswith("rope_unscaled: 16 records, each at 1.0x noise"), named[0]["summary"]


def test_each_record_keeps_its_own_threshold():
    """Past match_noise (3x) of its noise a record does not count for the deviation, however far exact math is."""
    assert pooled_diagnosis([synthetic(4.0, 8.0) for _ in range(16)]) == []


def test_evidence_pointing_both_ways_is_not_named():
    records = [synthetic(1.0, 1.3) for _ in range(8)] + [synthetic(1.3, 1.0) for _ in range(8)]
    assert pooled_diagnosis(records) == []


def test_too_few_records_are_not_pooled():
    assert pooled_diagnosis([synthetic(1.0, 3.0) for _ in range(2)]) == []


def test_the_committed_baseline_gets_no_pooled_diagnosis():
    cases = json.loads(calibrate.BASELINE.read_text())["cases"]
    assert cases and pooled_diagnosis(cases) == []


GUARD_CASES = ("batch", "small_rows", "past_8192")


def _diagnosed_as_failing(actual, expected, exact, predict) -> dict:
    a = as_float64(actual)
    return {"test": "clean", "passed": False,
            "diagnosis": diagnosis.diagnose(a, as_float64(expected), predict(),
                                            diagnosis.residual(as_float64(expected), as_float64(exact)),
                                            as_float64(exact))}


def test_a_clean_bfloat16_run_diagnosed_everywhere_gets_no_pooled_diagnosis(request, impl, impl_factory):
    dtype, mesh = "bfloat16", "1x1"
    records = []
    for case in GUARD_CASES:
        batch, seq, start_pos, kind = CASES[case]
        adapter = case_subject(request, impl, impl_factory, mesh, dtype, case, "logits", "meta")
        logits, taps = adapter.forward(support.tokens(batch, seq, seed=16), start_pos=start_pos, capture=True)
        (ref_logits, ref_taps), (exact_logits, exact_taps) = support.full_forward("meta", dtype, batch, seq,
                                                                                  start_pos, kind)

        def predict(select):
            return support.diagnosis(dtype, mesh, lambda config, variant: select(support.oracle_forward(
                config, variant, dtype, batch, seq, start_pos, kind)))

        records.append(_diagnosed_as_failing(logits, ref_logits, exact_logits, predict(lambda out: out[0])))
        for name in ("layers.0.q_rope", "layers.0.k_rope", "layers.1.attention_out"):
            records.append(_diagnosed_as_failing(taps[name], ref_taps[name], exact_taps[name],
                                                 predict(lambda out, name=name: out[1][name])))
    assert pooled_diagnosis(records) == [], pooled_diagnosis(records)


def test_a_planted_unscaled_rope_at_bfloat16_is_named_by_the_pool(request):
    """Through test_logits' checks on the canonical and small-row weights, positions 0.. and 9000.."""
    dtype, mesh = "bfloat16", "1x1"
    scratch = support.scratch_request(request.config)
    for case in GUARD_CASES:
        batch, seq, start_pos, kind = CASES[case]
        adapter = UnscaledRoPEAdapter.build(support.CONFIG, support.weight_set(kind), make_mesh(mesh), dtype)
        for check in (check_logits, check_intermediates):
            try:
                check(scratch, adapter, "meta", dtype, mesh, case)
            except AssertionError:
                pass
    records = [value for key, value in scratch.node.user_properties if key == RECORD_KEY]
    alone = [r["diagnosis"]["cause"] for r in records if r.get("diagnosis")]
    assert alone.count(None) >= 2, f"the single-record diagnoses already name it: {alone}"
    named = pooled_diagnosis(records)
    assert named and named[0]["cause"] == "rope_unscaled", named


@pytest.mark.e2e
def test_the_planted_adapter_run_through_impl_gets_the_pooled_diagnosis(tmp_path):
    """The same through `pytest --impl`, as a user runs it: the JSON's pooled_diagnosis and the summary name it."""
    out = tmp_path / "parity.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               "conformance/test_logits.py", "--impl", "examples.planted:UnscaledRoPEAdapter", "--dtype", "bfloat16",
               "--reference", "meta", "--mesh", "1x1", "--parity-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    pooled = json.loads(out.read_text())["pooled_diagnosis"]
    assert pooled and pooled[0]["cause"] == "rope_unscaled", pooled
    assert "pooled diagnosis (the failing records together):\n  rope_unscaled: " in done.stdout, done.stdout[-3000:]
