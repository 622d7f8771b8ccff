"""JAX's multi-controller runtime: join a run that spans processes (hosts), and launch such runs on one machine.

On a TPU pod slice or a multi-node GPU cluster every host runs the same program; `jax.distributed.initialize`
connects them and `jax.devices()` then lists every device of every process, so a mesh can span hosts. Three
rules follow for the suite:
- inputs are identical on every process: parameters become global arrays shard by shard
  (`jax.make_array_from_callback` in `tp_llama.shardings.place_params`), and a host value handed to a jitted
  function is taken as one process-local copy of the same global value (JAX's multi-controller convention for
  uncommitted inputs), so seeded inputs need no further conversion;
- every process takes part in every computation and every gather, in the same order (no pytest-xdist);
- a result sharded over devices of other processes is gathered with a collective (`llama_spec.host`) before anyone
  compares it (`llama_spec.host`); only process 0 writes files.
`python -m tp_llama.distributed -- PYTEST ARGS` runs such a run on one machine: N processes, each simulating CPU
devices, talking gloo over loopback (`launch` kills them all when one fails or time runs out).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

# The suite's environment variables (JAX itself reads only the first).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to call `jax.distributed.initialize`; None fields are left to JAX's cluster auto-detection."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, auto: bool = False,
             environ: Mapping[str, str] = os.environ) -> Settings | None:
    """The multi-controller settings asked for by options (which win) or the environment, None for a
    single-process run. Raises ValueError with the fix when only some of the three are given."""
    address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    given = {"--coordinator-address": address, "--num-processes": count, "--process-id": index}
    if all(v is None for v in given.values()):
        return Settings(None, None, None) if auto else None
    missing = [name for name, value in given.items() if value is None]
    if missing and not auto:
        raise ValueError(f"a multi-process run needs {', '.join(given)} (or {ENV_COORDINATOR}, "
                         f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {', '.join(missing)}; give them all, "
                         "or --distributed alone to let JAX detect a TPU pod, SLURM or Open MPI cluster")
    if count is not None and count < 1:
        raise ValueError(f"--num-processes {count}: must be at least 1")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"--process-id {index}: must be in 0..{count - 1} for --num-processes {count}")
    return Settings(address, count, index)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize(chosen: Settings, timeout_s: int = 300) -> None:
    """Join the run. Must come before any JAX backend starts (after jax_num_cpu_devices, which it keeps).

    CPU devices of different processes talk through gloo over TCP; accelerators use their own interconnect.
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=chosen.coordinator_address,
                               num_processes=chosen.num_processes, process_id=chosen.process_id,
                               initialization_timeout=timeout_s)


# ---- running N processes on one machine -----------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """How one launched process ended: its exit status (None if it had to be killed) and its output."""
    index: int
    pgid: int
    command: list[str]
    returncode: int | None
    output: str
    killed_because: str | None = None


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], timeout_s: float, env: Mapping[str, str] | None = None,
           cwd: str | None = None, poll_s: float = 0.2, grace_s: float = 5.0) -> list[Outcome]:
    """Run the commands at once, each in its own process group, until all exit.

    When one exits with an error the others are killed at once (they would wait for it in a collective until
    JAX's own timeouts, minutes later); when timeout_s passes all are killed (SIGTERM, then SIGKILL after
    grace_s). No process of any group outlives the call, whatever happens.
    """
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="tp_llama_launch_") as tmp:
        logs = [open(os.path.join(tmp, f"process{i}.log"), "w+", encoding="utf-8") for i in range(len(commands))]
        procs: list[subprocess.Popen] = []
        reasons: dict[int, str] = {}
        try:
            for command, log in zip(commands, logs):
                procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                              start_new_session=True))
            deadline = time.monotonic() + timeout_s
            while [p.poll() for p in procs].count(None):
                failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = (f"process {failed[0]} exited with status {procs[failed[0]].returncode}" if failed
                           else f"the run did not finish within {timeout_s:g} s")
                    reasons.update({i: why for i, p in enumerate(procs) if p.poll() is None})
                    break
                time.sleep(poll_s)
        finally:
            for p in procs:
                kill_group(p, grace_s)
        outcomes = []
        for i, (command, log, p) in enumerate(zip(commands, logs, procs)):
            log.seek(0)
            outcomes.append(Outcome(i, p.pid, command, None if i in reasons else p.returncode, log.read(),
                                    reasons.get(i)))
            log.close()
        return outcomes


def kill_group(proc, grace_s: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything in its group; return once all are
    gone (SIGTERM, then SIGKILL after grace_s)."""
    import signal
    import subprocess
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + grace_s
        while group_alive(proc.pid) and time.monotonic() < end:
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; zombies (exited, waiting to be reaped) do not count."""
    if not os.path.isdir("/proc/self"):  # no procfs (macOS): ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def pytest_commands(pytest_args: list[str], processes: int, cpu_devices: int, port: int) -> list[list[str]]:
    """One `python -m pytest` per process of a multi-process run on this machine (gloo over loopback)."""
    import sys

    return [[sys.executable, "-m", "pytest", *pytest_args, "-p", "no:xdist", "--cpu-devices", str(cpu_devices),
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
            for i in range(processes)]


def summary(outcomes: list[Outcome]) -> list[str]:
    """One line per process: its exit status, or why it was killed."""
    return [f"process {o.index}: " + (f"killed ({o.killed_because})" if o.killed_because else f"exit status "
                                      f"{o.returncode}") for o in outcomes]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tp_llama.distributed",
        description="Run the suite as N JAX processes on this machine, each simulating CPU devices, joined by "
                    "jax.distributed over loopback: a multi-host run without the hosts. Arguments after -- go to "
                    "every pytest; process 0 prints its output and writes --parity-json.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=2, help="simulated CPU devices per process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before every process is killed")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    commands = pytest_commands(pytest_args, args.processes, args.cpu_devices, free_port())
    outcomes = launch(commands, args.timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for o in outcomes:
        if o.index == 0 or o.returncode != 0:
            print(f"---- process {o.index} ----\n{o.output}")
    print("\n".join(summary(outcomes)))
    return 0 if all(o.returncode == 0 for o in outcomes) else (outcomes[0].returncode or 1)


if __name__ == "__main__":
    raise SystemExit(main())
