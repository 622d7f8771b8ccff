"""`llama-conformance doctor --impl MODULE:ATTR`: in seconds, whether an adapter keeps the protocol of
adapters/protocol.py, before the battery spends minutes on it and fails in ways that only say "not equal".

It builds the adapter on the tiny config at 1x1 (float32) and 1x4 (bfloat16), calls each capability once and checks
the contract, not the precision (the battery judges precision). It prints one row per capability, ok / missing /
wrong, with the fix for each wrong one; exit status 1 when anything present is wrong (a missing optional capability
is no error, a missing forward is). What it checks: docs/internals.md#the-doctor.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from adapters import protocol
from conformance.plugin import SIMULATED_CPU_DEVICES, _simulate_cpu_devices
from conformance.sharding import STACKED, candidates, check_array, contract_local_shapes, names_covered, rank_of
from llama_spec.config import preset
from llama_spec.convert import interleaved_to_halves_last_axis
from llama_spec.host import host
from llama_spec.layout import kv_replication, make_mesh
from llama_spec.synthetic import canonical_weights, make_tokens
from parity import communication
from parity.metrics import noise_ratio, rel_l2
from parity.tolerances import bounds_for
from reference import oracle
from reference.layers import LAYER_KEYS, intermediate_names, layer_weights
from reference.meta import MetaReference
from reference.oracle import oracle_forward
from tp_llama.compile_cache import enable_compilation_cache

BATCH, SEQ = 2, 8
BUILDS = (("1x1", "float32"), ("1x4", "bfloat16"))
# The capabilities run on 1x1 too (the rest only on 1x4: one call each is enough to read their contract).
ON_EVERY_BUILD = ("forward", "compiled_forward", "parameters")
# rel_l2 to the float64 oracle below which an output agrees: bfloat16 rounding measures 2e-3 .. 8e-3 on these
# inputs, a wrong RoPE layout about 1.4 (the built-in, examples.simple_llama and examples/broken, 1x4 bfloat16).
AGREE = 0.05
FLOATS = ("float16", "bfloat16", "float32", "float64")
# The battery module that checks each capability in full: the fix when an output departs from the oracle.
MODULES = {"forward": "test_logits", "decode": "test_kv_cache", "rms_norm": "test_rmsnorm", "rope": "test_rope",
           "attention": "test_attention", "feed_forward": "test_mlp", "block": "test_block", "head": "test_logits"}
HALF_LAYOUT_FIX = ("return Meta's interleaved pairs (2i, 2i+1): convert each head with "
                   "llama_spec.convert.halves_to_interleaved_last_axis(x), that is "
                   "x.reshape(*x.shape[:-1], 2, head_dim // 2).swapaxes(-1, -2).reshape(x.shape)")


@dataclasses.dataclass(frozen=True)
class Problem:
    what: str
    fix: str


@dataclasses.dataclass
class Findings:
    """What the checks of one capability found, over every build."""
    checked: bool = False  # False when no build of the adapter got this far
    missing: str | None = None
    problems: dict[Problem, list[str]] = dataclasses.field(default_factory=dict)  # -> the builds it was seen on
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.problems:
            return "wrong"
        return "missing" if self.missing else "ok" if self.checked else "unchecked"


@dataclasses.dataclass
class Build:
    """One build of the adapter, and the tiny inputs and weights every check of it uses."""
    spec: str
    adapter: Any
    config: Any
    mesh_text: str
    mesh: Any
    dtype: str
    weights: dict  # the canonical weights rounded to the dtype: what the float64 oracle computes with

    @property
    def label(self) -> str:
        return f"{self.mesh_text} {self.dtype}"

    @functools.cached_property
    def inputs(self) -> dict[str, np.ndarray]:
        """Tokens, and hidden states, q and k holding values exact in the dtype (as the battery hands them)."""
        c, rng = self.config, np.random.default_rng(7)
        normal = lambda *shape: _rounded(rng.standard_normal(shape), self.dtype)  # noqa: E731
        return {"tokens": make_tokens(c, BATCH, SEQ), "x": normal(BATCH, SEQ, c.dim),
                "q": normal(BATCH, SEQ, c.n_heads, c.head_dim), "k": normal(BATCH, SEQ, c.n_kv_heads, c.head_dim)}


@dataclasses.dataclass
class Report:
    spec: str
    findings: dict[str, Findings]
    seconds: float

    def exit_status(self) -> int:
        wrong = any(f.verdict == "wrong" for f in self.findings.values())
        return 1 if wrong or self.findings["forward"].verdict == "missing" else 0

    def fixes(self, capability: str) -> list[str]:
        return [p.fix for p in self.findings[capability].problems]

    def table(self) -> str:
        width = max(map(len, self.findings))
        lines = [f"llama-conformance doctor --impl {self.spec}: the tiny config on "
                 + " and ".join(f"{mesh} ({dtype})" for mesh, dtype in BUILDS), ""]
        for capability, found in self.findings.items():
            details = ([found.missing] if found.missing else []) + found.notes
            first = details[0] if details else ""
            lines.append(f"{capability.ljust(width)}  {found.verdict.ljust(9)}  {first}".rstrip())
            pad = " " * (width + 13)
            lines += [pad + d for d in details[1:]]
            for problem, builds in found.problems.items():
                lines.append(f"{pad}- {problem.what}" + (f" [{', '.join(builds)}]" if builds else ""))
                lines.append(f"{pad}  fix: {problem.fix}")
        wrong = [c for c, f in self.findings.items() if f.verdict == "wrong"]
        verdict = f"wrong: {', '.join(wrong)}" if wrong else "every capability present keeps the protocol"
        if self.findings["forward"].verdict == "missing":
            verdict = "forward is missing: nothing can be checked"
        lines += ["", f"{verdict} ({self.seconds:.1f} s); exit status {self.exit_status()}"]
        return "\n".join(lines)


# ---- helpers ----------------------------------------------------------------------------------

def _rounded(x, dtype: str) -> np.ndarray:
    """x as float32 holding values exactly representable in `dtype` (what the adapter is handed)."""
    x = np.asarray(x, np.float32)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else x


def _raised(call: str, err: Exception, protocol_name: str) -> Problem:
    """An adapter call that raised, with where: the innermost frame outside installed packages (JAX's own frames
    would say nothing of the adapter's code)."""
    frames = traceback.extract_tb(err.__traceback__)
    frame = ([f for f in frames if "-packages" not in f.filename] or frames)[-1]
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return Problem(f"{call} raised {type(err).__name__}: {message} (at {frame.filename}:{frame.lineno})",
                   f"make it run on the inputs adapters/protocol.py gives {protocol_name}")


def _shape_problem(name: str, value, shape: tuple[int, ...], fix: str | None = None) -> Problem | None:
    """None when `value` is an array of `shape`."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        return Problem(f"{name} is a {type(value).__name__}, not an array", "return a NumPy array or a jax.Array")
    if tuple(value.shape) != tuple(shape):
        return Problem(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}",
                       fix or "return the shapes adapters/protocol.py and reference/layers.py give")
    return None


def _dtype_problem(call: str, got: Mapping[str, str], dtype: str) -> Problem | None:
    """One problem for every output of a call that came back in another dtype than the one asked for."""
    if not got:
        return None
    listed = _names([f"{name} ({found})" for name, found in got.items()])
    return Problem(f"asked for {dtype}, {_count(len(got), 'output')} of {call} came back in another dtype: {listed}",
                   f"return them in {dtype}, the dtype build() was given (and compute in it: conformance/"
                   "test_dtype.py fails float32 arithmetic behind bfloat16 outputs)")


def _departs(name: str, actual, exact, capability: str, spec: str) -> Problem | None:
    """None when an output agrees with the float64 oracle to AGREE, else the battery module that shows how."""
    error = rel_l2(host(actual), exact)
    if error <= AGREE:
        return None
    return Problem(f"{name} departs from the float64 oracle (rel_l2 {error:.3g}; rounding stays below {AGREE})",
                   f"see how: llama-conformance --impl {spec} --module {MODULES[capability]} -x")


def _in_half_layout(actual, exact) -> bool:
    """q or k that agree with the oracle only once the oracle's are put in HF's rotate-half layout."""
    actual = host(actual)
    return rel_l2(actual, exact) > AGREE and rel_l2(actual, interleaved_to_halves_last_axis(exact)) <= AGREE


def _carries(value, dtype: str) -> bool:
    """Whether a component's output holds `dtype` values: an array of that dtype, or a float32 host copy of bfloat16
    values (the built-in's components return those; the battery compares every output as float32)."""
    got = protocol.dtype_of(value)
    if got == dtype or (got, dtype) != ("float32", "bfloat16"):
        return got == dtype
    values = host(value)
    return bool(np.array_equal(values, _rounded(values, dtype)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


def _names(items: Sequence[str]) -> str:
    """The first few of a list, and how many more."""
    return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")


# ---- forward ----------------------------------------------------------------------------------

def check_forward(build: Build, add, note) -> None:
    """Logits and intermediates: types, shapes, dtypes, names, RoPE layout, rough agreement with the oracle; at
    bfloat16 the noise floor of conformance/test_dtype.py."""
    adapter, config, dtype, tokens = build.adapter, build.config, build.dtype, build.inputs["tokens"]
    exact_logits, exact = oracle_forward(config, build.weights, tokens, capture=True)
    try:
        plain = adapter.forward(tokens)
    except Exception as err:  # noqa: BLE001 - the adapter's error is the finding
        return add(_raised("forward(tokens)", err, "Forward"))
    add(_shape_problem("forward(tokens)", plain, exact_logits.shape,
                       "return the logits alone, (batch, seq, vocab), when capture is False"))
    try:
        logits, taps = protocol.forward(adapter, tokens)
    except protocol.AdapterError as err:
        return add(Problem(str(err), "return (logits, {name: array}) when capture=True"))
    except Exception as err:  # noqa: BLE001
        return add(_raised("forward(tokens, capture=True)", err, "Forward"))
    add(_shape_problem("logits", logits, exact_logits.shape))
    wrong_dtypes = {}
    if hasattr(logits, "dtype") and protocol.dtype_of(logits) not in (dtype, "float32"):
        wrong_dtypes["logits"] = protocol.dtype_of(logits)

    known = [n for n in intermediate_names(config.n_layers) if n != "logits"]
    for name in sorted(set(taps) - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        add(Problem(f"intermediate {name!r} is not a name of reference/layers.py (the battery fails unknown names)",
                    f"rename it {close[0]!r}" if close else f"use the names of reference/layers.py ({known[1]}, ...)"))
    missing = [n for n in known if n not in taps]
    note(f"captures {len(known) - len(missing)} of {len(known)} intermediates"
         + (f"; not captured, so not checked: {_names(missing)}" if missing else ""))

    copies = kv_replication(config, build.mesh.shape["model"])
    replicated = (BATCH, SEQ, config.n_kv_heads * copies, config.head_dim)
    half, departed = [], None
    for name in (n for n in known if n in taps):
        value = taps[name]
        kv_fix = (f"return each kv head once (n_kv_heads={config.n_kv_heads}): drop the copies, k[:, :, ::{copies}]"
                  if name.endswith("k_rope") and copies > 1 and getattr(value, "shape", None) == replicated else None)
        shape = _shape_problem(name, value, exact[name].shape, kv_fix)
        if shape:
            add(shape)
            continue
        if protocol.dtype_of(value) != dtype:
            wrong_dtypes[name] = protocol.dtype_of(value)
        if name.endswith(("q_rope", "k_rope")) and _in_half_layout(value, exact[name]):
            half.append(name)
        elif departed is None:  # the first one only: what follows a departure departs with it
            departed = _departs(name, value, exact[name], "forward", build.spec)
    if half:
        add(Problem(f"{_names(half)} come back in HF's rotate-half layout (i, i + head_dim/2)", HALF_LAYOUT_FIX))
    add(departed or _departs("logits", logits, exact_logits, "forward", build.spec))
    add(_dtype_problem("forward(capture=True)", wrong_dtypes, dtype))
    if dtype == "bfloat16":
        add(_noise_floor(config, tokens, logits, exact_logits))


def _noise_floor(config, tokens, logits, exact_logits) -> Problem | None:
    """conformance/test_dtype.py's floor: a bfloat16 run as exact as float32 computes in float32 behind its outputs."""
    weights = canonical_weights("tiny")
    meta_logits, _ = MetaReference(config, weights, "bfloat16", max_batch_size=BATCH, max_seq_len=SEQ).forward(
        tokens, 0, capture=True)
    actual = host(logits)
    floor = min(noise_ratio(actual, meta_logits, exact, dtype="bfloat16")
                for exact in (exact_logits, oracle_forward(config, weights, tokens)))
    bound = bounds_for("dtype", "bfloat16", "default")["noise_floor_ratio"]
    if floor >= bound:
        return None
    return Problem(f"asked for bfloat16, its logits are as exact as float32: noise_floor_ratio {floor:.2g} (Meta's "
                   f"own bfloat16 measures 1; the battery's bound is {bound})",
                   "keep the weights in bfloat16 and compute in bfloat16, rounding every activation as Meta does "
                   "(float32 accumulation inside a matmul and float32 norms and softmax are fine)")


# ---- decode and the components ----------------------------------------------------------------

def check_decode(build: Build, add, note) -> None:
    """One prefill step into a fresh cache, with pad and offset when step takes them (zeros: same numbers)."""
    adapter, tokens = build.adapter, build.inputs["tokens"]
    keywords = {"pad": np.zeros(BATCH, np.int32), "offset": 0}
    taken = {k: v for k, v in keywords.items() if protocol.step_accepts(adapter, k)}
    unchecked = {"pad": "left-padded batches", "offset": "sequences starting past position 0"}
    note("step takes " + (" and ".join(taken) or "neither pad nor offset")
         + "".join(f"; without {k} the battery does not check {unchecked[k]}" for k in keywords if k not in taken))
    try:
        out = adapter.step(tokens, 0, adapter.init_cache(BATCH, SEQ), **taken)
    except Exception as err:  # noqa: BLE001
        return add(_raised("step(tokens, 0, init_cache(batch, length))", err, "Decode"))
    if not (isinstance(out, tuple) and len(out) == 2):
        return add(Problem(f"step returned a {type(out).__name__}, not (logits, new cache)",
                           "return (logits, cache) from step"))
    exact = oracle_forward(build.config, build.weights, tokens)
    add(_shape_problem("step's logits", out[0], exact.shape)
        or _departs("step's logits", out[0], exact, "decode", build.spec))
    if hasattr(out[0], "dtype") and protocol.dtype_of(out[0]) not in (build.dtype, "float32"):
        add(_dtype_problem("step", {"logits": protocol.dtype_of(out[0])}, build.dtype))


def _component_call(capability: str, build: Build):
    """(call as text, the call on an adapter, the oracle's outputs, dtypes allowed besides the asked one)."""
    config, w, inputs = build.config, build.weights, build.inputs
    x, q, k, lw, eps = inputs["x"], inputs["q"], inputs["k"], layer_weights(build.weights, 1), config.norm_eps
    chunks = [x[:, :5], x[:, 5:]]
    if capability == "rms_norm":
        return ("rms_norm(x, 1, 'ffn_norm')", lambda a: [a.rms_norm(x, 1, "ffn_norm")],
                [oracle.oracle_rms_norm(x, lw["ffn_norm"], eps)], ())
    if capability == "rope":
        return "rope(q, k, 3)", lambda a: list(a.rope(q, k, 3)), list(oracle.oracle_rope(q, k, config, 3)), ()
    if capability == "attention":
        return ("attention([x[:, :5], x[:, 5:]], 1, 0)", lambda a: list(a.attention(chunks, 1, 0)),
                oracle.oracle_attention(chunks, lw, config), ())
    if capability == "feed_forward":
        return ("feed_forward(x, 1)", lambda a: [a.feed_forward(x, 1)],
                [oracle.oracle_feed_forward(x, lw["w1"], lw["w2"], lw["w3"])], ())
    if capability == "block":
        return "block(x, 1, 0)", lambda a: [a.block(x, 1, 0)], [oracle.oracle_block(x, lw, config)], ()
    return ("head(x)", lambda a: [a.head(x)], [oracle.oracle_head(x, w["norm.weight"], w["output.weight"], eps)],
            ("float32",))


def check_component(capability: str, build: Build, add, note) -> None:
    """One call of a component: its outputs' number, shapes, dtypes, RoPE layout and rough agreement."""
    call, run, exact, also = _component_call(capability, build)
    name = protocol.CAPABILITIES[capability].__name__
    try:
        outputs = run(build.adapter)
    except Exception as err:  # noqa: BLE001
        return add(_raised(call, err, name))
    if len(outputs) != len(exact):
        return add(Problem(f"{call} returned {len(outputs)} outputs, expected {len(exact)}",
                           f"return what the {name} protocol of adapters/protocol.py says"))
    labels = [f"{call}[{i}]" for i in range(len(exact))] if len(exact) > 1 else [call]
    wrong_dtypes = {}
    for label, value, want in zip(labels, outputs, exact):
        shape = _shape_problem(label, value, want.shape)
        if shape:
            add(shape)
            continue
        if protocol.dtype_of(value) not in also and not _carries(value, build.dtype):
            wrong_dtypes[label] = protocol.dtype_of(value)
        if capability == "rope" and _in_half_layout(value, want):
            add(Problem(f"{label} comes back in HF's rotate-half layout (i, i + head_dim/2)", HALF_LAYOUT_FIX))
        else:
            add(_departs(label, value, want, capability, build.spec))
    add(_dtype_problem(capability, wrong_dtypes, build.dtype))


# ---- compiled_forward ---------------------------------------------------------------------------

def check_compiled(build: Build, add, note) -> None:
    """It compiles (a Compiled, a Lowered or HLO text) and communicates as conformance/test_communication.py wants."""
    import jax


    try:
        program = build.adapter.compiled_forward(BATCH, SEQ)
    except Exception as err:  # noqa: BLE001
        return add(_raised(f"compiled_forward({BATCH}, {SEQ})", err, "CompiledProgram"))
    if not isinstance(program, (jax.stages.Compiled, jax.stages.Lowered, str)):
        return add(Problem(f"compiled_forward returned a {type(program).__name__}, not a compiled program",
                           "return jax.jit(f).lower(params, tokens, ...).compile() of the program forward runs "
                           "(a jax.stages.Compiled; its Lowered or its optimised HLO text also do)"))
    c, (data, model) = build.config, build.mesh.devices.shape
    expect = communication.Expectation(c.n_layers, c.dim, c.vocab_size, data, model, BATCH, SEQ, build.dtype)
    found = communication.collectives(communication.hlo_text(program))
    problems = communication.megatron_problems(found, expect)
    note(f"{build.mesh_text}: {_count(len(found), 'collective')} in its optimised HLO")
    if not problems:
        return
    allowed = communication.caller_gathers(found, expect)
    moved = sorted({communication.short_op_name(c.feeder_op_name) for c in found
                    if c.kind != "all-reduce" and c not in allowed and c.feeder_op_name})
    if model > 1 and not any(c.kind == "all-reduce" for c in found):
        fix = ("run the program on the mesh build() receives, with the weights split over its model axis "
               "(parameters() shows where they live)")
    elif moved:
        fix = (f"split as Megatron does, so that nothing is gathered (here the data moved is fed by {_names(moved)}):"
               " wq wk wv w1 w3 column-parallel, wo and w2 row-parallel (on their input features) each ending in one"
               " all-reduce, kv heads replicated when the model axis exceeds n_kv_heads")
    else:
        fix = f"expected: {expect.text()} (parity/communication.py)"
    more = f" (and {_count(len(problems) - 1, 'more problem')})" if len(problems) > 1 else ""
    add(Problem(problems[0] + more, fix))


# ---- parameters -------------------------------------------------------------------------------

def _meta_tensor_in(array, weights, config, m: int) -> str | None:
    """The Meta name (or 'layers.*.<name>' stack) whose tensor `array` holds in a layout the sharding check knows."""
    held = np.asarray(array)
    for key in [*weights, *(STACKED + suffix for suffix in LAYER_KEYS.values())]:
        for _, full, _ in candidates(key, names_covered(key, weights), weights, config, m):
            if full.shape == held.shape and np.array_equal(held, full.astype(held.dtype)):
                return key
    return None


def check_parameters(build: Build, add, note) -> None:
    """What conformance/test_sharding.py reads: jax.Arrays under Meta names, in the dtype, on the mesh, each device
    holding its share and its slice (kv heads replicated when the model axis exceeds n_kv_heads)."""
    import jax


    config, dtype, mesh, weights = build.config, build.dtype, build.mesh, canonical_weights("tiny")
    try:
        params = build.adapter.parameters()
    except Exception as err:  # noqa: BLE001
        return add(_raised("parameters()", err, "Parameters"))
    if not isinstance(params, Mapping):
        return add(Problem(f"parameters() returned a {type(params).__name__}, not a mapping",
                           "return {name: placed jax.Array}, keyed by Meta's names"))
    m = mesh.shape["model"]
    copies, devices, ranks, local = kv_replication(config, m), set(mesh.devices.flat), rank_of(mesh), \
        contract_local_shapes(config, m)
    found: dict[str, list[str]] = {kind: [] for kind in (*PARAMETER_FIXES, "own")}
    example: dict[str, str] = {}  # the sharding check's own line for the first key of a kind
    renames, held = [], {d: 0 for d in devices}
    for key, array in params.items():
        if not isinstance(array, jax.Array):
            found["host"].append(key)
            continue
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.size
        if protocol.dtype_of(array) in FLOATS and protocol.dtype_of(array) != dtype:
            found["dtype"].append(f"{key} ({protocol.dtype_of(array)})")
        if set(array.sharding.device_set) != devices:
            found["devices"].append(key)
        names = names_covered(key, weights)
        if not names:
            meta = _meta_tensor_in(array, weights, config, m)
            found["renamed" if meta else "own"].append(key)
            renames += [f"{key!r} to {meta!r}"] if meta else []
            continue
        lines: list[str] = []
        verdict = check_array(key, array, names, weights, config, m, ranks, lines)
        share = sum(int(np.prod(local[n])) for n in names) // copies
        kv_once = key.endswith(("wk.weight", "wv.weight")) and copies > 1 and \
            {s.data.size for s in array.addressable_shards} == {share}
        kind = {"wrong share": "kv" if kv_once else "share", "wrong content": "slice"}.get(verdict)
        if kind:
            found[kind].append(key)
            example.setdefault(kind, lines[0])
    contract = sum(int(np.prod(shape)) for shape in local.values())
    if not any(found[kind] for kind in ("devices", "kv", "share", "slice")):  # else those explain the totals
        found["total"] = [f"device {d.id} ({n})" for d, n in sorted(held.items(), key=lambda dn: dn[0].id)
                          if d in devices and n != contract]
    note(f"{build.mesh_text}: {_count(len(params), 'parameter')}" + (
        f"; under its own names (the sharding check only counts them): {_names(found['own'])}" if found["own"] else ""))
    for kind, (what, fix) in PARAMETER_FIXES.items():
        if found[kind]:
            what, fix = (text.format(dtype=dtype, m=m, copies=copies, kv=config.n_kv_heads, contract=contract,
                                     devices=sorted(d.id for d in devices), renames=", ".join(renames))
                         for text in (what, fix))
            detail = f"; e.g. {example[kind]}" if kind in example else ""
            add(Problem(f"{what}: {_names(found[kind])}{detail}", fix))


# Each kind of parameter problem: (what, fix), formatted with the build's numbers. Keys under the implementation's
# own names that hold no Meta tensor are allowed by the protocol (a fused qkv, say): they are only noted.
PARAMETER_FIXES = {
    "host": ("parameters that are not placed jax.Arrays",
             "return the placed jax.Arrays themselves: the check reads their sharding"),
    "dtype": ("parameters not in {dtype}", "place the weights in {dtype}, the dtype build() was given"),
    "devices": ("parameters not on the mesh's devices {devices}",
                "place every parameter on the mesh build() receives (NamedSharding(mesh, spec) of that mesh, not of "
                "jax.devices())"),
    "renamed": ("Meta tensors under a name the sharding check cannot read",
                "key them by Meta's names: rename {renames} ('layers.*.<name>' for a stack of every layer's)"),
    "kv": ("kv projections holding half a kv head per device (n_kv_heads={kv} split {m} ways)",
           "replicate the kv heads: on a model axis of {m} each device holds one whole kv head, so repeat each kv "
           "head's rows of wk and wv {copies} times in place (kv0, kv0, kv1, kv1, ...: "
           "tp_llama.shardings.replicate_kv_heads) before splitting them over the model axis"),
    "share": ("parameters not split 1/{m} per device as the contract says",
              "split wq wk wv w1 w3 on their outputs, wo and w2 on their inputs, tok_embeddings and output on vocab, "
              "and keep the norms whole (conformance/test_sharding.py META_SPLIT_AXIS)"),
    "slice": ("parameters holding another slice than their device's model rank is assigned",
              "model rank r holds the r-th 1/{m} of the split axis: wq wk wv w1 w3 split on their output features, "
              "wo and w2 on their input features (row-parallel), tok_embeddings and output on vocab"),
    "total": ("devices holding another number of parameter elements than the contract's {contract}",
              "split the weights held under the implementation's own names as the contract splits the Meta tensors "
              "they hold (conformance/test_sharding.py)"),
}


# ---- the run ----------------------------------------------------------------------------------

CHECKS = {"forward": check_forward, "decode": check_decode, "compiled_forward": check_compiled,
          "parameters": check_parameters}


def _check(capability: str, build: Build, findings: Findings) -> None:
    def add(problem: Problem | None) -> None:
        if problem is not None:
            findings.problems.setdefault(problem, []).append(build.label)

    def note(text: str) -> None:
        if text not in findings.notes:
            findings.notes.append(text)

    findings.checked = True
    findings.missing = protocol.missing(build.adapter, capability)
    if findings.missing:
        return
    if capability in CHECKS:
        CHECKS[capability](build, add, note)
    else:
        check_component(capability, build, add, note)


def _note_missing(factory, config, weights, mesh, dtype: str, findings: dict[str, Findings]) -> None:
    """An adapter without forward (a fresh init-adapter skeleton): its other capabilities reported missing or not,
    from the object its build returns, though none can be called without forward."""
    accepted = protocol.accepted_hints(factory)
    hints = {k: v for k, v in (("max_batch_size", BATCH), ("max_seq_len", SEQ)) if k in accepted}
    adapter = factory.build(config, weights, mesh, dtype, **hints)
    for capability, found in findings.items():
        if capability != "forward":
            found.missing = protocol.missing(adapter, capability)


def diagnose(spec: str) -> Report:
    """Every check on the adapter `spec` names (JAX must already see at least 4 devices)."""
    start = time.perf_counter()
    config, weights = preset("tiny"), canonical_weights("tiny")
    findings = {capability: Findings() for capability in protocol.CAPABILITIES}
    forward = findings["forward"]
    try:
        factory = protocol.load(spec)
    except protocol.AdapterError as err:
        forward.problems[Problem(str(err), "give --impl MODULE:ATTR of a factory with build()")] = []
        return Report(spec, findings, time.perf_counter() - start)
    for mesh_text, dtype in BUILDS:
        mesh = make_mesh(mesh_text)
        try:
            adapter = protocol.build(factory, config, weights, mesh, dtype, max_batch_size=BATCH, max_seq_len=SEQ)
        except protocol.AdapterError as err:
            if "has no forward" in str(err):  # protocol.checked's words for an adapter without forward
                forward.missing = str(err)
                _note_missing(factory, config, weights, mesh, dtype, findings)
            else:
                forward.problems.setdefault(Problem(str(err), "see adapters/protocol.py"), []).append(mesh_text)
            continue
        except Exception as err:  # noqa: BLE001
            problem = _raised(f"{protocol.name_of(factory)}.build on {mesh_text} at {dtype}", err, "build")
            forward.problems.setdefault(problem, []).append(mesh_text)
            continue
        build = Build(spec, adapter, config, mesh_text, mesh, dtype,
                      {name: _rounded(value, dtype) for name, value in weights.items()})
        for capability in protocol.CAPABILITIES:
            if mesh_text == "1x4" or capability in ON_EVERY_BUILD:
                _check(capability, build, findings[capability])
    return Report(spec, findings, time.perf_counter() - start)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-conformance doctor", allow_abbrev=False,
        description="Check in seconds that an adapter keeps the protocol of adapters/protocol.py: each capability "
                    "ok, missing or wrong, with the fix. Exit status 1 when anything present is wrong.")
    parser.add_argument("--impl", metavar="MODULE:ATTR", default=protocol.BUILTIN,
                        help="the adapter factory, importable from the current directory "
                             f"(default: {protocol.BUILTIN})")
    return parser


def main(argv: Sequence[str]) -> int:
    """A fresh process: simulate the CPU devices before JAX starts, as the suite's plugin does."""
    options = _parser().parse_args(list(argv))
    _simulate_cpu_devices(SIMULATED_CPU_DEVICES)
    enable_compilation_cache()  # as the suite: $TP_LLAMA_COMPILATION_CACHE, or 'off'
    report = diagnose(options.impl)
    print(report.table())
    return report.exit_status()
