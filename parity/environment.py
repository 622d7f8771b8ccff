"""What a run records about where it ran: package versions, the CPU's numerically relevant features, the devices.

A baseline's metric values hold only where these match (parity.baseline compares them), and the report shows
them. Everything here is a plain function of the process and machine; JSON goes through `json_safe`.
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

VERSIONED = ("jax", "jaxlib", "flax", "torch", "transformers", "llama-models", "fairscale", "tiktoken", "numpy",
             "pytest", "pytest-xdist")


def package_versions(names=VERSIONED) -> dict[str, str | None]:
    """Installed distribution versions, None for those not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# The CPU features that change which kernels XLA and torch pick, and so the last bits of a result: a baseline's
# metric values hold only on a CPU with the same ones (parity/baseline.py).
NUMERIC_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                     "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")  # the last six: aarch64's "Features" line


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine type and its numerically relevant CPU flags (None where /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"machine": platform.machine(), "flags": None}
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
    have = set(line.partition(":")[2].split())
    return {"machine": platform.machine(), "flags": [f for f in NUMERIC_CPU_FLAGS if f in have]}


def device_info() -> dict[str, Any] | None:
    """Backend, device kind and count, only if this process has already initialised a JAX backend."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        from jax._src import xla_bridge  # private, but the only way to ask without initialising

        if not xla_bridge.backends_are_initialized():
            return None
        devices = jax.devices()
        return {"platform": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
                "process_count": jax.process_count()}
    except Exception:  # noqa: BLE001 - environment reporting must never break a run
        return None


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings 'NaN', 'Infinity', '-Infinity'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def cpu_label(cpu: Mapping[str, Any] | None) -> str:
    """A run's recorded CPU (parity.environment.cpu_info) as one line: machine [flags]."""
    if not cpu:
        return "an unrecorded CPU"
    flags = cpu.get("flags")
    return f"{cpu.get('machine')} [{' '.join(flags) if flags is not None else 'flags unknown'}]"
