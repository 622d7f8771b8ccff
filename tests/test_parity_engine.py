"""The parity engine itself: metrics on hand-computed cases, the tolerance lookup, the assertion messages,
and the plugin's JSON under pytest-xdist.

These tests judge the judge, so they use a stand-in for pytest's `request`: records of deliberately failing
comparisons must not land in the suite's own parity JSON. (No argument here may be named `mesh`, `dtype` or
`reference`: the repo conftest parametrizes those.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import parity.tolerances as tol
from parity import assert_parity, assert_parity_many, compute_metrics
from parity import metrics as pm
from parity.check import RECORD_KEY, budget_used, format_value, layer_of, mesh_name, record_token_ids
from parity.schema import load_schema, validate
from parity.summary import cause_lines

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def fake_request(profile: str = "default", nodeid: str = "conformance/test_x.py::test_y"):
    """Just what assert_parity reads from pytest's request fixture."""
    options = {"tolerance_profile": profile}
    config = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default))
    return SimpleNamespace(config=config, node=SimpleNamespace(nodeid=nodeid, user_properties=[]))


def check(req, actual, expected, **kw):
    """assert_parity with the scope fields defaulted, so each test states only what it varies."""
    args = dict(component="mlp", reference="meta", dtype="float32", mesh="1x4")
    args.update(kw)
    return assert_parity(req, actual=actual, expected=expected, **args)


# ---- metrics -------------------------------------------------------------------------------------------

def test_max_abs_and_rel_l2_by_hand():
    b, a = np.array([3.0, 4.0]), np.array([3.0, 4.5])
    assert pm.max_abs(a, b) == 0.5
    assert pm.rel_l2(a, b) == pytest.approx(0.5 / 5.0)


def test_rel_l2_of_zero_reference():
    zero = np.zeros(3)
    assert pm.rel_l2(zero, zero) == 0.0
    assert pm.rel_l2(np.array([0.0, 1e-30, 0.0]), zero) == math.inf


def test_pcc_and_cosine_by_hand():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): cov 3, norms sqrt(2) and sqrt(42)/3
    assert pm.pcc(a, b) == pytest.approx(9 / math.sqrt(84))
    assert pm.cosine(a, b) == pytest.approx(17 / (math.sqrt(14) * math.sqrt(21)))
    assert pm.cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    assert pm.pcc(np.ones(4), np.ones(4)) == 1.0
    assert pm.pcc(np.ones(4), np.arange(4.0)) == 0.0


def test_scale_error_passes_pcc_but_fails_rel_l2():
    """docs/architecture.md#prior-art: PCC is blind to scale. A doubled output must still fail."""
    b = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    values = compute_metrics(2 * b, b)
    assert values["pcc"] == pytest.approx(1.0)
    assert values["cosine"] == pytest.approx(1.0)
    assert values["rel_l2"] == pytest.approx(1.0)
    req = fake_request()
    with pytest.raises(AssertionError) as info:
        check(req, 2 * b, b)
    bound = tol.bounds_for("mlp", "float32", "default")["rel_l2"]
    assert f"rel_l2 = 1.000e+00 > {bound:.3e}" in str(info.value)
    assert "pcc" not in str(info.value) and "cosine" not in str(info.value)


def test_worst_index_is_a_tuple_of_ints():
    b = np.zeros((2, 3, 4))
    a = b.copy()
    a[1, 2, 0], a[0, 0, 1] = -5.0, 1.0
    index = pm.worst_index(a, b)
    assert index == (1, 2, 0) and all(type(i) is int for i in index)
    a[0, 1, 1] = np.nan  # NaN is the worst place of all
    assert pm.worst_index(a, b) == (0, 1, 1)


def test_bfloat16_and_shapes():
    b = np.linspace(-2, 2, 12).reshape(3, 4)
    a = b.astype(ml_dtypes.bfloat16)
    assert pm.rel_l2(a, b) == pytest.approx(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))
    assert 0 < pm.rel_l2(a, b) <= pm.UNIT_ROUNDOFF["bfloat16"]
    with pytest.raises(ValueError, match="shape mismatch"):
        pm.rel_l2(b, b.T)


