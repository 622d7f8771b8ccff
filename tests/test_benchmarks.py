"""The benchmark machinery (benchmarks/, tp_llama/compile_cache.py) on the tiny preset.

Arithmetic is checked on numbers worked out by hand, parsers on fixed text, the throughput and compile-cost
runs on the tiny preset for their structure and for what must hold whatever the timings: every
implementation decodes the same greedy tokens in float32, and a warm persistent cache serves every
compilation. No timing is asserted (benchmarks print figures; a shared CPU makes them noise here).
"""
import json

import numpy as np
import pytest

from benchmarks import bandwidth, flakes, report, suite, throughput
from benchmarks import compile_cache as compile_benchmark
from benchmarks.__main__ import chosen_sections, parse_args
from parity import compiles
from tp_llama import compile_cache

# tiny preset: dim 128, 2 layers, 8 heads of 16, 2 kv heads, SwiGLU width 384, vocab 512.
# One layer: wq 128*128 + wk 128*32 + wv 128*32 + wo 128*128 + w1, w2, w3 3*128*384 + two norms 2*128.
TINY_LAYER_PARAMS = 16384 + 4096 + 4096 + 16384 + 147456 + 256
# Both layers, the final norm and the output projection; the embedding table is not read whole.
TINY_DECODE_WEIGHT_PARAMS = 2 * TINY_LAYER_PARAMS + 128 + 512 * 128


def test_decode_bytes_count_every_weight_one_embedding_row_per_sequence_and_the_kv_read(tiny_config):
    parts = bandwidth.decode_bytes_per_step(tiny_config, "float32", batch=1, context=10)
    assert TINY_DECODE_WEIGHT_PARAMS == 443008
    assert parts["weights"] == 443008 * 4
    assert parts["embedding_rows"] == 128 * 4
    assert parts["kv_cache"] == 2 * 2 * 2 * 16 * 10 * 4  # keys and values, 2 layers, 2 kv heads of 16, 10 slots
    assert parts["total"] == 1772032 + 512 + 5120

    bf16 = bandwidth.decode_bytes_per_step(tiny_config, "bfloat16", batch=4, context=10)
    assert bf16["weights"] == 443008 * 2
    assert bf16["embedding_rows"] == 4 * 128 * 2
    assert bf16["kv_cache"] == 4 * 2 * 2 * 2 * 16 * 10 * 2
    with pytest.raises(ValueError, match="float16"):
        bandwidth.decode_bytes_per_step(tiny_config, "float16", batch=1, context=1)


def test_roofline_and_share_on_known_numbers():
    assert bandwidth.roofline_tokens_per_s(2e9, batch=1, gb_per_s=20.0) == pytest.approx(10.0)
    assert bandwidth.roofline_tokens_per_s(2e9, batch=8, gb_per_s=20.0) == pytest.approx(80.0)
    records = [{"batch": 2, "decode_tokens_per_s": 5.0, "decode_bytes_per_step": {"total": 4e9}}]
    throughput.add_roofline(records, gb_per_s=16.0)
    assert records[0]["roofline_decode_tokens_per_s"] == pytest.approx(8.0)  # 2 tokens per 4 GB at 16 GB/s
    assert records[0]["roofline_share"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="positive"):
        bandwidth.roofline_tokens_per_s(0, batch=1, gb_per_s=20.0)


def test_summarize_takes_medians_over_repeats():
    tokens = np.zeros((2, 4), np.int32)
    timings = [throughput.Timing(2.0, [0.1, 0.1, 0.2], tokens),   # prefill 10 tok/s, decode 15 tok/s
               throughput.Timing(1.0, [0.1, 0.1, 0.1], tokens),   # 20, 20
               throughput.Timing(4.0, [0.2, 0.2, 0.2], tokens)]   # 5, 10
    summary = throughput.summarize(timings, batch=2, prompt_len=10)
    assert summary["prefill_tokens_per_s"] == pytest.approx(10.0)
    assert summary["decode_tokens_per_s"] == pytest.approx(15.0)
    assert summary["decode_step_ms"] == pytest.approx(400 / 3)
    assert summary["repeats"] == 3
    with pytest.raises(ValueError, match="decode step"):
        throughput.summarize([throughput.Timing(1.0, [], tokens)], batch=2, prompt_len=10)


