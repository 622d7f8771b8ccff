"""A fast subset of the planted-bug catalogue, killed in-process by the same checks the suite runs.

Each case plants one bug from conformance/mutants.py, runs one component check on a fresh model (compiled
functions are never shared with the unplanted runs) and requires the check to fail on the component the bug
lives in. A missing all-reduce is stopped earlier, by JAX itself: shard_map refuses to return as replicated a
value that was never summed over the model axis. `python -m conformance.kill_matrix` runs the whole catalogue against
the whole suite.
"""

import pytest

from adapters import protocol
from conformance import components, kill_matrix, mutants, support
from conformance.components import ATTENTION, EMBEDDING, MLP, RMSNORM, ROPE
from conformance.decode import check_kv_cache
from conformance.forward import CASES as FULL_CASES
from conformance.forward import check_intermediates
from llama_spec.layout import make_mesh
from llama_spec.synthetic import make_tokens
from tp_llama.adapter import TPLlamaAdapter
from tp_llama.model import TPLlama, program_config

# Tests of the built-in model's own code: under another --impl they are not checked.
pytestmark = pytest.mark.usefixtures("builtin_only")

PARITY = AssertionError

# mutant -> (mesh, dtype, component check (conformance.components), its case, expected failure, text it must
#            contain). kv grouping needs 1x1: on 1x4 each device holds one kv head.
NORM0 = dict(layer_index=0, which="attention_norm")
FAST = {
    "rope_unscaled": ("1x4", "float32", ROPE, dict(start_pos=9000), PARITY, "component 'rope'"),
    "rmsnorm_eps": ("1x4", "float32", RMSNORM, NORM0, PARITY, "component 'rmsnorm'"),
    "rmsnorm_no_upcast": ("1x4", "bfloat16", RMSNORM, NORM0, PARITY, "component 'rmsnorm'"),
    "kv_group_order": ("1x1", "float32", ATTENTION, dict(case="prefill", layer_index=0), PARITY,
                       "component 'attention'"),
    "softmax_bf16": ("1x1", "bfloat16", ATTENTION, dict(case="prefill128", layer_index=0), PARITY,
                     "component 'attention'"),
    "gate_up_swapped": ("1x4", "float32", MLP, dict(layer_index=0), PARITY, "component 'mlp'"),
    "vocab_shards_reversed": ("1x4", "float32", EMBEDDING, dict(seq=64), PARITY, "component 'embedding'"),
    # Fragile formulations: killed by the extremes cases (fixtures/extremes.py); the max-free softmax survives
    # every tame attention case (test_fragile_softmax_survives_tame_inputs).
    "softmax_no_max_subtraction": ("1x1", "float32", ATTENTION, dict(case="extreme", layer_index=1), PARITY,
                                   "component 'attention'"),
    "rmsnorm_square_in_activation_dtype": ("1x1", "bfloat16", RMSNORM, dict(NORM0, extreme="outliers"), PARITY,
                                           "component 'rmsnorm'"),
    # jax.shard_map's replication check raises inside the implementation: a failed record of the component.
    "missing_psum_wo": ("1x4", "float32", ATTENTION, dict(case="prefill", layer_index=1), PARITY,
                        r"component 'attention', layer 1: .*raised ValueError(?s:.)*replicat"),
}


# The deviations that pass unit-scale, short-prompt inputs in bfloat16, killed by the full forward on the inputs
# that reach them (conformance/test_logits.py CASES): mutant -> (mesh, case, text the failure must contain).
FULL_BF16 = {
    "rmsnorm_eps": ("1x1", "small_rows", "first failing 'layers.0.attention_norm'"),
    "rope_bf16_phases": ("1x1", "past_8192", "first failing 'layers.0.q_rope'"),
    "rope_unscaled": ("1x1", "past_8192", "first failing 'layers.0.q_rope'"),
}


def fresh_full_adapter(mesh_text, case):
    """A fresh built-in model (nothing compiled before the bug is planted) on the weight set of `case`."""
    return TPLlamaAdapter.build(support.CONFIG, support.weight_set(FULL_CASES[case][3]), make_mesh(mesh_text),
                                "bfloat16")