def test_kl_by_hand_and_shift_invariant():
    # reference uniform over 2 tokens, implementation (3/4, 1/4): KL = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3)
    b = np.array([[0.0, 0.0], [1.0, 2.0]])
    a = np.array([[math.log(3.0), 0.0], [1.0, 2.0]])
    assert pm.kl(a, b) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert pm.kl(a + 1e4, b - 1e4) == pytest.approx(pm.kl(a, b), rel=1e-9)  # stable at large logits
    assert pm.kl(b, b) == 0.0


def test_top1_and_topk_overlap_on_constructed_logits():
    b = np.array([[5.0, 1, 0], [0, 5, 1], [1, 0, 5], [5, 0, 1]])
    a = b.copy()
    a[3] = [0, 5, 1]  # one of four positions chooses another token
    assert pm.top1(a, b) == 0.75
    ref = -np.arange(10.0)  # top-5 of the reference: tokens 0..4
    impl = ref.copy()
    impl[9], impl[4] = 10.0, -20.0  # implementation's top-5: 9, 0, 1, 2, 3
    assert pm.topk_overlap(impl[None], ref[None], k=5) == pytest.approx(0.8)
    assert pm.topk_overlap(ref[None, :3], ref[None, :3], k=5) == 1.0  # k larger than vocab


def test_logits_metrics_only_when_asked():
    x = np.random.default_rng(1).normal(size=(3, 7))
    assert {"kl", "top1", "topk_overlap"}.isdisjoint(compute_metrics(x, x))
    assert {"kl", "top1", "topk_overlap"} <= set(compute_metrics(x, x, logits=True))
    assert all(type(v) is float for v in compute_metrics(x, x, logits=True, oracle=x).values())


def test_logprob_gap():
    logits = np.array([2.0, 1.5, -1.0])
    assert pm.logprob_gap(logits, 0, 1) == pytest.approx(0.5)


def test_noise_ratio_and_its_floor():
    oracle = np.linspace(1.0, 2.0, 16)
    expected, actual = oracle * (1 + 1e-3), oracle * (1 + 2e-3)
    assert pm.noise_ratio(actual, expected, oracle) == pytest.approx(2.0)
    # an exactly-equal reference divides by the dtype's unit roundoff instead of zero
    off = oracle * (1 + 2.0 ** -20)
    assert pm.noise_ratio(off, oracle, oracle, dtype="float32") == pytest.approx(2.0 ** -20 / 2.0 ** -24)
    assert pm.noise_ratio(off, oracle, oracle, dtype="bfloat16") == pytest.approx(2.0 ** -20 / 2.0 ** -8)
    assert pm.dtype_resolution(ml_dtypes.bfloat16) == 2.0 ** -8


def test_nonfinite_detection():
    good, bad = np.ones(4), np.array([1.0, np.inf, np.nan, 1.0])
    assert pm.check_finite(good, good) is None
    assert pm.nonfinite_count(bad) == 2
    message = pm.check_finite(good, bad)
    assert message.startswith("expected has 2 NaN/Inf") and "(1,)" in message


@pytest.mark.parametrize("side", ["actual", "expected"])
def test_nan_fails_always(side):
    """Even with nothing else to judge (a component whose bounds match no computed metric)."""
    x = np.ones((2, 2), np.float32)
    y = x.copy()
    y[0, 1] = np.nan
    pair = {"actual": y, "expected": x} if side == "actual" else {"actual": x, "expected": y}
    req = fake_request()
    with pytest.raises(AssertionError, match=f"{side} has 1 NaN/Inf"):
        check(req, component="generation", **pair)  # generation bounds only logits metrics
    assert req.node.user_properties[0][1]["passed"] is False


# ---- tolerance table -----------------------------------------------------------------------------------

def test_table_is_complete_and_directed():
    for component in tol.COMPONENTS:
        for name in tol.DTYPES:
            entry = tol.TABLE[(component, name)]
            assert set(entry) - {tol.MEASURED} == set(tol.PROFILES)  # `measured` is data beside the profiles
            for bounds in (entry[profile] for profile in tol.PROFILES):
                assert set(bounds) <= set(tol.DIRECTION), (component, name, set(bounds) - set(tol.DIRECTION))
    assert set(tol.SLACK) == {m for m, d in tol.DIRECTION.items() if d != tol.PARAM}


def test_strict_is_never_looser_than_default():
    for key, entry in tol.TABLE.items():
        strict, default = entry["strict"], entry["default"]
        for metric, bound in default.items():
            if tol.DIRECTION[metric] == tol.UPPER:
                assert strict[metric] <= bound, (key, metric)
            elif tol.DIRECTION[metric] == tol.LOWER:
                assert strict[metric] >= bound, (key, metric)