def test_bandwidth_measurement_structure():
    run = bandwidth.measure_bandwidth(8 << 20, repeats=2)
    assert {"copy, 1 thread(s)", "sum, 1 thread(s)"} <= set(run["kernels_gb_per_s"])
    assert all(v > 0 for v in run["kernels_gb_per_s"].values())
    assert run["gb_per_s"] == max(run["kernels_gb_per_s"].values())
    slower = {**run, "gb_per_s": run["gb_per_s"] / 2}
    assert bandwidth.combine([slower, run])["gb_per_s"] == run["gb_per_s"]


@pytest.mark.usefixtures("builtin_only")  # benchmarks the built-in model
def test_throughput_on_tiny_every_implementation_decodes_the_same_tokens(tiny_config, tiny_weights):
    # 7 decode steps: enough for an HF loop without its cache or a Meta loop one position off to part ways
    records = throughput.measure(tiny_config, tiny_weights, ["float32"], [2], prompt_len=8, new_tokens=8, repeats=1,
                                 log=lambda message: None)
    assert [r["implementation"] for r in records] == list(throughput.IMPLEMENTATIONS)
    for r in records:
        assert r["dtype"] == "float32" and r["batch"] == 2
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["tokens_agree"] == 1.0, \
            f"{r['implementation']} chose other greedy tokens than {r['tokens_agree_with']}"
        assert r["decode_bytes_per_step"]["total"] > r["decode_bytes_per_step"]["weights"]
    hf = next(r for r in records if r["implementation"] == "hf eager")
    assert hf["decode_vs_hf"] == 1.0
    jax_records = [r for r in records if r["implementation"].startswith("jax ")]
    assert all(r["compiles_in_warmup"] > 0 for r in jax_records), "the compile counter heard no compilation"
    json.dumps(records)


@pytest.mark.e2e
@pytest.mark.usefixtures("builtin_only")  # compiles the built-in model
def test_compile_benchmark_warm_cache_serves_every_compilation():
    rows = {r["scenario"]: r for r in compile_benchmark.measure("tiny", ["1x1"], "float32", batch=1, prompt_len=4,
                                                                 new_tokens=2, repeats=1, log=lambda message: None)}
    assert set(rows) == {"off", "cold", "warm"}
    assert rows["off"]["cache_hits"] == 0 and rows["off"]["cache_entries"] is None
    assert rows["cold"]["compiles"] > 0 and rows["cold"]["cache_hits"] == 0
    assert rows["cold"]["cache_entries"] > 0, "enable_compilation_cache wrote nothing"
    assert rows["warm"]["cache_hits"] == rows["warm"]["compiles"] == rows["cold"]["compiles"]


def test_cache_directory_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == tmp_path / "xdg" / "tp_llama" / "jax_compilation_cache"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "from_env"))
    assert compile_cache.resolve_cache_dir() == tmp_path / "from_env"
    assert compile_cache.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    for off in ("off", "0", "false", "", "OFF"):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.resolve_cache_dir() is None


def test_the_suites_cache_has_no_size_bound_unless_the_user_sets_one():
    """A bounded JAX cache rescans every entry on each write (compile_cache.DEFAULT_MAX_BYTES), so a default run
    into a well-used cache directory spent about four times as long compiling as into an empty one
    (docs/results.md#drawn-shapes-and-the-compilation-cache)."""
    import os

    import jax

    if "JAX_COMPILATION_CACHE_MAX_SIZE" in os.environ:
        pytest.skip("JAX_COMPILATION_CACHE_MAX_SIZE is set: the user's bound wins")
    if compile_cache.resolve_cache_dir() is None:
        pytest.skip(f"{compile_cache.ENV_VAR} switches the cache off")
    assert jax.config.jax_compilation_cache_max_size == compile_cache.DEFAULT_MAX_BYTES == -1


