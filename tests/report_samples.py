"""A sample --parity-json document with every kind of record the report shows, for the report's own tests."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from conformance.plugin import battery_modules
from parity import assert_parity
from parity.check import RECORD_KEY
from parity.environment import json_safe
from parity.tolerances import bounds_for

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["verdict", "matrix", "depth", "records", "generation", "environment"]
ENV_PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "llama-models", "fairscale", "tiktoken")


# ---- the sample document --------------------------------------------------------------------------------

def stand_in(nodeid: str) -> SimpleNamespace:
    """Just what the record helpers of parity.check read from pytest's request fixture."""
    options = {"tolerance_profile": "default"}
    return SimpleNamespace(config=SimpleNamespace(getoption=lambda name, default=None: options.get(name, default)),
                           node=SimpleNamespace(nodeid=nodeid, user_properties=[]))


def sample_records(nodeid: str, checks: list[dict]) -> list[dict]:
    """Run assert_parity for each check under a stand-in request; keep every record, failing ones included."""
    request = stand_in(nodeid)
    for check in checks:
        try:
            assert_parity(request, **check)
        except AssertionError:
            pass
    return [value for key, value in request.node.user_properties if key == RECORD_KEY]


def scaled(rel: float, oracle_rel: float | None = None, logits: bool = False) -> dict:
    """actual = x * (1 + rel): rel_l2 is exactly |rel| and pcc/cosine exactly 1, so margins are known by hand.

    With oracle_rel, the reference is x * (1 + oracle_rel) and the oracle x, so noise_ratio = rel / oracle_rel.
    """
    x = np.random.default_rng(7).standard_normal((3, 32))
    if oracle_rel is None:
        return dict(actual=x * (1 + rel), expected=x, logits=logits)
    return dict(actual=x * (1 + rel), expected=x * (1 + oracle_rel), oracle=x, logits=logits)


def bound(component: str, dt: str, metric: str, ref: str = "meta", mesh_text: str = "1x4") -> float:
    """The table's current bound, so the sample's margins stay what these tests expect when the table moves."""
    return bounds_for(component, dt, "default", reference=ref, mesh=mesh_text)[metric]


def scope_of(component, ref, dt, mesh_text, **kw):
    return dict(component=component, reference=ref, dtype=dt, mesh=mesh_text, **kw)


LAYERED = "conformance/test_intermediate.py::test_every_layer"
PLANTED = "conformance/test_mutations.py::test_planted_bug_is_caught"
FAILING = "conformance/test_mlp.py::test_mlp[meta-float32-1x4]"
LONG = "conformance/test_logits.py::test_logits[meta-bfloat16-1x4-long]"
NAN = "conformance/test_rope.py::test_rope[meta-float32-1x4]"
GEN = "conformance/test_generation.py::test_greedy[meta-float32-1x4]"
GEN_SAME = "conformance/test_generation.py::test_mesh_generates_like_single_chip[long-float32-1x4]"
PROPERTY = "conformance/test_properties.py::test_component_matches_oracle[{}]"
METAMORPHIC = "conformance/test_metamorphic.py::test_meshes_agree_with_single_chip"
TP = "conformance/test_tp_invariance.py::test_meshes_agree_with_single_chip[{}-{}]"
ALIKE = "conformance/test_generation.py::test_references_generate_alike[{}-batch]"
IMPL_TEST = "conformance/test_impl.py::test_impl_intermediates[meta-float32-1x4-batch]"
TOKENS_IMPL = [11, 42, 42, 7, 99, 3]
TOKENS_REF = [11, 42, 42, 8, 5, 3]
DRAWN_MESHES = ["2x1", "2x2", "4x1", "4x2", "8x1"]  # drawn by property tests only: folded into one column
TP_MESHES = ["1x2", "1x4", "1x8", "2x4"]  # named by test_tp_invariance's ids: columns of their own
BATTERY = battery_modules()  # the sample ran 9 of its modules, and two modules outside it
IMPLEMENTATION = {"factory": "tp_llama.adapter:TPLlamaAdapter", "package": "tp-llama-conformance", "version": "0.4.0"}
HYPOTHESES = [
    {"name": "rope_unscaled", "description": "Llama 3.1 RoPE frequency scaling not applied", "residual": 2.1e-07,
     "matched": True},
    {"name": "rope_bf16_phase", "description": "RoPE phases computed in bfloat16", "residual": 0.31,
     "matched": False},
    {"name": "gate_up_swapped", "description": "w1 and w3 swapped in the MLP", "residual": 0.97, "matched": False}]


def diagnosis(cause: str | None, summary: str, matched: str | None = None) -> dict:
    """A diagnosis as the engine will write it (record.schema.json): `matched` names the hypothesis that fits."""
    return {"cause": cause, "summary": summary,
            "hypotheses": [{**h, "matched": h["name"] == matched} for h in HYPOTHESES]}