@pytest.mark.parametrize("name", sorted(FAST))
def test_planted_bug_is_killed(request, tp_model, name):
    mesh_text, run_dtype, component, case, failure, text = FAST[name]
    model, params = tp_model(mesh_text, run_dtype)
    fresh = TPLlamaAdapter(TPLlama(model.config, model.mesh, run_dtype), params)
    with mutants.planted(name), pytest.raises(failure, match=text):
        components.check(support.scratch_request(request.config), component, fresh, "meta", run_dtype, mesh_text,
                         **case)


@pytest.mark.parametrize("name", sorted(FULL_BF16))
def test_bf16_deviation_is_killed_by_the_full_forward(request, name):
    mesh_text, case, text = FULL_BF16[name]
    with mutants.planted(name), pytest.raises(AssertionError, match=text):
        check_intermediates(support.scratch_request(request.config), fresh_full_adapter(mesh_text, case), "meta",
                            "bfloat16", mesh_text, case)


def test_decode_only_bug_is_killed_by_the_cache_check(request, tp_model):
    model, params = tp_model("1x4", "float32")
    fresh = TPLlamaAdapter(TPLlama(model.config, model.mesh, "float32"), params)
    with mutants.planted("decode_cache_slot"), pytest.raises(AssertionError, match="component 'kv_cache'"):
        check_kv_cache(support.scratch_request(request.config), fresh, "float32", "1x4")


def test_unplanted_checks_pass(request, tp_model):
    """The same checks on the same fresh models pass without a bug: the failures above are the bugs'."""
    for mesh_text, run_dtype, component, case, _, _ in FAST.values():
        model, params = tp_model(mesh_text, run_dtype)
        components.check(support.scratch_request(request.config), component,
                         TPLlamaAdapter(TPLlama(model.config, model.mesh, run_dtype), params), "meta", run_dtype,
                         mesh_text, **case)
    for mesh_text, case in dict.fromkeys((m, c) for m, c, _ in FULL_BF16.values()):
        check_intermediates(support.scratch_request(request.config), fresh_full_adapter(mesh_text, case), "meta",
                            "bfloat16", mesh_text, case)


def test_catalogue_is_complete():
    assert len(mutants.MUTANTS) >= 12
    for mutant in mutants.MUTANTS.values():
        assert hasattr(mutant.target, mutant.attribute), f"{mutant.name} patches a missing {mutant.attribute}"


def test_fragile_softmax_survives_tame_inputs(request, tp_model):
    """Why the extremes exist: softmax without max subtraction passes the tame attention case (scores of std 3)
    and fails only where scores reach 100 (FAST above)."""
    model, params = tp_model("1x1", "float32")
    fresh = TPLlamaAdapter(TPLlama(model.config, model.mesh, "float32"), params)
    with mutants.planted("softmax_no_max_subtraction"):
        components.check(support.scratch_request(request.config), ATTENTION, fresh, "meta", "float32", "1x1",
                         case="cached",
                         layer_index=1)


def test_kill_margin_reads_the_killers_own_failing_records():
    """The kill matrix's margin: the worst failing metric's share of its bound; an error or an exact assertion
    (no failing record: a token stream, a stop-token set) has no bound to share, so it is infinite."""
    def record(test, passed, **fields):
        return {"test": test, "passed": passed, "name": "logits", **fields}

    failing = record("t::a", False, failed_metrics=["rel_l2", "kl"], metrics={"rel_l2": 3e-3, "kl": 1e-4},
                     bounds={"rel_l2": 1e-3, "kl": 1e-4})
    other = record("t::b", False, failed_metrics=["rel_l2"], metrics={"rel_l2": 1.0}, bounds={"rel_l2": 1e-3})
    metric, value, bound, margin, _ = kill_matrix.first_killer_margin({"records": [failing, other]}, "t::a")
    assert (metric, value, bound) == ("rel_l2", 3e-3, 1e-3) and margin == pytest.approx(3.0)
    raised = record("t::a", False, error="ValueError: shard_map", failed_metrics=[])
    assert kill_matrix.first_killer_margin({"records": [raised]}, "t::a")[::3] == ("error", float("inf"))
    passed = record("t::a", True, failed_metrics=[])
    assert kill_matrix.first_killer_margin({"records": [passed, other]}, "t::a")[::3] == ("exact", float("inf"))
    cell = kill_matrix.Cell(["t::a"], 1.0, metric="exact", margin=float("inf"))
    assert kill_matrix.verdict("stop_without_eot", "float32", cell) == "killed"
    assert kill_matrix.margin_text(cell) == "exact"


