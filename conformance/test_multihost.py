"""The suite under JAX's multi-controller runtime, proven on one machine.

Two pytest processes with 2 simulated CPU devices each join through jax.distributed (gloo over loopback) and run
the layer and logits conformance on one 1x4 mesh that spans both (`python -m tp_llama.distributed` is the
launcher). Process 0 alone writes the parity JSON; its metrics must match those of the same checks run here in
one process on a 1x4 mesh, case by case, within the baseline gate's slack in both directions (the runs differ
only in the order gloo sums the all-reduces). The launcher's own guarantees (a dead or hung process is killed
within a bounded time, nothing outlives it) are tested without JAX.
"""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance import components
from conformance.forward import check_intermediates, check_logits
from parity import baseline
from parity.check import RECORD_KEY
from tp_llama import distributed

ROOT = Path(__file__).resolve().parents[1]
MESH, DTYPE, REFERENCE = "1x4", "float32", "meta"
TIMEOUT_S = 240  # a run takes 30-55 s on a loaded 2-core machine

# The node ids each process runs, and the same check for this process's single-process run.
CASES = {
    "conformance/test_rmsnorm.py::test_rmsnorm[meta-float32-1x4-0-attention_norm]":
        lambda r, impl: components.check(r, components.RMSNORM, impl, REFERENCE, DTYPE, MESH, layer_index=0,
                                         which="attention_norm"),
    "conformance/test_attention.py::test_attention[meta-float32-1x4-layer1-cached]":
        lambda r, impl: components.check(r, components.ATTENTION, impl, REFERENCE, DTYPE, MESH, case="cached",
                                         layer_index=1),
    "conformance/test_rope.py::test_rope[meta-float32-1x4-pos9000]":
        lambda r, impl: components.check(r, components.ROPE, impl, REFERENCE, DTYPE, MESH, start_pos=9000),
    "conformance/test_logits.py::test_logits[meta-float32-1x4-batch]":
        lambda r, impl: check_logits(r, impl, REFERENCE, DTYPE, MESH, "batch"),
    "conformance/test_logits.py::test_intermediates[meta-float32-1x4-batch]":
        lambda r, impl: check_intermediates(r, impl, REFERENCE, DTYPE, MESH, "batch"),
    "conformance/test_mlp.py::test_mlp[meta-float32-1x4-layer1]":
        lambda r, impl: components.check(r, components.MLP, impl, REFERENCE, DTYPE, MESH, layer_index=1),
    "conformance/test_block.py::test_block[meta-float32-1x4-layer1-pos9000]":
        lambda r, impl: components.check(r, components.BLOCK, impl, REFERENCE, DTYPE, MESH, layer_index=1,
                                         start_pos=9000),
}


def _single_process_document(request, impl) -> dict:
    """The selected checks run here on a 1x4 mesh of this process's devices, as a --parity-json document."""
    records = []
    for nodeid, check in CASES.items():
        probe = SimpleNamespace(config=request.config, node=SimpleNamespace(nodeid=nodeid, user_properties=[]))
        check(probe, impl(MESH, DTYPE))
        records += [value for key, value in probe.node.user_properties if key == RECORD_KEY]
    return {"records": records, "tests": [{"nodeid": n, "outcome": "passed", "message": None} for n in CASES]}


def _failure(outcomes) -> str:
    lines = ["multi-process run failed:", *distributed.summary(outcomes)]
    for o in outcomes:
        if o.returncode != 0:
            lines.append(f"---- last output of process {o.index} ----\n" + "\n".join(o.output.splitlines()[-30:]))
    return "\n".join(lines)


