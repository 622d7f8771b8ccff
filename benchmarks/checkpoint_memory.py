"""Wall time and peak resident memory of layer-by-layer conformance on a full-width checkpoint.

    python -m benchmarks.checkpoint_memory                       # 8B widths, 2 layers, bfloat16, 1x4, meta + hf
    python -m benchmarks.checkpoint_memory --checkpoint-dir DIR  # any Meta or HF checkpoint, e.g. the real 8B

Without --checkpoint-dir a synthetic Meta checkpoint of the 8b preset at --layers depth is written to a temporary
directory by a child process (its time and peak memory are reported apart: writing holds the whole model, the
check never does). The check then runs here, the same path as conformance/test_8b_width.py, and the peak
resident memory printed is this process's VmHWM over the check alone (reset just before it), memory-mapped
checkpoint pages included. The arithmetic printed last is docs/real-checkpoints.md's: why the same path fits the real
32-layer 8B on a 24 GiB host.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conformance.layerwise import LayerwiseRun, peak_rss_bytes, reset_peak_rss, run_layerwise
from llama_spec.checkpoint import CheckpointError, load_checkpoint
from llama_spec.config import preset
from llama_spec.layout import parse_mesh
from llama_spec.synthetic import make_tokens, meta_weight_shapes
from parity.metrics import compute_metrics

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def generate(directory: Path, layers: int) -> tuple[float, int]:
    """Write the synthetic 8B-width checkpoint in a child process; (seconds, child's peak RSS bytes)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fixtures.checkpoints", str(directory), "--format", "meta", "--preset", "8b",
                    "--layers", str(layers), "--dtype", "bfloat16"], cwd=ROOT, check=True)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def arithmetic(config, dtype_bytes: int = 2) -> list[str]:
    """Bytes of the real model's parts at `dtype_bytes` per parameter (docs/real-checkpoints.md's memory arithmetic)."""
    import numpy as np


    real = preset("8b")
    shapes = meta_weight_shapes(real)
    layer = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("layers.0."))
    embedding = real.vocab_size * real.dim
    total = sum(int(np.prod(s)) for s in shapes.values())
    return [
        f"real 8B ({real.n_layers} layers): {total / 1e9:.2f} B parameters = {total * dtype_bytes / 1e9:.2f} GB "
        f"({total * dtype_bytes / GIB:.2f} GiB) at {dtype_bytes} bytes each",
        f"  one layer: {layer / 1e6:.1f} M parameters = {layer * dtype_bytes / 1e9:.3f} GB; embedding and output: "
        f"{embedding / 1e6:.1f} M = {embedding * dtype_bytes / 1e9:.2f} GB each",
        f"  this run: {config.n_layers} layer(s) at dim {config.dim}; layer by layer holds one part at a time, so "
        "its peak does not grow with depth",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=2, help="depth of the synthetic checkpoint (default 2)")
    parser.add_argument("--mesh", default="1x4")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--references", nargs="+", default=["meta", "hf"], choices=("meta", "hf"))
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (batch: the mesh's data axis)")
    args = parser.parse_args(argv)

    given = None
    if args.checkpoint_dir is not None:
        try:  # metadata only, before any JAX set-up: a bad directory is one line
            given = load_checkpoint(args.checkpoint_dir)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    import jax

    jax.config.update("jax_num_cpu_devices", 8)

    with tempfile.TemporaryDirectory(prefix="ckpt8b-") as scratch:
        if given is None:
            directory = Path(scratch) / "meta-8b-width"
            seconds, child_peak = generate(directory, args.layers)
            size = sum(p.stat().st_size for p in directory.iterdir())
            print(f"generate: {seconds:.1f} s, peak RSS {child_peak / GIB:.2f} GiB, {size / 1e9:.2f} GB on disk")
            given = load_checkpoint(directory)
        config, weights = given
        tokens = make_tokens(config, batch=parse_mesh(args.mesh)[0], seq_len=args.seq, seed=7)
        reset_peak_rss()
        baseline = peak_rss_bytes()
        start = time.perf_counter()
        run: LayerwiseRun = run_layerwise(config, weights, args.mesh, args.dtype, tokens,
                                          references=tuple(args.references), start_pos=9000)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()

    print(f"checkpoint: {config.n_layers} layers, dim {config.dim}, {config.n_heads}/{config.n_kv_heads} heads, "
          f"hidden {config.hidden_dim}, vocab {config.vocab_size}, {sorted(set(weights.dtypes.values()))}")
    print(f"layerwise {args.mesh} {args.dtype} vs {'+'.join(args.references)}: wall {seconds:.1f} s, "
          f"peak RSS {peak / GIB:.2f} GiB (resident at start: {baseline / GIB:.2f} GiB)")
    for name in run.actual:
        for ref in args.references:
            m = compute_metrics(run.actual[name], run.expected[ref][name], oracle=run.oracle[name],
                                logits=name == "logits")
            extra = f" kl {m['kl']:.2e} top1 {m['top1']:.3f}" if name == "logits" else ""
            print(f"  {name:22s} {ref:4s} rel_l2 {m['rel_l2']:.2e} noise_ratio {m['noise_ratio']:.2f}{extra}")
    print("\n".join(arithmetic(config)))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"cpu count {os.cpu_count()}, host memory {host / GIB:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