def test_a_planted_mutant_is_never_served_a_program_traced_without_it(tiny_config, tiny_weights):
    """Built-in models of one config, mesh and dtype share their traced programs; planting or removing a mutant
    must change which program runs, or every kill after the first clean trace would be a clean run."""
    import numpy as np


    tokens = make_tokens(tiny_config, 2, 12, seed=0)

    def logits():
        adapter = protocol.build(protocol.load(protocol.BUILTIN), tiny_config, tiny_weights, make_mesh("1x1"),
                                 "float32")
        return np.asarray(adapter.forward(tokens))

    clean = logits()
    with mutants.planted("rmsnorm_eps"):
        planted = logits()
    assert not np.array_equal(clean, planted), "the planted model ran the program traced before the mutant"
    assert np.array_equal(clean, logits()), "the clean model ran the program traced under the mutant"


def test_config_fields_left_out_of_the_program_key_leave_the_program_alone(tiny_config, tiny_weights):
    """A model read from a checkpoint has another max_seq_len (params.json has none) or multiple_of (config.json
    gives intermediate_size) and shares the suite's programs; that is right only if those fields reach no program."""
    import jax.numpy as jnp

    others = [tiny_config.replace(max_seq_len=131072, ffn_dim_multiplier=1.0),
              tiny_config.replace(multiple_of=tiny_config.hidden_dim)]
    assert all(program_config(c) == program_config(tiny_config) for c in others)
    assert program_config(tiny_config.replace(rope_theta=10000.0)) != program_config(tiny_config)
    tokens = jnp.zeros((2, 12), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))

    def programs(config) -> list[str]:
        adapter = TPLlamaAdapter.build(config, tiny_weights, make_mesh("1x4"), "float32")
        texts = []
        for with_cache in (False, True):
            cache = adapter.init_cache(2, 16) if with_cache else None
            program = adapter.model._build_sharded(True, with_cache)  # traced anew, not taken from the shared cache
            texts.append(program.lower(adapter.params, tokens, positions, jnp.ones((2, 16 if with_cache else 12), bool),
                                       positions, cache, jnp.int32(0)).as_text())
        return texts

    expected = programs(tiny_config)
    for config in others:
        assert programs(config) == expected, f"{config} traces another program than {tiny_config}: a field left " \
                                             "out of tp_llama.model.program_config reaches the program"


@pytest.mark.parametrize("tokens_on", ["host", "device"])
def test_a_new_input_shape_compiles_only_the_models_program(tiny_config, tp_model, tokens_on):
    """forward and step build their position, slot and mask inputs on the host: with jnp they compiled three to four
    small eager programs for every new shape (with strategies.rounded's, about 140 of a cold run's 600 programs)."""
    import jax
    import numpy as np

    model, params = tp_model("1x4", "float32")  # the session's built-in model, not another copy
    compiled: list[str] = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", "?"))

    def tokens(seq):
        ids = np.arange(2 * seq).reshape(2, seq) % tiny_config.vocab_size
        return jax.device_put(ids.astype(np.int32)) if tokens_on == "device" else ids

    model.forward(params, tokens(3))  # the first call of a process compiles a few helpers of its own
    cache = model.init_cache(2, 24)
    model.step(params, tokens(3), np.tile(np.arange(3), (2, 1)), cache, 0, np.arange(24)[None, :] < 3)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        seq = 29 + 2 * (tokens_on == "device")  # a shape no other test runs
        model.forward(params, tokens(seq))
        assert compiled == ["jit(local)"], f"forward at a new shape compiled {compiled}"
        cache = model.init_cache(2, 40)  # its zeros are one program per cache shape, by design
        compiled.clear()
        model.step(params, tokens(seq), np.tile(np.arange(seq), (2, 1)), cache, 0, np.arange(40)[None, :] < seq)
        assert compiled == ["jit(local)"], f"step at a new shape compiled {compiled}"
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