SUITE_OUTPUT = """\
============================= test session starts ==============================
created: 2/2 workers
2 workers [3 items]
...F
============================= slowest 10 durations =============================
12.50s call     conformance/test_model.py::test_logits[hf-bfloat16-1x4]
3.01s setup    conformance/test_model.py::test_logits[meta-float32-1x1]
0.20s teardown conformance/test_kv_cache.py::test_prefill

(7 durations < 0.005s hidden.  Use -vv to show these durations.)
=========================== short test summary info ============================
FAILED conformance/test_x.py::test_y - AssertionError
=================== 1 failed, 2 passed, 1 skipped in 95.12s (0:01:35) ===================
"""


def test_suite_output_parsing():
    assert suite.parse_durations(SUITE_OUTPUT) == [
        {"seconds": 12.5, "phase": "call", "test": "conformance/test_model.py::test_logits[hf-bfloat16-1x4]"},
        {"seconds": 3.01, "phase": "setup", "test": "conformance/test_model.py::test_logits[meta-float32-1x1]"},
        {"seconds": 0.2, "phase": "teardown", "test": "conformance/test_kv_cache.py::test_prefill"},
    ]
    assert suite.parse_summary(SUITE_OUTPUT) == "1 failed, 2 passed, 1 skipped in 95.12s (0:01:35)"
    assert suite.parse_summary("no summary here") is None


def test_cli_sections():
    assert chosen_sections(parse_args([])) == {"bandwidth", "throughput", "compile", "suite"}
    assert chosen_sections(parse_args(["--quick"])) == {"bandwidth", "throughput", "compile"}
    assert chosen_sections(parse_args(["--quick", "--only", "suite"])) == {"suite"}
    assert chosen_sections(parse_args(["--only", "throughput"])) == {"throughput", "bandwidth"}
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--only", "everything"])
    with pytest.raises(SystemExit):
        parse_args(["--torch-threads", "0"])


def test_report_renders_every_section_as_markdown():
    machine = {**report.machine_info(), "load_average_end": (1.0, 2.0, 3.0)}
    run = {"array_bytes": 1 << 30, "repeats": 5, "kernels_gb_per_s": {"copy, 1 thread(s)": 20.0}, "gb_per_s": 20.0}
    record = {"implementation": "jax 1x1", "dtype": "float32", "batch": 1, "prompt_len": 128, "new_tokens": 17,
              "prefill_tokens_per_s": 300.0, "decode_tokens_per_s": 25.0, "decode_step_ms": 40.0, "repeats": 3,
              "decode_bytes_per_step": {"total": 5e8}, "decode_vs_hf": 1.5, "prefill_vs_hf": 2.0,
              "tokens_agree_with": "jax 1x1", "tokens_agree": 1.0, "compiles_per_timed_generation": 0.0}
    throughput.add_roofline([record], 20.0)
    result = {"machine": machine, "settings": {"preset": "small"}, "bandwidth": bandwidth.combine([run]),
              "throughput": [record],
              "compile": [{"scenario": "warm", "mesh": "1x1", "first_call_s": 2.0, "steady_s": 0.5, "compiles": 3,
                           "cache_hits": 3, "cache_entries": 3, "process_s": 9.0}],
              "suite": {"command": "pytest -n 2 --durations=10", "workers": 2,
                        **{name: {"wall_s": 100.0, "exit_code": 0, "summary": "3 passed in 99.00s",
                                  "slowest": suite.parse_durations(SUITE_OUTPUT), "cache_entries": 7}
                           for name in ("cold", "warm")}}}
    text = report.format_report(json.loads(json.dumps(result)))
    assert f"{machine['nproc']} cores ({machine['cpu_model']})" in text
    assert "| jax 1x1 | float32 | 1 | 300.0 | 25.0 | 40.0 | 1.50 | 2.00 | 500.0 | 40.0 | 0.62 | 1.00 | 0.0 |" in text
    assert "| warm | 1x1 | 2.00 | 0.500 | 4.0 | 3 | 3 | 3 | 9.0 |" in text
    assert "`conformance/test_model.py::test_logits[hf-bfloat16-1x4]`" in text
    assert "the roofline uses the fastest, 20.0 GB/s" in text


