"""Planted bugs: realistic mistakes patched into the JAX model at test time (its source never changes).

Each mutant replaces one function of tp_llama.layers or tp_llama.model with a wrong version. The suite must
kill every one: `python -m conformance.mutants` runs pytest once per mutant (`pytest --mutant NAME`) and
prints which tests killed it; conformance/test_mutants.py checks a fast subset in the default run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from tp_llama import layers, model

F32, BF16 = jnp.float32, jnp.bfloat16
_original_rope_frequencies = layers.rope_frequencies
_original_all_reduce = model.all_reduce
_original_write_cache = layers.write_cache


def _rope_without_scaling(head_dim, theta, scaling):
    return _original_rope_frequencies(head_dim, theta, None)


def _rope_angles_in_bf16(positions, freqs):
    angles = positions.astype(BF16)[..., None] * freqs.astype(BF16)
    return jnp.cos(angles).astype(F32), jnp.sin(angles).astype(F32)


def _rotate_half(x, cos, sin):
    """HF's rotate-half applied to weights in Meta's interleaved layout."""
    half = x.shape[-1] // 2
    xf = x.astype(F32)
    x0, x1 = xf[..., :half], xf[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)


def _rms_norm_without_upcast(x, weight, eps):
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + jnp.asarray(eps, x.dtype))
    return normed * weight.astype(x.dtype)


def _rms_norm_llama2_eps(x, weight, eps):
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def _rms_norm_without_weight(x, weight, eps):
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _rms_norm_over_all_axes(x, weight, eps):
    """Mean square taken over the whole tensor instead of per token: rows leak into each other."""
    xf = x.astype(F32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def _kv_groups_interleaved(q, n_kv_heads):
    """Query head h reads kv head h % n_kv (jnp.tile order) instead of h // group (repeat order)."""
    b, s, h, d = q.shape
    return q.reshape(b, s, h // n_kv_heads, n_kv_heads, d).swapaxes(2, 3)


def _softmax_in_activation_dtype(scores, mask):
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def _causal_mask_sees_next(q_slots, kv_valid):
    t = jnp.arange(kv_valid.shape[-1])
    return (t[None, None, :] <= q_slots[:, :, None] + 1) & kv_valid[:, None, :]


_original_causal_mask = layers.causal_mask


def _decode_mask_hides_current(q_slots, kv_valid):
    """Decode steps (one query) cannot see the token being decoded; prefill is untouched."""
    if q_slots.shape[1] != 1:
        return _original_causal_mask(q_slots, kv_valid)
    t = jnp.arange(kv_valid.shape[-1])
    return (t[None, None, :] < q_slots[:, :, None]) & kv_valid[:, None, :]


def _swiglu_swapped(gate, up):
    return layers.silu_f32(up) * gate


def _skip_reduce_at(site):
    return lambda x, where: x if where == site else _original_all_reduce(x, where)


def _reduce_twice_at(site):
    def reduce(x, where):
        once = _original_all_reduce(x, where)
        return _original_all_reduce(once, where) if where == site else once
    return reduce


def _vocab_shards_reversed(local_vocab):
    return (jax.lax.psum(1, model.MODEL) - 1 - jax.lax.axis_index(model.MODEL)) * local_vocab


def _decode_writes_one_slot_late(cache, new, index):
    return _original_write_cache(cache, new, index + (new.shape[1] == 1))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    target: object
    attribute: str
    replacement: Callable


MUTANTS: dict[str, Mutant] = {m.name: m for m in [
    Mutant("rope_unscaled", "RoPE without the Llama 3.1 frequency scaling", layers, "rope_frequencies",
           _rope_without_scaling),
    Mutant("rope_bf16_phases", "RoPE angles computed in bfloat16", layers, "rope_angles", _rope_angles_in_bf16),
    Mutant("rope_rotate_half", "rotate-half applied to the interleaved layout", layers, "apply_rope", _rotate_half),
    Mutant("rmsnorm_no_upcast", "RMSNorm computed in the activation dtype", layers, "rms_norm",
           _rms_norm_without_upcast),
    Mutant("rmsnorm_eps", "RMSNorm with eps 1e-6 (Llama 2's) instead of the config's 1e-5", layers, "rms_norm",
           _rms_norm_llama2_eps),
    Mutant("rmsnorm_no_weight", "RMSNorm without its weight", layers, "rms_norm", _rms_norm_without_weight),
    Mutant("rmsnorm_all_axes", "RMSNorm's mean taken over the whole batch, not per token", layers, "rms_norm",
           _rms_norm_over_all_axes),
    Mutant("kv_group_order", "kv heads repeated in tile order instead of repeat order", layers,
           "group_query_heads", _kv_groups_interleaved),
    Mutant("softmax_bf16", "attention softmax in the activation dtype", layers, "attention_softmax",
           _softmax_in_activation_dtype),
    Mutant("attention_scale", "scores divided by head_dim instead of sqrt(head_dim)", layers, "score_divisor",
           lambda head_dim: float(head_dim)),
    Mutant("causal_off_by_one", "causal mask lets each token see the next one", layers, "causal_mask",
           _causal_mask_sees_next),
    Mutant("gate_up_swapped", "SwiGLU gate (w1) and up (w3) swapped", layers, "swiglu", _swiglu_swapped),
    Mutant("missing_psum_wo", "no all-reduce after the attention output projection", model, "all_reduce",
           _skip_reduce_at("wo")),
    Mutant("missing_psum_w2", "no all-reduce after the MLP down projection", model, "all_reduce",
           _skip_reduce_at("w2")),
    Mutant("double_psum_w2", "the MLP all-reduce applied twice", model, "all_reduce", _reduce_twice_at("w2")),
    Mutant("vocab_shards_reversed", "vocab shards of the embedding taken in reverse order", model,
           "vocab_shard_start", _vocab_shards_reversed),
    Mutant("decode_cache_slot", "decode writes the KV cache one slot late", layers, "write_cache",
           _decode_writes_one_slot_late),
    Mutant("decode_mask_off_by_one", "decode steps cannot see the token being decoded", layers, "causal_mask",
           _decode_mask_hides_current),
]}


def apply(name: str) -> Callable[[], None]:
    """Plant mutant `name`; returns the function that removes it."""
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose one of: {', '.join(MUTANTS)}")
    mutant = MUTANTS[name]
    original = getattr(mutant.target, mutant.attribute)
    setattr(mutant.target, mutant.attribute, mutant.replacement)
    return lambda: setattr(mutant.target, mutant.attribute, original)


@contextlib.contextmanager
def planted(name: str):
    undo = apply(name)
    try:
        yield MUTANTS[name]
    finally:
        undo()


# ---- the runner -----------------------------------------------------------------------------

FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
DTYPES = ("float32", "bfloat16")
# The kill matrix's selection: every component module, the decode path and the full forward, against Meta on
# 1x1 (kv grouping is visible only where a device holds several kv heads) and 1x4 (the all-reduces).
MATRIX_SELECTION = ["conformance/test_rmsnorm.py", "conformance/test_rope.py", "conformance/test_attention.py",
                    "conformance/test_mlp.py", "conformance/test_block.py", "conformance/test_kv_cache.py",
                    "conformance/test_logits.py", "--reference", "meta", "--mesh", "1x1", "--mesh", "1x4"]
MIN_MARGIN = 2.0

# Measured statements, as data beside the catalogue: (mutant, dtype) -> why the deviation is below that dtype's
# resolution at every realistic magnitude, so the matrix shows the cell as "below resolution" rather than a miss.
BELOW_RESOLUTION: dict[tuple[str, str], str] = {
    ("rmsnorm_no_upcast", "float32"): "the activation dtype is float32: the mutant computes exactly what the "
                                      "upcast computes (no-op).",
    ("softmax_bf16", "float32"): "the activation dtype is float32: softmax already runs in float32 (no-op).",
}


@dataclasses.dataclass
class Cell:
    """One mutant at one dtype: the tests that failed, the first one's worst failing metric and its margin."""

    killers: list[str]
    elapsed: float
    problem: str = ""
    metric: str = ""
    value: float = math.nan
    bound: float = math.nan
    margin: float = math.nan  # value / bound of the failing metric (budget used), inf for a raised error
    record: str = ""

    @property
    def killed(self) -> bool:
        return bool(self.killers)


def first_killer_margin(document: dict, killer: str) -> tuple[str, float, float, float, str]:
    """(metric, value, bound, margin, record name) of the worst failing metric among the killer test's failing
    records; margin = share of the bound used (value / bound, or distance from 1 for similarities). A record
    failed by an error (NaN, the implementation raised) has margin inf."""
    from parity.check import budget_used

    best = ("", math.nan, math.nan, -1.0, "")
    for record in document.get("records", []):
        if record.get("test") != killer or record.get("passed"):
            continue
        name = record.get("name") or record.get("component")
        if record.get("error") and not record.get("failed_metrics"):
            return ("error", math.nan, math.nan, math.inf, f"{name}: {record['error'][:60]}")
        for metric in record.get("failed_metrics", []):
            value, bound = float(record["metrics"][metric]), float(record["bounds"][metric])
            used = budget_used(metric, value, bound)
            if used > best[3]:
                best = (metric, value, bound, used, name)
    return best


def run_one(name: str, pytest_args: list[str], all_killers: bool, dtype: str | None = None,
            json_path: str | None = None) -> tuple[list[str], float, str]:
    """Run pytest with the mutant planted; the killers are the tests that failed."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "--mutant", name, "-p", "no:cacheprovider",
               *([] if all_killers else ["-x"]), *(["--dtype", dtype] if dtype else []),
               *([f"--parity-json={json_path}"] if json_path else []), *pytest_args]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    killers = FAILED_LINE.findall(done.stdout)
    if done.returncode not in (0, 1) or (done.returncode == 1 and not killers):
        return [], elapsed, f"pytest exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return killers, elapsed, ""


def run_cell(name: str, dtype: str, pytest_args: list[str], all_killers: bool) -> Cell:
    import json
    import os
    import tempfile

    handle, path = tempfile.mkstemp(prefix=f"mutant-{name}-{dtype}-", suffix=".json")
    os.close(handle)
    try:
        killers, elapsed, problem = run_one(name, pytest_args, all_killers, dtype, path)
        cell = Cell(killers, elapsed, problem)
        if killers:
            try:
                document = json.loads(open(path, encoding="utf-8").read())
            except (OSError, ValueError):
                document = {}
            cell.metric, cell.value, cell.bound, cell.margin, cell.record = first_killer_margin(document, killers[0])
        return cell
    finally:
        os.unlink(path)


def verdict(name: str, dtype: str, cell: Cell) -> str:
    if cell.problem and not cell.killed:
        return "ERROR"
    if not cell.killed:
        return "below-res" if (name, dtype) in BELOW_RESOLUTION else "SURVIVED"
    if cell.margin < MIN_MARGIN:
        return "weak"
    return "killed"


def _margin_text(cell: Cell) -> str:
    if not cell.killed:
        return "-"
    if math.isinf(cell.margin):
        return "error"
    if cell.margin < 0:
        return "?"
    return f"{cell.margin:.3g}x {cell.metric}"


def short_test(nodeid: str) -> str:
    return nodeid.replace("conformance/", "").replace(".py::", "::")


def matrix(names: list[str], dtypes: list[str], pytest_args: list[str], all_killers: bool,
           markdown: str | None, run_exempt: bool = False) -> int:
    print(f"{'mutant':24} {'dtype':9} {'verdict':10} {'margin':>20} {'time':>7}  first killer [tensor]", flush=True)
    rows, bad = [], 0
    for name in names:
        for dtype in dtypes:
            if (name, dtype) in BELOW_RESOLUTION and not run_exempt:
                cell = Cell([], 0.0)  # not run: the statement beside the catalogue says why (--run-exempt runs it)
            else:
                cell = run_cell(name, dtype, pytest_args, all_killers)
            v = verdict(name, dtype, cell)
            bad += v in ("SURVIVED", "ERROR", "weak")
            first = (short_test(cell.killers[0]) + (f" [{cell.record}]" if cell.record else "")) if cell.killed \
                else (BELOW_RESOLUTION.get((name, dtype)) or (cell.problem.splitlines()[0] if cell.problem else "-"))
            print(f"{name:24} {dtype:9} {v:10} {_margin_text(cell):>20} {cell.elapsed:6.1f}s  {first}", flush=True)
            if cell.problem:
                print(cell.problem, file=sys.stderr)
            rows.append((name, dtype, v, cell, first))
    print(f"{len(rows) - bad} of {len(rows)} cells killed with margin >= {MIN_MARGIN:g}x or below resolution")
    if markdown:
        lines = ["| mutant | dtype | verdict | margin (value / bound) | first killer [tensor] |", "|---|---|---|---|---|"]
        for name, dtype, v, cell, first in rows:
            detail = (f"{_margin_text(cell)} ({cell.value:.3g} / {cell.bound:.3g})"
                      if cell.killed and cell.margin == cell.margin and not math.isinf(cell.margin) and cell.metric
                      else _margin_text(cell))
            lines.append(f"| {name} | {dtype} | {v} | {detail} | {first.replace('|', '/')} |")
        with open(markdown, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        print(f"markdown table: {markdown}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.mutants",
                                     description="Run the suite once per planted bug and report which tests "
                                                 "killed it. Exit 1 when any bug survives.")
    parser.add_argument("--only", action="append", choices=sorted(MUTANTS), help="mutants to run (repeatable)")
    parser.add_argument("--all-killers", action="store_true",
                        help="run every test per mutant instead of stopping at the first failure")
    parser.add_argument("--matrix", action="store_true",
                        help="mutant x dtype: run each mutant at --dtype float32 and at --dtype bfloat16 (default "
                             "selection: the component modules, test_kv_cache and test_logits against meta on 1x1 "
                             "and 1x4) and print per cell killed / weak (margin < 2x) / SURVIVED / below-res, "
                             "the first killer and its margin (value / bound of its worst failing metric, from "
                             "the run's --parity-json)")
    parser.add_argument("--matrix-dtype", action="append", choices=DTYPES, help="with --matrix: dtypes (repeatable)")
    parser.add_argument("--markdown", metavar="PATH", help="with --matrix: also write the table as Markdown")
    parser.add_argument("--run-exempt", action="store_true",
                        help="with --matrix: also run the cells BELOW_RESOLUTION explains (skipped by default)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the default test selection; "
                                                       "with --matrix: MATRIX_SELECTION)")
    args = parser.parse_args(argv)
    names = args.only or list(MUTANTS)
    if args.matrix:
        return matrix(names, args.matrix_dtype or list(DTYPES), args.pytest_args or MATRIX_SELECTION,
                      args.all_killers, args.markdown, args.run_exempt)
    print(f"{'mutant':24} {'verdict':9} {'time':>7}  killed by")
    survivors = 0
    for name in names:
        killers, elapsed, problem = run_one(name, args.pytest_args, args.all_killers)
        verdict = "killed" if killers else ("ERROR" if problem else "SURVIVED")
        survivors += not killers
        first = killers[0] if killers else (problem.splitlines()[0] if problem else "-")
        more = f" (+{len(killers) - 1} more)" if len(killers) > 1 else ""
        print(f"{name:24} {verdict:9} {elapsed:6.1f}s  {first}{more}", flush=True)
        if problem:
            print(problem, file=sys.stderr)
    print(f"{len(names) - survivors} of {len(names)} planted bugs killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