def test_bounds_for_base_and_profile():
    for profile in tol.PROFILES:
        assert tol.bounds_for("rmsnorm", "float32", profile) == tol.TABLE[("rmsnorm", "float32")][profile]
    with pytest.raises(KeyError, match="no tolerance entry"):
        tol.bounds_for("rmsnorm", "float16", "default")
    with pytest.raises(KeyError, match="no profile"):
        tol.bounds_for("rmsnorm", "float32", "lenient")


def test_bounds_for_joins_scoped_overrides():
    table = {("mlp", "float32"): {"default": {"rel_l2": 1e-5, "pcc": 0.999}}}
    overrides = [
        {"match": {"component": "mlp", "reference": "hf"}, "bounds": {"rel_l2": 3e-5}},
        {"match": {"component": "mlp", "reference": "hf", "mesh": "1x*"}, "bounds": {"rel_l2": 5e-5}},
        {"match": {"mesh": "2x2"}, "bounds": {"pcc": 0.99}},
        {"match": {"component": "mlp", "profile": "strict"}, "bounds": {"rel_l2": 1e-9}},
    ]
    def look(**kw):
        return tol.bounds_for("mlp", "float32", "default", table=table, overrides=overrides, **kw)

    assert look() == {"rel_l2": 1e-5, "pcc": 0.999}
    assert look(reference="meta") == {"rel_l2": 1e-5, "pcc": 0.999}
    assert look(reference="hf") == {"rel_l2": 3e-5, "pcc": 0.999}
    assert look(reference="hf", mesh="1x4") == {"rel_l2": 5e-5, "pcc": 0.999}  # most specific wins
    assert look(reference="hf", mesh="2x2") == {"rel_l2": 3e-5, "pcc": 0.99}
    assert table[("mlp", "float32")]["default"] == {"rel_l2": 1e-5, "pcc": 0.999}  # the table is not mutated


def test_live_overrides_apply():
    meta = tol.bounds_for("rope", "bfloat16", "default", reference="meta")
    hf = tol.bounds_for("rope", "bfloat16", "default", reference="hf")
    assert hf["rel_l2"] > meta["rel_l2"] and hf["pcc"] == meta["pcc"]
    assert all("why" in o for o in tol.OVERRIDES)


def test_slack_limits():
    assert tol.slack_limit("rel_l2", 1e-6) == pytest.approx(1.5e-6 + 1e-7)
    assert tol.slack_limit("pcc", 0.9999) == pytest.approx(0.9999 - 1e-6)


def test_budget_used():
    assert budget_used("rel_l2", 5e-6, 1e-5) == pytest.approx(0.5)
    assert budget_used("pcc", 0.998, 0.999) == pytest.approx(2.0)
    assert budget_used("top1", 1.0, 1.0) == 0.0 and budget_used("top1", 0.9, 1.0) == math.inf
    assert budget_used("kl", float("nan"), 1.0) == math.inf


# ---- assertion helpers ---------------------------------------------------------------------------------

def test_passing_check_returns_and_records():
    x = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
    req = fake_request(nodeid="conformance/test_mlp.py::test_mlp[meta-float32-1x4]")
    record = check(req, x, x, oracle=x.astype(np.float64), name="layers.3.mlp_out")
    assert req.node.user_properties == [("parity_record", record)]
    assert record["passed"] and record["layer"] == 3 and record["mesh"] == "1x4"
    assert record["test"] == "conformance/test_mlp.py::test_mlp[meta-float32-1x4]"
    assert set(record) >= {"test", "component", "layer", "reference", "dtype", "mesh", "metrics", "bounds",
                           "passed", "name", "worst_index"}
    assert "noise_ratio" in record["metrics"] and "kl" not in record["metrics"]


