"""The machine a run measured, and the Markdown tables `python -m benchmarks` prints (docs/results.md pastes them)."""
from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

_PACKAGES = ("jax", "jaxlib", "torch", "transformers", "llama-models", "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """What a reader needs to weigh the figures: cores, CPU, memory, load (other work on the machine), versions."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)), "cpu_model": _cpu_model(), "memory_gib": _memory_gib(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {p: _version(p) for p in _PACKAGES}, "load_average_start": os.getloadavg()}


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _load(values) -> str:
    return " / ".join(f"{x:.2f}" for x in values) if values else "-"


def machine_lines(machine: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    return [f"Machine: {machine['nproc']} cores ({machine['cpu_model']}), {_fmt(machine['memory_gib'])} GiB, "
            f"{machine['platform']}, Python {machine['python']}; {versions}.",
            f"Date: {machine['date']}. Load average (1/5/15 min) at start {_load(machine.get('load_average_start'))}, "
            f"at end {_load(machine.get('load_average_end'))}: a load above the core count means other work "
            f"shared the CPU."]


def bandwidth_lines(bandwidth: dict) -> list[str]:
    runs = bandwidth["runs"]
    names = list(runs[0]["kernels_gb_per_s"])
    rows = [[name, *(_fmt(run["kernels_gb_per_s"][name]) for run in runs)] for name in names]
    header = ["kernel", *(f"GB/s, measurement {i + 1}" for i in range(len(runs)))]
    return [f"Memory bandwidth ({runs[0]['array_bytes'] / 2**30:.2f} GiB arrays, median of {runs[0]['repeats']} "
            f"per kernel); the roofline uses the fastest, {bandwidth['gb_per_s']:.1f} GB/s:", "",
            *_table(header, rows)]


def throughput_lines(records: list[dict]) -> list[str]:
    header = ["implementation", "dtype", "batch", "prefill tok/s", "decode tok/s", "ms/step", "decode x HF",
              "prefill x HF", "MB/step", "roofline tok/s", "roofline share", "tokens agree",
              "JAX compiles / generation"]
    rows = [[r["implementation"], r["dtype"], str(r["batch"]), _fmt(r["prefill_tokens_per_s"]),
             _fmt(r["decode_tokens_per_s"]), _fmt(r["decode_step_ms"]), _fmt(r["decode_vs_hf"], 2),
             _fmt(r["prefill_vs_hf"], 2), _fmt(r["decode_bytes_per_step"]["total"] / 1e6),
             _fmt(r.get("roofline_decode_tokens_per_s")), _fmt(r.get("roofline_share"), 2),
             _fmt(r["tokens_agree"], 2), _fmt(r.get("compiles_per_timed_generation"))] for r in records]
    first = records[0]
    return [f"Throughput: prompt {first['prompt_len']} tokens, {first['new_tokens']} new tokens "
            f"({first['new_tokens'] - 1} decode steps), median of {first['repeats']} interleaved repeats after a "
            f"warm-up. 'tokens agree': share of greedy tokens equal to {first['tokens_agree_with']}'s.", "",
            *_table(header, rows)]


def compile_lines(records: list[dict]) -> list[str]:
    header = ["persistent cache", "mesh", "first generation s", "steady s", "first / steady", "compiles",
              "cache hits", "cache entries", "process s"]
    rows = [[r["scenario"], r["mesh"], _fmt(r["first_call_s"], 2), _fmt(r["steady_s"], 3),
             _fmt(r["first_call_s"] / r["steady_s"]), str(r["compiles"]), str(r["cache_hits"]),
             _fmt(r["cache_entries"]), _fmt(r["process_s"])] for r in records]
    return ["Compile cost (each scenario a fresh process; process s includes imports and weight creation):", "",
            *_table(header, rows)]


def suite_lines(suite: dict) -> list[str]:
    lines = [f"Suite: `{suite['command']}`", ""]
    lines += _table(["compilation cache", "wall s", "exit code", "pytest summary", "cache entries after"],
                    [[name, _fmt(suite[name]["wall_s"]), str(suite[name]["exit_code"]),
                      suite[name]["summary"] or "-", str(suite[name]["cache_entries"])] for name in ("cold", "warm")])
    for name in ("cold", "warm"):
        lines += ["", f"Slowest tests, {name}:", ""]
        lines += _table(["s", "phase", "test"], [[_fmt(r["seconds"], 2), r["phase"], f"`{r['test']}`"]
                                                 for r in suite[name]["slowest"]])
    return lines


def format_report(result: dict) -> str:
    """Every section present in `result`, as Markdown."""
    lines = ["## Benchmarks", "", *machine_lines(result["machine"])]
    settings = result.get("settings")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + "."]
    for key, render in (("bandwidth", bandwidth_lines), ("throughput", throughput_lines),
                        ("compile", compile_lines), ("suite", suite_lines)):
        if result.get(key):
            lines += ["", *render(result[key])]
    return "\n".join(lines) + "\n"