# ---- the flakes stress script and the compile count ----------------------------------------------------

def test_flakes_counts_failures_per_test_over_runs(tmp_path):
    log = "..F\nFAILED conformance/test_a.py::test_x[1x4] - AssertionError: rel_l2 = 3e-4 > 2e-4\nERROR b.py::t\n"
    assert flakes.failures_from_log(log) == {
        "conformance/test_a.py::test_x[1x4]": {"outcome": "failed", "message": "AssertionError: rel_l2 = 3e-4 > 2e-4"},
        "b.py::t": {"outcome": "error", "message": None}}
    document = {"tests": [{"nodeid": "a::x", "outcome": "failed", "message": "boom"},
                          {"nodeid": "a::y", "outcome": "passed", "message": None}]}
    (tmp_path / "run.json").write_text(json.dumps(document))
    assert flakes.outcomes_from_json(tmp_path / "run.json")["a::x"] == {"outcome": "failed", "message": "boom"}
    assert flakes.outcomes_from_json(tmp_path / "missing.json") is None

    load = {"start": [9.0, 9.0, 9.0], "end": [10.0, 9.0, 9.0]}
    runs = [{"run": 1, "code": "abc1234", "exit_code": 1, "wall_s": 60.0, "summary": "1 failed, 1 passed in 60s",
             "load_average": load,
             "xla_compilations": "XLA compilations: 3 programs", "failed": {"a::x": {"outcome": "failed",
                                                                                      "message": "boom\nmore"}}},
            {"run": 2, "exit_code": 0, "wall_s": 50.0, "summary": "2 passed in 50s", "load_average": load,
             "xla_compilations": None, "failed": {}},
            {"run": 3, "exit_code": 1, "wall_s": 55.0, "summary": "1 failed, 1 passed in 55s", "load_average": load,
             "xla_compilations": None, "failed": {"a::x": {"outcome": "failed", "message": "again"}}}]
    per_test = flakes.tally(runs)
    assert per_test == {"a::x": {"runs": [1, 3], "message": "boom\nmore"}}
    lines = flakes.report_lines(runs, per_test, load=4)
    assert lines[0] == "flakes: 3 runs, 2 failed; 1 tests failed at least once (parallel load: 4 busy processes)"
    assert "  2/3  a::x  (runs 1, 3)" in lines and "        boom" in lines
    assert "         XLA compilations: 3 programs" in lines
    assert lines[1] == "  run 1 (abc1234): exit 1, 60 s, load 10.0, 1 failed, 1 passed in 60s"
    assert flakes.code_version()[:1].isalnum()


def test_flakes_load_processes_start_and_stop():
    load = flakes.start_load(2)
    try:
        assert all(proc.poll() is None for proc in load)
    finally:
        flakes.stop_load(load)
    assert all(proc.returncode is not None for proc in load)
    assert flakes.parse_args(["--runs", "3", "--load", "6", "--", "-k", "meshes"]).pytest_args == ["-k", "meshes"]
    with pytest.raises(SystemExit):
        flakes.parse_args(["--runs", "0"])


def test_compile_counter_hears_a_compilation_and_the_summary_sums_workers():
    import jax
    import jax.numpy as jnp


    x = jnp.arange(7.0)
    counter = compiles.CompileCounter()
    try:
        fn = jax.jit(lambda x: x * 3 + 1)  # a new function: JAX holds no program for it yet
        fn(x).block_until_ready()
        fn(x).block_until_ready()  # the same program, from memory: no event
        counts = counter.counts()
    finally:
        counter.close()
    assert counts["programs"] == 1 and 0 <= counts["cache_hits"] <= 1
    line = compiles.summary_line([{"programs": 10, "cache_hits": 4, "seconds": 2.5},
                                  {"programs": 5, "cache_hits": 0, "seconds": 1.0}])
    assert line == ("XLA compilations: 15 programs (11 compiled, 4 loaded from the persistent compilation cache), "
                    "3.5 s, 2 workers")