def test_failure_message_names_everything():
    b = np.zeros((2, 3, 4), np.float32)
    b[...] = np.linspace(0.5, 1.5, 24).reshape(b.shape)
    a = b.copy()
    a[0] *= -1  # sign bug in one batch row: worst where |b| is largest there, b[0, 2, 3] = 45/46
    req = fake_request(profile="strict")
    with pytest.raises(AssertionError) as info:
        check(req, a, b, component="attention", reference="hf", dtype="bfloat16", mesh=(1, 4), layer=1,
              name="layers.1.q_rope")
    text = str(info.value)
    for part in ("component 'attention'", "name 'layers.1.q_rope'", "layer 1", "reference=hf",
                 "dtype=bfloat16", "mesh=1x4", "profile=strict", "rel_l2 = ", "> 2.000e-02 (upper bound)",
                 "pcc = ", "< 0.999 (lower bound)", "cosine = ", "at index (0, 2, 3)", "actual = -0.978261",
                 "expected = 0.978261"):
        assert part in text, (part, text)
    shown = [entry.name for entry in info.traceback.filter(info)]  # what pytest prints
    assert "assert_parity" not in shown and shown[-1] == "check"  # __tracebackhide__: the caller's line


def test_shape_mismatch_fails_and_is_recorded():
    req = fake_request()
    with pytest.raises(AssertionError, match=r"shape mismatch: actual \(2, 3\) vs expected \(3, 2\)"):
        check(req, np.ones((2, 3)), np.ones((3, 2)))
    assert req.node.user_properties[0][1]["error"].startswith("shape mismatch")


def test_logits_use_the_table_topk():
    rng = np.random.default_rng(3)
    b = rng.normal(size=(4, 50)) * 3
    record = check(fake_request(), b, b, component="logits", logits=True)
    assert record["metrics"]["top1"] == 1.0 and record["bounds"]["topk"] == 5


def test_extra_metrics_are_judged():
    x = np.random.default_rng(4).normal(size=(2, 9))
    with pytest.raises(AssertionError, match="logprob_gap = 2.000e\\+00 > 1.000e-03"):
        check(fake_request(), x, x, component="generation", logits=True, extra_metrics={"logprob_gap": 2.0})


def test_many_records_all_and_lists_every_failure():
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    names = [f"layers.{i}.{part}" for i in range(3) for part in ("q_rope", "attention_out")]
    expected = {n: x for n in names}
    actual = dict(expected)
    actual["layers.1.q_rope"] = x * 1.01
    actual["layers.2.attention_out"] = x[::-1]
    del actual["layers.0.attention_out"]
    req = fake_request()
    with pytest.raises(AssertionError) as info:
        assert_parity_many(req, component="intermediate", actual=actual, expected=expected, reference="meta",
                           dtype="float32", mesh="1x1")
    text = str(info.value)
    assert "2 of 5 named tensors, first failing 'layers.1.q_rope'" in text
    assert "layers.1.q_rope (layer 1): rel_l2" in text and "layers.2.attention_out (layer 2):" in text
    assert "missing in actual: layers.0.attention_out" in text
    records = [r for _, r in req.node.user_properties]
    assert [r["name"] for r in records] == [n for n in names if n != "layers.0.attention_out"]
    assert [r["layer"] for r in records] == [0, 1, 1, 2, 2]


def test_tokenizer_record_counts_compared_and_differing_ids():
    """One record per tokenizer check, passed exactly when every id agrees: a planted differing id, a missing id
    and a later input that differs each fail, counted and located; the counts print as integers."""
    req = fake_request(nodeid="conformance/test_tokenizer.py::test_corpus_ids_match_meta[english]")
    same = record_token_ids(req, name="english", actual=[[791, 4062]], expected=[[791, 4062]], reference="meta")
    assert same == {"test": req.node.nodeid, "component": "tokenizer", "name": "english", "layer": None,
                    "reference": "meta", "dtype": "tokenizer", "mesh": None,
                    "metrics": {"token_ids": 2.0, "differing_ids": 0.0, "first_difference": -1.0}, "bounds": {},
                    "passed": True, "failed_metrics": [], "worst_index": [], "worst": None, "error": None}
    planted = record_token_ids(req, name="planted", actual=[[1, 2, 9, 4, 5]], expected=[[1, 2, 3, 4, 5]],
                               reference="meta")
    assert not planted["passed"]
    assert planted["metrics"] == {"token_ids": 5.0, "differing_ids": 1.0, "first_difference": 2.0}
    assert planted["error"] == ("1 of 5 ids differ; input 0 of 1 differs from position 2 (lengths 5 and 5); around "
                                "it actual [1, 2, 9, 4, 5], expected [1, 2, 3, 4, 5]")
    shorter = record_token_ids(req, name="short", actual=[[1, 2]], expected=[[1, 2, 3]], reference="meta")
    assert shorter["metrics"] == {"token_ids": 3.0, "differing_ids": 1.0, "first_difference": 2.0}
    later = record_token_ids(req, name="many", actual=[[1], [2, 3], [4]], expected=[[1], [2, 7], [5]],
                             reference="meta")
    assert later["metrics"] == {"token_ids": 4.0, "differing_ids": 2.0, "first_difference": 1.0}
    assert "input 1 of 3 differs from position 1" in later["error"]
    assert [v for k, v in req.node.user_properties if k == RECORD_KEY] == [same, planted, shorter, later]
    with pytest.raises(ValueError, match="2 actual id lists for 1 expected"):
        record_token_ids(req, name="bad", actual=[[1], [2]], expected=[[1]], reference="meta")
    assert (format_value("token_ids", 5.0), format_value("first_difference", -1.0)) == ("5", "-1")
    assert format_value("rel_l2", 1.0) == "1.000e+00"