@pytest.mark.multihost
def test_two_processes_give_the_single_process_metrics(request, impl, tmp_path):
    json_path = tmp_path / "multihost.json"
    args = [*CASES, "-q", "--mesh", MESH, "--dtype", DTYPE, "--reference", REFERENCE, "--parity-json",
            str(json_path), "--tolerance-profile", request.config.getoption("tolerance_profile")]
    if request.config.getoption("impl"):  # both runs check the same implementation
        args += ["--impl", request.config.getoption("impl")]
    commands = distributed.pytest_commands(args, processes=2, cpu_devices=2, port=distributed.free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PYTEST_"))}
    with ThreadPoolExecutor(1) as pool:  # this process computes its single-process run meanwhile
        running = pool.submit(distributed.launch, commands, TIMEOUT_S, env={**env, "JAX_PLATFORMS": "cpu"},
                              cwd=str(ROOT))
        single = _single_process_document(request, impl)
        outcomes = running.result()
    assert not any(distributed.group_alive(o.pgid) for o in outcomes), "a launched process outlived launch()"
    assert all(o.returncode == 0 for o in outcomes), _failure(outcomes)

    document = json.loads(json_path.read_text())
    assert document["environment"]["devices"] == {"platform": "cpu", "kind": "cpu", "count": 4, "process_count": 2}
    assert {t["nodeid"]: t["outcome"] for t in document["tests"]} == dict.fromkeys(CASES, "passed")
    assert "parity JSON:" in outcomes[0].output and "parity JSON:" not in outcomes[1].output, \
        "only process 0 may write the parity JSON"

    assert len(document["records"]) == len(single["records"]) > len(CASES)
    for base, run, label in ((single, document, "multi-process vs single-process"),
                             (document, single, "single-process vs multi-process")):
        gate = baseline.compare(baseline.make_baseline(base), run, label)
        assert gate.passed and gate.compared == len(single["records"]) and not gate.new and not gate.missing, \
            "\n".join(baseline.summary_lines(gate))


# ---- the launcher ---------------------------------------------------------------------------

def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_dead_process_gets_the_others_killed_at_once():
    outcomes = distributed.launch([_python("import time; time.sleep(120)"),
                                   _python("import sys; print('dying'); sys.exit(3)")], timeout_s=60)
    assert [o.returncode for o in outcomes] == [None, 3]
    assert outcomes[0].killed_because == "process 1 exited with status 3" and outcomes[1].output == "dying\n"
    assert distributed.summary(outcomes) == ["process 0: killed (process 1 exited with status 3)",
                                             "process 1: exit status 3"]
    assert not any(distributed.group_alive(o.pgid) for o in outcomes)


@pytest.mark.e2e
def test_a_hung_run_is_killed_with_its_children_when_the_time_is_up(tmp_path):
    """The hung process ignores SIGTERM and has a child of its own: both must be gone when launch returns."""
    child_pid = tmp_path / "child.pid"
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    outcomes = distributed.launch([_python(stubborn), _python("print('done')")], timeout_s=8, grace_s=1)
    assert outcomes[0].killed_because == "the run did not finish within 8 s"
    assert outcomes[1].returncode == 0 and outcomes[1].killed_because is None
    assert int(child_pid.read_text()) != outcomes[0].pgid  # a real child, in the group of process 0
    assert not any(distributed.group_alive(o.pgid) for o in outcomes), "a launched process outlived launch()"


def test_settings_come_from_options_then_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ={}) is None
    assert distributed.settings(environ=env) == distributed.Settings("10.0.0.1:1234", 4, 3)
    assert distributed.settings(process_id=1, environ=env) == distributed.Settings("10.0.0.1:1234", 4, 1)
    assert distributed.settings(auto=True, environ={}) == distributed.Settings(None, None, None)
    with pytest.raises(ValueError, match="missing --coordinator-address, --process-id; give them all"):
        distributed.settings(num_processes=2, environ={})
    with pytest.raises(ValueError, match=r"--process-id 4: must be in 0\.\.3"):
        distributed.settings(process_id=4, environ=env)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four': expected an integer"):
        distributed.settings(environ={**env, "JAX_NUM_PROCESSES": "four"})