def sample_document() -> dict:
    """A --parity-json document exercising every section of the report."""
    records = []
    records += sample_records("conformance/test_mlp.py::test_mlp[meta-float32-1x1]", [
        {**scope_of("mlp", "meta", "float32", "1x1"), **scaled(0.5 * bound("mlp", "float32", "rel_l2"))}])
    records += sample_records(FAILING, [
        {**scope_of("mlp", "meta", "float32", "1x4"), **scaled(3 * bound("mlp", "float32", "rel_l2"))}])  # fails
    records[-1]["diagnosis"] = diagnosis("gate_up_swapped", "probable cause: w1 and w3 swapped in the MLP - "
                                         "matches rel_l2 4.0e-08", matched="gate_up_swapped")
    records += sample_records("conformance/test_mlp.py::test_mlp[hf-bfloat16-1x4]", [
        {**scope_of("mlp", "hf", "bfloat16", "1x4"), **scaled(0.05 * bound("mlp", "bfloat16", "rel_l2", "hf"))}])
    records += sample_records(NAN, [
        {**scope_of("rope", "meta", "float32", "1x4", name="q"), "actual": np.array([1.0, np.nan]),
         "expected": np.array([1.0, 2.0])}])                                    # NaN: error, fails, not diagnosed
    records += sample_records(PLANTED, [  # bugs planted on purpose and caught by their test: not failures of the run
        {**scope_of("attention", "hf", "float32", "1x4", name="planted"), **scaled(0.5)},
        {**scope_of("intermediate", "meta", "float32", "1x1", name="layers.3.block_out"), **scaled(0.5)}])
    records += sample_records("conformance/test_logits.py::test_logits[meta-float32-1x4]", [
        {**scope_of("logits", "meta", "float32", "1x4"), **scaled(0.1 * bound("logits", "float32", "rel_l2"),
                                                                 logits=True)}])
    # a forward that goes wrong at layer 1: the first failing tensor is layers.1.q_rope, two causes recorded
    long_rel = bound("intermediate", "bfloat16", "rel_l2", "meta", "1x4")
    records += sample_records(LONG, [
        {**scope_of("intermediate", "meta", "bfloat16", "1x4", name=name), **scaled(share * long_rel)}
        for name, share in (("layers.0.q_rope", 0.1), ("layers.1.q_rope", 5.0), ("layers.1.block_out", 4.0))])
    records[-2]["diagnosis"] = diagnosis("rope_unscaled", "probable cause: Llama 3.1 RoPE scaling not applied - "
                                         "matches rel_l2 2.1e-07", matched="rope_unscaled")
    records[-1]["diagnosis"] = diagnosis(None, "no known cause (closest: rope_bf16_phase, residual 0.31)")
    checks = []
    for ref, share in (("meta", 0.01), ("hf", 0.02)):
        for dt in ("float32", "bfloat16"):
            for mesh_text, mesh_factor in (("1x1", 1.0), ("1x4", 1.5)):
                for layer in range(4):
                    rel = share * bound("intermediate", dt, "rel_l2", ref, mesh_text) * mesh_factor * (layer + 1)
                    ratio = bound("intermediate", dt, "noise_ratio", ref, mesh_text) * (0.2 + 0.05 * layer)
                    checks.append({**scope_of("intermediate", ref, dt, mesh_text, name=f"layers.{layer}.block_out"),
                                   **scaled(rel, oracle_rel=rel / ratio)})
    records += sample_records(LAYERED, checks)
    for dt in ("float32", "bfloat16"):
        for mesh_text in TP_MESHES:  # the mesh is a parameter of the test id: a chosen mesh
            records += sample_records(TP.format(mesh_text, dt), [
                {**scope_of("tp_invariance", "1x1", dt, mesh_text, name="logits"),
                 **scaled(0.1 * bound("tp_invariance", dt, "rel_l2", "1x1", mesh_text), logits=True)}])
        for i, mesh_text in enumerate(DRAWN_MESHES + ["1x4"]):  # drawn by hypothesis; 1x4 is also chosen
            oracle_rel = 1e-3
            records += sample_records(PROPERTY.format("rmsnorm"), [
                {**scope_of("property", "meta", dt, mesh_text, name=f"case{i}.rmsnorm.out"),
                 **scaled(oracle_rel * (0.3 + 0.1 * i), oracle_rel=oracle_rel)}])
        records += sample_records(METAMORPHIC, [
            {**scope_of("tp_invariance", "1x1", dt, "2x2", name="case0.logits"),
             **scaled(0.2 * bound("tp_invariance", dt, "rel_l2", "1x1", "2x2"), logits=True)}])
        records += sample_records(ALIKE.format(dt), [  # references against each other: no mesh
            {**scope_of("generation", "hf", dt, None, name="greedy"), **scaled(0.0, logits=True)}])
    gap = 0.2 * bound("generation", "float32", "logprob_gap")
    generation = sample_records(GEN, [{**scope_of("generation", "meta", "float32", "1x4", name="greedy"),
                                 **scaled(0.0, logits=True), "extra_metrics": {"logprob_gap": gap}}])
    generation[0]["generation"] = {
        "case": "short", "start_pos": 0, "actual_engine": "tp_llama 1x4", "expected_engine": "meta", "rows": [
            {"prompt": 0, "prompt_length": 5, "actual_tokens": TOKENS_IMPL, "expected_tokens": TOKENS_REF,
             "first_divergence": 3, "topk_actual": [[7, -0.69], [8, -0.70], [2, -3.1]],
             "topk_expected": [[8, -0.68], [7, -0.71]],
             "actual_text": "The cat cat sat on.", "expected_text": "The cat cat sits here."},
            {"prompt": 1, "prompt_length": 3, "actual_tokens": [5, 6], "expected_tokens": [5, 6],
             "first_divergence": -1, "topk_actual": None, "topk_expected": None}]}
    same = sample_records(GEN_SAME, [{**scope_of("generation", "1x1", "float32", "1x4", name="greedy"),
                                **scaled(0.0, logits=True)}])
    same[0]["generation"] = {
        "case": "long", "start_pos": 8, "actual_engine": "tp_llama 1x4", "expected_engine": "tp_llama 1x1",
        "rows": [{"prompt": 0, "prompt_length": 4, "actual_tokens": [9, 9, 1], "expected_tokens": [9, 9, 1],
                  "first_divergence": -1, "topk_actual": None, "topk_expected": None}]}
    records += same
    records += generation
    nodeids = list(dict.fromkeys(r["test"] for r in records))
    tests = [{"nodeid": n, "outcome": "passed", "message": None} for n in nodeids]
    for test in tests:
        if test["nodeid"] == FAILING:
            test.update(outcome="failed", message="AssertionError: parity failed for component 'mlp'")
        if test["nodeid"] == NAN:
            test.update(outcome="failed", message="AssertionError: actual has 1 NaN/Inf of 2")
        if test["nodeid"] == LONG:
            test.update(outcome="failed", message="AssertionError: parity failed for component 'intermediate': "
                                                  "2 of 3 named tensors, first failing 'layers.1.q_rope'")
    reason = "not checked: SimpleLlamaAdapter does not capture 2 of 20 intermediates (layers.0.q_rope, ...)"
    tests += [
        {"nodeid": "conformance/test_block.py::test_block[meta-float32-1x4]", "outcome": "error",
         "message": "RuntimeError: fixture broke <script>alert(1)</script>"},
        {"nodeid": "conformance/test_block.py::test_block_slow", "outcome": "skipped", "message": "needs -m slow"},
        {"nodeid": "conformance/test_block.py::test_known_gap", "outcome": "xfailed", "message": "known gap"},
        {"nodeid": IMPL_TEST, "outcome": "skipped", "message": reason},
    ]
    not_checked = [{"test": IMPL_TEST, "component": "intermediate", "name": f"layers.{i}.q_rope", "layer": i,
                    "reference": "meta", "dtype": "float32", "mesh": "1x4", "reason": reason} for i in (0, 1)]
    environment = {
        "python": "3.11.7", "python_implementation": "CPython", "platform": "Linux-6.1-x86_64-with-glibc2.36",
        "implementation": IMPLEMENTATION,
        "versions": {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "torch": "2.13.0+cpu",
                     "transformers": "5.24.0", "llama-models": "0.3.0", "fairscale": "0.4.13", "tiktoken": "0.14.0",
                     "numpy": "2.4.6", "pytest": "9.2.0", "pytest-xdist": None},
        "devices": {"platform": "cpu", "kind": "cpu", "count": 8, "process_count": 1},
        "tolerance_profile": "default", "seeds": {"weights": 0}, "xdist_workers": 2,
        "battery": BATTERY, "meshes": ["1x1", "1x4"], "dtypes": ["float32", "bfloat16"], "references": ["meta", "hf"],
        "selection": {"markexpr": "not slow", "keyword": ""}, "mutant": None, "checkpoint_dir": None,
        "started_at": "2026-11-28T12:00:00+00:00", "wall_time_s": 123.4,
    }

    return json.loads(json.dumps(json_safe({"environment": environment, "exitstatus": 1, "records": records,
                                            "not_checked": not_checked, "tests": tests})))


# ---- a small DOM over the stdlib parser ----------------------------------------------------------------------