def test_helpers_parse_names():
    assert layer_of("layers.12.feed_forward.w2") == 12 and layer_of("norm") is None
    assert layer_of("model.layers.0") == 0 and layer_of("sublayers.3.x") is None
    assert mesh_name((2, 4)) == "2x4" and mesh_name("1x4") == "1x4" and mesh_name(None) is None
    assert mesh_name(SimpleNamespace(shape={"data": 1, "model": 8})) == "1x8"


# ---- plugin and JSON under xdist -----------------------------------------------------------------------

INNER_CONFTEST = """
pytest_plugins = ["parity.plugin"]


def pytest_addoption(parser):
    # Where the suite is installed as a package, its pytest11 entry point (conformance.plugin) declares these already.
    for name in ("--tolerance-profile", "--parity-json"):
        try:
            parser.addoption(name, default="default" if name == "--tolerance-profile" else None)
        except ValueError:
            pass
"""

INNER_TESTS = """
import numpy as np
import pytest

from parity import assert_parity, assert_parity_many

X = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
SCOPE = dict(reference="meta", dtype="float32", mesh="1x4")


@pytest.mark.parametrize("i", range(12))
def test_pass(request, i):
    for j in range(3):
        assert_parity(request, component="rmsnorm", actual=X, expected=X, name=f"case{i}.{j}", **SCOPE)


def test_scale_bug(request):
    assert_parity(request, component="mlp", actual=2 * X, expected=X, name="scaled", **SCOPE)


def test_many(request):
    expected = {f"layers.{n}.attention_out": X for n in range(3)}
    actual = {**expected, "layers.1.attention_out": X + 1}
    assert_parity_many(request, component="intermediate", actual=actual, expected=expected, **SCOPE)


@pytest.fixture
def late_record(request):
    yield
    assert_parity(request, component="rope", actual=X, expected=X, name="teardown", **SCOPE)


def test_teardown_record(late_record):
    pass


def test_caught(request):
    with pytest.raises(AssertionError):
        assert_parity(request, component="mlp", actual=3 * X, expected=X, name="planted", **SCOPE)


def test_nan(request):
    assert_parity(request, component="mlp", actual=X * np.nan, expected=X, name="nan", **SCOPE)


def test_no_records():
    pass


def test_jax_devices():
    import jax

    assert jax.devices()


@pytest.mark.skip(reason="planned skip")
def test_skipped():
    pass


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_error(broken):
    pass


@pytest.mark.xfail(reason="known gap")
def test_xfail():
    assert False
"""


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [["-n", "2"], ["-p", "no:xdist"]], ids=["xdist2", "serial"])
def test_plugin_json_keeps_every_record(pytester, monkeypatch, workers):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    out = pytester.path / "parity.json"
    result = pytester.runpytest_subprocess(*workers, f"--parity-json={out}")
    result.assert_outcomes(passed=16, failed=3, skipped=1, errors=1, xfailed=1)
    if workers[0] == "-n":
        result.stdout.fnmatch_lines(["*2 workers*"])
    result.stdout.fnmatch_lines([
        "*parity summary*", "verdict: FAIL (4 failed/error of 22 tests)", "records: 39 passed, 4 failed",
        "*(1 failed records belong to tests that passed*", "*worst per component*",
        "  intermediate * rel_l2 = * (bound *, *x)  test_inner.py::test_many ?layers.1.attention_out?",
        "*error in test_inner.py::test_nan*", f"parity JSON: {out}"])

    document = json.loads(out.read_text())
    assert validate(document) == []
    records = document["records"]
    pairs = [(r["test"].split("::")[1], r["name"]) for r in records]
    expected = [(f"test_pass[{i}]", f"case{i}.{j}") for i in range(12) for j in range(3)]
    expected += [("test_scale_bug", "scaled"), ("test_teardown_record", "teardown"), ("test_caught", "planted"),
                 ("test_nan", "nan")]
    expected += [("test_many", f"layers.{n}.attention_out") for n in range(3)]
    assert sorted(pairs) == sorted(expected)  # none lost, none duplicated across setup/call/teardown reports
    failed = {name for (_, name), r in zip(pairs, records) if not r["passed"]}
    assert failed == {"scaled", "planted", "nan", "layers.1.attention_out"}
    nan_record = next(r for r in records if r["name"] == "nan")
    assert nan_record["metrics"]["rel_l2"] == "NaN" and "NaN/Inf" in nan_record["error"]

    tests = {t["nodeid"].split("::")[1]: t for t in document["tests"]}
    assert len(tests) == 22
    assert tests["test_no_records"]["outcome"] == "passed" and tests["test_caught"]["outcome"] == "passed"
    assert tests["test_scale_bug"]["outcome"] == "failed"
    assert "rel_l2 = 1.000e+00 > " in tests["test_scale_bug"]["message"]
    assert tests["test_skipped"] == {"nodeid": "test_inner.py::test_skipped", "outcome": "skipped",
                                     "message": "planned skip"}
    assert tests["test_error"]["outcome"] == "error" and "fixture broke" in tests["test_error"]["message"]
    assert tests["test_xfail"]["outcome"] == "xfailed"

    env = document["environment"]
    assert env["tolerance_profile"] == "default" and env["wall_time_s"] > 0
    assert env["versions"]["numpy"] == np.__version__ and "llama-models" in env["versions"]
    assert env["devices"]["platform"] == "cpu" and env["devices"]["count"] >= 1
    assert env["xdist_workers"] == (2 if workers[0] == "-n" else 0)


