"""`python -m benchmarks`: measure, print Markdown tables, write JSON.

Sections: bandwidth (memory bandwidth, the decode roofline's denominator), throughput (prefill and decode
tokens/s of every implementation, with roofline shares), compile (first generation versus steady state,
persistent compilation cache off / cold / warm), suite (`pytest -n 2` cold and warm, slowest tests).
Figures taken while other work shares the CPU are noise in absolute terms; read the ratios, and the load
averages the report prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import bandwidth, compile_cache, report, suite, throughput
from llama_spec.config import preset
from llama_spec.synthetic import make_weights

SECTIONS = ("bandwidth", "throughput", "compile", "suite")
# The full run measures the `small` preset (about 0.6 GB of float32 weights, far above any CPU cache).
FULL = dict(preset="small", dtypes=("float32", "bfloat16"), batches=(1, 8), prompt_len=128, new_tokens=17,
            repeats=3, bandwidth_bytes=1 << 30, compile_meshes=("1x1", "1x4"))
# --quick: the tiny preset and few repeats, a smoke run of every code path for CI (the suite is left out).
QUICK = dict(FULL, preset="tiny", prompt_len=16, new_tokens=5, repeats=2, bandwidth_bytes=1 << 28)
JAX_CPU_DEVICES = 4  # the 1x4 mesh


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset, 2 repeats, no suite section unless --only suite (a smoke run)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section, repeatable: {', '.join(SECTIONS)} (default: all; "
                             "throughput always measures bandwidth too, for its roofline share)")
    parser.add_argument("--json", default="out/benchmarks.json", metavar="PATH",
                        help="where to write the JSON record (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed repeats per measurement (default: 3, or 2 with --quick)")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="PyTorch intra-op threads for HF and Meta (default: PyTorch's, one per core); on a "
                             "CPU shared with other work, 1 avoids OpenMP threads waiting on each other")
    args = parser.parse_args(argv)
    for option in ("repeats", "torch_threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} {value}: need at least 1")
    return args


def _measure_bandwidth(settings: dict) -> dict:
    _log(f"bandwidth: {settings['bandwidth_bytes'] / 2**30:.2f} GiB arrays")
    return bandwidth.measure_bandwidth(settings["bandwidth_bytes"], repeats=5)


def chosen_sections(args: argparse.Namespace) -> set[str]:
    sections = set(args.only or (s for s in SECTIONS if not (args.quick and s == "suite")))
    if "throughput" in sections:
        sections.add("bandwidth")  # the roofline share needs it
    return sections


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    sections = chosen_sections(args)
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        import jax

        jax.config.update("jax_num_cpu_devices", JAX_CPU_DEVICES)  # before any JAX backend starts


    config = preset(settings["preset"])
    result = {"machine": report.machine_info(),
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}}
    bandwidth_runs = [_measure_bandwidth(settings)] if "bandwidth" in sections else []
    if "throughput" in sections:
        import torch


        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        result["settings"]["torch_threads"] = torch.get_num_threads()
        records = throughput.measure(config, make_weights(config, seed=0), settings["dtypes"], settings["batches"],
                                     settings["prompt_len"], settings["new_tokens"], settings["repeats"], log=_log)
        bandwidth_runs.append(_measure_bandwidth(settings))
        throughput.add_roofline(records, bandwidth.combine(bandwidth_runs)["gb_per_s"])
        result["throughput"] = records
    if bandwidth_runs:
        result["bandwidth"] = bandwidth.combine(bandwidth_runs)
    if "compile" in sections:
        result["compile"] = compile_cache.measure(settings["preset"], settings["compile_meshes"], "float32", 1,
                                                  settings["prompt_len"], settings["new_tokens"],
                                                  settings["repeats"], log=_log)
    if "suite" in sections:
        result["suite"] = suite.measure(workers=2, log=_log)
    result["machine"]["load_average_end"] = os.getloadavg()
    print(report.format_report(result), end="")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
