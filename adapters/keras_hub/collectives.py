"""What keras-hub's layout makes XLA communicate: the collectives of the compiled forward (`compiled_forward`), by
kind, count, bytes and the keras layer that issues them, beside the built-in Megatron model's.

    python -m adapters.keras_hub.collectives --mesh 1x4 --batch 2 --seq 8 [--dtype bfloat16]

Bytes are the size of the tensor each collective reduces or produces on one device (the result shape; an
all-reduce's operand and result have one shape), summed per call; per token = / (batch * seq).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

from adapters import protocol
from llama_spec.config import preset
from llama_spec.layout import make_mesh
from llama_spec.synthetic import canonical_weights

_KIND = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
_LINE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+" + _KIND + r"(?:-start)?\((.*)$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _size(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def _site(rest: str, depth: int = 5) -> str:
    m = re.search(r'op_name="([^"]*)"', rest)
    if not m:
        return "?"
    parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "pjit", "shard_map")) and p]
    # keep the layer names (keras name scopes / flax modules), drop the primitive at the end
    return "/".join(parts[:-1][:depth]) or parts[-1]


def collectives(hlo: str) -> list[tuple[str, str, int]]:
    """(kind, site, bytes) of every collective start in optimised HLO text (async -done halves skipped)."""
    out = []
    for line in hlo.splitlines():
        m = _LINE.search(line)
        if m and "-done(" not in line:
            out.append((m.group(2), _site(m.group(3)), _size(m.group(1))))
    return out


def summary(hlo: str, tokens: int) -> list[str]:
    found = collectives(hlo)
    kinds = Counter(kind for kind, _, _ in found)
    total = sum(b for _, _, b in found)
    lines = [f"{len(found)} collectives: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
             + f"; {total} bytes per call, {total / tokens:.0f} bytes per token"]
    sites = Counter((kind, site) for kind, site, _ in found)
    size = Counter()
    for kind, site, b in found:
        size[kind, site] += b
    for (kind, site), n in sorted(sites.items(), key=lambda item: item[0][1]):
        lines.append(f"  {n} x {kind:<18} {size[kind, site]:>8} B  {site}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.keras_hub.collectives",
                                     description="Print the collectives XLA compiles into keras-hub's Llama forward "
                                                 "(by kind, count, bytes and the keras layer that issues them) beside "
                                                 "the built-in Megatron model's, on the tiny config.")
    parser.add_argument("--mesh", default="1x4", metavar="DxM", help="data x model mesh (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="activation/weight dtype (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per call (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=8, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--cpu-devices", type=int, default=8, metavar="N",
                        help="simulated CPU devices (default: %(default)s)")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    config, weights = preset("tiny"), canonical_weights("tiny")
    tokens = args.batch * args.seq
    for spec in ("adapters.keras_hub:KerasHubLlama", protocol.BUILTIN):
        adapter = protocol.build(protocol.load(spec), config, weights, make_mesh(args.mesh), args.dtype)
        hlo = adapter.compiled_forward(args.batch, args.seq).as_text()
        print(f"{spec} on {args.mesh}, {args.dtype}, batch {args.batch} x seq {args.seq} (tiny: dim {config.dim}, "
              f"{config.n_layers} layers, vocab {config.vocab_size}):")
        for line in summary(hlo, tokens):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