def test_schema_rejects_malformed_documents():
    good = {"environment": {"python": "3.11", "platform": "x", "devices": None, "tolerance_profile": "default",
                            "wall_time_s": 1.0,
                            "versions": dict.fromkeys(("jax", "jaxlib", "flax", "torch", "transformers",
                                                       "llama-models", "fairscale", "tiktoken", "numpy"))},
            "records": [], "tests": [{"nodeid": "a::b", "outcome": "passed", "message": None}]}
    assert validate(good) == []
    bad = json.loads(json.dumps(good))
    bad["tests"][0]["outcome"] = "exploded"
    bad["records"].append({"test": "a::b", "passed": "yes"})
    errors = validate(bad)
    assert any("exploded" in e for e in errors) and any("passed" in e for e in errors)
    assert any("missing required 'component'" in e for e in errors)


def test_schema_agrees_with_jsonschema_when_installed():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_terminal_summary_lists_the_probable_causes_of_failing_records():
    """parity.summary.cause_lines: failing records grouped by diagnosis, as the report's causes summary; nothing
    when no failing record was diagnosed."""
    def failed(test, cause=None, diagnosed=True):
        diagnosis = {"cause": cause, "summary": "", "hypotheses": [
            {"name": cause or "x", "description": "RoPE scaling not applied", "residual": 1e-7,
             "matched": cause is not None}]}
        return {"test": test, "passed": False, "error": None, **({"diagnosis": diagnosis} if diagnosed else {})}

    records = [failed("t::a", "rope_unscaled"), failed("t::a", "rope_unscaled"), failed("t::b"),
               failed("t::c", diagnosed=False)]
    lines = cause_lines(records, {"t::a": "failed", "t::b": "failed", "t::c": "failed"})
    assert lines[0] == "probable causes (failing records / tests):"
    assert lines[1].split() == ["2", "/", "1", "rope_unscaled", "—", "RoPE", "scaling", "not", "applied"]
    assert [line.split()[3] for line in lines[2:]] == ["no", "not"]
    assert cause_lines([failed("t::c", diagnosed=False)], {"t::c": "failed"}) == []
