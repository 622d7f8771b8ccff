"""What a compiled program communicates, read from its optimised HLO, judged against the Megatron layout.

`collectives(hlo)` lists every collective with its kind, bytes per execution on one device (the whole tensor
reduced or produced, not what the wire algorithm sends), trips per call, group size, layer and feeding op.
`megatron_problems` holds the list against docs/architecture.md#sharding-contract (one sum for the embedding and
two per layer; nothing at M = 1; an all-gather of the output logits is the caller's gather, not a failure), and
`assert_megatron` records the summary and raises naming every contradiction (docs/internals.md#communication).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterable, Mapping

from parity.check import RECORD_KEY, dtype_name, mesh_name

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast",
         "ragged-all-to-all")
_DONE = tuple(f"{k}-done" for k in KINDS) + ("async-done", "async-update")
_PASS_THROUGH = {"bitcast", "copy", "reshape", "convert", "transpose", "bitcast-convert"}
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                  "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_NUMPY_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([^\]]*)\]")
_LAYER = re.compile(r"(?<![A-Za-z])layers?[._/-]?(\d+)(?!\d)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")


# ---- parsing ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
    """One line of HLO text: `[ROOT] %name = shape opcode(operands), attributes`."""
    name: str
    shape: str
    opcode: str
    operands: list[str]   # names of the operand instructions
    arguments: str        # the raw text between the parentheses: a parameter's index, a constant's value
    attributes: str
    root: bool

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=%?([\w.\-]+)", self.attributes)
        return match.group(1) if match else None

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="((?:[^"\\]|\\.)*)"', self.attributes)
        return match.group(1) if match else ""


@dataclasses.dataclass
class Module:
    """The computations of an HLO module by name, its ENTRY, and num_partitions from the module line."""
    computations: dict[str, dict[str, Instruction]]
    entry: str
    partitions: int | None


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def _instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    root, name, rest = bool(match.group(1)), match.group(2), match.group(3)
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode_match = re.match(r"([\w\-]+)\(", rest)
    if not opcode_match:
        return None
    close = _closing(rest, opcode_match.end() - 1)
    arguments = rest[opcode_match.end():close - 1]
    operands = re.findall(r"%([\w.\-]+)", arguments)
    return Instruction(name, shape, opcode_match.group(1), operands, arguments, rest[close:], root)


def parse(hlo: str) -> Module:
    """The computations of an HLO module's text, each a dict of instructions by name, in order."""
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current = None, None
    partitions = re.search(r"\bnum_partitions=(\d+)", hlo.split("\n", 1)[0])
    for line in hlo.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = computations.setdefault(header.group(2), {})
                if header.group(1):
                    entry = header.group(2)
            continue
        if line.startswith("}"):
            current = None
            continue
        instruction = _instruction(line)
        if instruction:
            current[instruction.name] = instruction
    if entry is None:
        raise ValueError("not an HLO module: no ENTRY computation (give the compiled program's as_text())")
    return Module(computations, entry, int(partitions.group(1)) if partitions else None)


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array of a (possibly tuple) HLO shape: [('f32', (2, 8, 128)), ...]."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        sizes = tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
        out.append((dtype, sizes))
    return out


def _elements(dims: tuple[int, ...]) -> int:
    return math.prod(dims)


def _bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return math.ceil(_ELEMENT_BYTES.get(dtype, 0) * _elements(dims))


def group_size(instruction: Instruction, partitions: int | None) -> int | None:
    """Devices per replica group: explicit {{0,1,2,3},...}, iota [G,S]<=[...], mesh axes {'axis'}, or {} (all)."""
    text = instruction.attributes
    explicit = re.search(r"replica_groups=\{(\{[\d,\s]*\})", text)
    if explicit:
        return len([d for d in explicit.group(1).strip("{}").split(",") if d.strip()])
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", text)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", text)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        axes = re.findall(r"'([^']+)'(?!:)", mesh.group(2))
        if axes and all(a in sizes for a in axes):
            return math.prod(int(sizes[a]) for a in axes)
        return None
    if re.search(r"replica_groups=\{\}", text) or "replica_groups" not in text:
        return partitions
    return None


# ---- the collectives of a program ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program."""
    kind: str
    instruction: str
    operands: tuple[tuple[str, tuple[int, ...]], ...]   # (dtype, dims) of each summed / moved tensor
    result: str                                          # the HLO result shape
    bytes: int                                           # per execution, on one device (see the module doc)
    executions: int                                      # per call of the program
    loop: str | None                                     # '%while.11 (2 trips)' when inside loops
    trip_count_known: bool
    group_size: int | None
    layer: int | None
    op_name: str
    feeder: str                                          # opcode of the op that produces the first operand
    feeder_op_name: str
    output: bool                                         # its result is (a pass-through of) the program's output

    @property
    def elements(self) -> list[int]:
        return [_elements(dims) for _, dims in self.operands]

    def where(self, n_layers: int | None = None) -> str:
        """'layer 3' from the op_name; inside a loop run once per layer, 'every layer (...)'; else the loop."""
        if self.layer is not None:
            return f"layer {self.layer}"
        if self.loop and self.executions == n_layers:
            return f"every layer (one iteration of {self.loop} each)"
        if self.loop:
            return f"every iteration of {self.loop}"
        return "outside the layers"

    def describe(self) -> str:
        shapes = ", ".join(f"{d}[{','.join(map(str, s))}]" for d, s in self.operands)
        if self.kind == "all-gather":
            shapes += f" -> {self.result}"
        runs = f", x{self.executions}" if self.executions != 1 else ""
        group = f" over {self.group_size} devices" if self.group_size else ""
        fed = f" fed by {self.feeder} '{short_op_name(self.feeder_op_name)}'" if self.feeder else ""
        return f"{self.kind} %{self.instruction} of {shapes} ({self.bytes} B{runs}){group}{fed}"

    def as_json(self, n_layers: int | None = None) -> dict[str, Any]:
        return {"kind": self.kind, "instruction": self.instruction, "where": self.where(n_layers),
                "layer": self.layer,
                "loop": self.loop, "executions": self.executions, "trip_count_known": self.trip_count_known,
                "shapes": [f"{d}[{','.join(map(str, s))}]" for d, s in self.operands], "bytes": self.bytes,
                "group_size": self.group_size, "op_name": self.op_name, "feeder": self.feeder,
                "feeder_op_name": self.feeder_op_name, "output": self.output}


def short_op_name(op_name: str) -> str:
    """op_name without its jit(...) prefixes: 'jit(local)/shard_map/Transformer/layers_0/...' -> 'shard_map/...'."""
    return re.sub(r"^(?:jit\([^)]*\)/)+", "", op_name)


def _trip_count(module: Module, loop: Instruction) -> int | None:
    """known_trip_count from the backend config, else N - init for a condition `i < N` with one constant N."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
        return int(known.group(1))
    condition = module.computations.get(loop.attribute("condition") or "", {})
    called = [module.computations.get(i.attribute("calls") or "", {}) for i in condition.values()]
    body = [i for comp in (condition, *called) for i in comp.values()]
    constants = [int(i.arguments) for i in body if i.opcode == "constant"
                 and re.fullmatch(r"[su]\d+\[\]", i.shape) and re.fullmatch(r"-?\d+", i.arguments)]
    compares = [i for i in body if i.opcode == "compare" and "direction=LT" in i.attributes]
    if len(constants) != 1 or not compares:
        return None
    init = re.search(r'"known_init_step":\{"init":"(-?\d+)","step":"(\d+)"\}', loop.attributes)
    start, step = (int(init.group(1)), int(init.group(2))) if init else (0, 1)
    return max(0, math.ceil((constants[0] - start) / step))


def _feeder(module: Module, computation: str, name: str, callers: list[tuple[str, Instruction]]) -> tuple[str, str]:
    """(opcode, op_name) of the op producing `name`, looking through bitcasts, copies, converts, reshapes and
    single-input fusions without metadata, and from a called computation's parameter into its caller's operand.
    The op_name is the first one met."""
    op_name = ""
    stack = list(callers)
    while True:
        instruction = module.computations[computation].get(name)
        if instruction is None:
            return "", op_name
        op_name = op_name or instruction.op_name or _fused_op_name(module, instruction)
        if len(instruction.operands) == 1 and (_moves_data_only(module, instruction) or (
                instruction.opcode == "fusion" and not op_name)):
            name = instruction.operands[0]
            continue
        if instruction.opcode == "parameter" and stack:
            computation, caller = stack.pop()
            index = int(instruction.arguments)
            if caller.opcode != "while" and index < len(caller.operands):
                name = caller.operands[index]
                continue
        return instruction.opcode, op_name


def _fused_op_name(module: Module, instruction: Instruction) -> str:
    """A fusion printed without metadata is named by the last op of the computation it fuses that has one."""
    fused = module.computations.get(instruction.attribute("calls") or "", {}) if instruction.opcode == "fusion" else {}
    return next((i.op_name for i in reversed(fused.values()) if i.op_name), "")


def _moves_data_only(module: Module, instruction: Instruction) -> bool:
    """A bitcast, copy, convert, reshape or transpose, or a fusion of nothing else (XLA's wrapped_copy)."""
    if instruction.opcode in _PASS_THROUGH:
        return True
    fused = module.computations.get(instruction.attribute("calls") or "", {}) if instruction.opcode == "fusion" else {}
    return bool(fused) and all(i.opcode in _PASS_THROUGH | {"parameter"} for i in fused.values())


def _output_names(module: Module) -> set[str]:
    """Entry instructions whose value is (a pass-through of) part of the program's output."""
    entry = module.computations[module.entry]
    roots = [i for i in entry.values() if i.root]
    seen, todo = set(), [r.name for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in entry:
            continue
        seen.add(name)
        instruction = entry[name]
        if instruction.opcode in ("tuple", *_DONE) or _moves_data_only(module, instruction):
            todo.extend(instruction.operands)
    return seen


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimised HLO module, in program order, with how often each runs per call. One over
    groups of a single device (a psum over a model axis of 1, which XLA may leave in) moves nothing: left out."""
    module = parse(hlo)
    outputs = _output_names(module)
    found: list[Collective] = []

    def visit(computation: str, executions: int, loops: list[str], known: bool, callers: list):
        for instruction in module.computations.get(computation, {}).values():
            opcode = instruction.opcode
            kind = opcode.removesuffix("-start")
            if kind in KINDS and group_size(instruction, module.partitions) != 1:
                found.append(_collective(module, computation, instruction, kind, executions, loops, known, callers,
                                         computation == module.entry and instruction.name in outputs))
            if opcode == "while":
                trips = _trip_count(module, instruction)
                label = f"%{instruction.name} ({trips if trips is not None else 'unknown'} trips)"
                visit(instruction.attribute("body"), executions * (trips or 1), [*loops, label],
                      known and trips is not None, [*callers, (computation, instruction)])
                continue
            if opcode in _DONE:
                continue
            called = [instruction.attribute("calls")] if opcode != "call" else [instruction.attribute("to_apply")]
            branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attributes)
            if branches:
                called += re.findall(r"%?([\w.\-]+)", branches.group(1))
            called += [instruction.attribute(k) for k in ("true_computation", "false_computation")]
            for target in filter(None, called):
                visit(target, executions, loops, known, [*callers, (computation, instruction)])

    visit(module.entry, 1, [], True, [])
    return found


def _collective(module, computation, instruction, kind, executions, loops, known, callers, output) -> Collective:
    table = module.computations[computation]
    operands = []
    for name in instruction.operands:
        source = table.get(name)
        operands += arrays(source.shape) if source is not None else []
    if not operands:  # an operand defined elsewhere (or an older text format): the result has the same shapes
        operands = arrays(instruction.shape)
    size = group_size(instruction, module.partitions)
    moved = sum(_bytes(d, s) for d, s in operands)
    if kind == "all-gather":
        moved *= size or 1
    feeder, feeder_op_name = _feeder(module, computation, instruction.operands[0], callers) \
        if instruction.operands else ("", "")
    layer_match = _LAYER.search(instruction.op_name) or _LAYER.search(feeder_op_name)
    result = re.sub(r"\{[\d,]*\}", "", instruction.shape)  # without layouts
    return Collective(kind=kind, instruction=instruction.name, operands=tuple(operands),
                      result=result,
                      bytes=moved, executions=executions, loop=" in ".join(reversed(loops)) or None,
                      trip_count_known=known, group_size=size,
                      layer=int(layer_match.group(1)) if layer_match else None, op_name=instruction.op_name,
                      feeder=feeder, feeder_op_name=feeder_op_name, output=output)


def hlo_text(program: Any) -> str:
    """The optimised HLO of what an adapter's compiled_forward returned: a jax.stages.Compiled, a Lowered (compiled
    here: its own text is pre-partitioning StableHLO) or the HLO text itself."""
    if isinstance(program, str):
        return program
    import jax

    if isinstance(program, jax.stages.Lowered):
        program = program.compile()
    return program.as_text()


# ---- the Megatron expectation ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Expectation:
    """What the forward of `config` on a DxM mesh should communicate for (batch, seq) int32 tokens."""
    n_layers: int
    dim: int
    vocab: int
    data_parallel: int
    model_parallel: int
    batch: int
    seq: int
    dtype: str

    @property
    def tokens(self) -> int:
        """Tokens each device holds: the batch is split along the data axis."""
        return self.batch // self.data_parallel * self.seq

    @property
    def sum_elements(self) -> int:
        return self.tokens * self.dim

    @property
    def sum_dtypes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((_NUMPY_NAMES.get(self.dtype, self.dtype), "f32")))

    @property
    def megatron_bytes_per_token(self) -> float:
        """2 all-reduces of dim elements in the activation dtype per layer (none without a model axis)."""
        if self.model_parallel == 1:
            return 0.0
        return float(2 * self.n_layers * self.dim * _ELEMENT_BYTES[_NUMPY_NAMES.get(self.dtype, self.dtype)])

    def text(self) -> str:
        if self.model_parallel == 1:
            return "no collective at all (no model axis to split over)"
        return (f"Megatron on model axis {self.model_parallel}: 1 all-reduce for the vocab-parallel embedding + 2 per "
                f"layer (after wo and after w2) = {1 + 2 * self.n_layers} sums of {self.batch // self.data_parallel}"
                f"x{self.seq}x{self.dim} = {self.sum_elements} elements ({' or '.join(self.sum_dtypes)}) over "
                f"{self.model_parallel} devices; no all-gather, reduce-scatter, all-to-all or permute")


def caller_gathers(found: Iterable[Collective], expect: Expectation) -> list[Collective]:
    """All-gathers over the model axis that produce the program's output logits (see the module doc)."""
    return [c for c in found if c.kind == "all-gather" and c.output and c.group_size == expect.model_parallel
            and c.executions == 1 and sum(c.elements) * expect.model_parallel == expect.tokens * expect.vocab]


def megatron_problems(found: list[Collective], expect: Expectation) -> list[str]:
    """Every way the collectives contradict the expectation, one line each; empty when they conform."""
    gathers = caller_gathers(found, expect)
    at = lambda c: c.where(expect.n_layers)  # noqa: E731
    problems = [f"{at(c)}: {c.describe()} runs in a loop of unknown trip count; its executions cannot be counted"
                for c in found if not c.trip_count_known]
    if expect.model_parallel == 1:
        return problems + [f"{at(c)}: {c.describe()}; expected no collective on a mesh without a model axis"
                           for c in found]
    for c in found:
        if c.kind != "all-reduce" and c not in gathers:
            problems.append(f"{at(c)}: {c.describe()}; Megatron moves no {c.kind} (weights and activations stay "
                            "split; only the row-parallel and embedding partial sums are all-reduced)")
    sums = [c for c in found if c.kind == "all-reduce"]
    for c in sums:
        wrong = [f"{d}[{','.join(map(str, s))}]" for d, s in c.operands
                 if _elements(s) != expect.sum_elements or d not in expect.sum_dtypes]
        if wrong:
            problems.append(f"{at(c)}: {c.describe()}; each sum should hold {expect.batch // expect.data_parallel}"
                            f"x{expect.seq}x{expect.dim} = {expect.sum_elements} elements in "
                            f"{' or '.join(expect.sum_dtypes)}, found {', '.join(wrong)}")
        if c.group_size != expect.model_parallel:
            problems.append(f"{at(c)}: {c.describe()}; the sums run over the {expect.model_parallel} devices of the "
                            f"model axis, found groups of {c.group_size}")
    return problems + _count_problems(found, sums, expect)


def _count_problems(found: list[Collective], sums: list[Collective], expect: Expectation) -> list[str]:
    """One embedding sum outside the layers and two in every layer. Layers are told apart by the op_names
    (layers_3) or by a loop that runs once per layer (a scan); when the program says neither, only the total."""
    n = expect.n_layers
    by_name = lambda c: c.layer is not None and 0 <= c.layer < n  # noqa: E731
    per_layer_loop = lambda c: c.layer is None and c.loop is not None and c.executions == n  # noqa: E731
    named = [c for c in sums if by_name(c)]
    looped = [c for c in sums if per_layer_loop(c)]
    outside = [c for c in sums if not by_name(c) and not per_layer_loop(c)]
    each_iteration = sum(len(c.operands) for c in looped)
    problems = []
    if any(by_name(c) for c in found):
        for i in range(n):
            mine = [c for c in named if c.layer == i]
            count = sum(c.executions * len(c.operands) for c in mine) + each_iteration
            if count != 2:
                problems.append(f"layer {i}: {count} all-reduce sums ({_list(mine + looped)}); expected 2 (after wo "
                                "and after w2)")
    elif any(per_layer_loop(c) for c in found):
        loops = sorted({c.loop for c in found if per_layer_loop(c)})
        if each_iteration != 2:
            problems.append(f"every layer (one iteration of {', '.join(loops)} each): {each_iteration} all-reduce "
                            f"sums ({_list(looped)}); expected 2 (after wo and after w2)")
    else:
        total = sum(c.executions * len(c.operands) for c in sums)
        if total != 1 + 2 * n:
            problems.append(f"{total} all-reduce sums in all ({_list(sums)}), and no op_name or loop says which "
                            f"layer runs them; expected {1 + 2 * n} (1 for the embedding, 2 per layer of {n})")
        return problems
    count = sum(c.executions * len(c.operands) for c in outside)
    if count != 1:
        problems.append(f"outside the layers: {count} all-reduce sums ({_list(outside)}); expected 1 (the "
                        "vocab-parallel embedding)")
    return problems


def _list(collectives: list[Collective]) -> str:
    return "; ".join(f"%{c.instruction} fed by {c.feeder} '{short_op_name(c.feeder_op_name)}'"
                     for c in collectives) or "none"


def summary(found: list[Collective], expect: Expectation, problems: list[str]) -> dict[str, Any]:
    """The record's `communication` field: kinds, counts, bytes per token, ratio to the Megatron minimum."""
    kinds: dict[str, dict[str, int]] = {}
    for c in found:
        entry = kinds.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += c.executions
        entry["bytes"] += c.bytes * c.executions
    total = sum(e["bytes"] for e in kinds.values())
    minimum = expect.megatron_bytes_per_token
    per_token = total / expect.tokens
    return {"batch": expect.batch, "seq": expect.seq, "tokens_per_device": expect.tokens,
            "model_parallel": expect.model_parallel, "kinds": kinds, "bytes_per_token": per_token,
            "megatron_bytes_per_token": minimum, "ratio_to_megatron": per_token / minimum if minimum else None,
            "caller_gathers": [c.instruction for c in caller_gathers(found, expect)],
            "expected": expect.text(), "problems": problems,
            "collectives": [c.as_json(expect.n_layers) for c in found]}


def table(found: list[Collective], digest: Mapping[str, Any]) -> str:
    """The collectives as printed lines, then the totals: what users of any layout read."""
    lines = [f"  {entry['where']}: {c.describe()}" for c, entry in zip(found, digest["collectives"])]
    lines = lines or ["  no collectives"]
    gathers = digest["caller_gathers"]
    if gathers:
        lines.append(f"  the caller's gather of the logits (allowed, counted in the bytes): "
                     f"{', '.join('%' + g for g in gathers)}")
    ratio = digest["ratio_to_megatron"]
    lines.append(f"  bytes per token: {digest['bytes_per_token']:.1f} (Megatron minimum "
                 f"{digest['megatron_bytes_per_token']:.1f}" + (f", ratio {ratio:.3g})" if ratio is not None else ")"))
    return "\n".join(lines)


def assert_megatron(request: Any, program: Any, *, config: Any, mesh: Any, dtype: Any, batch: int,
                    seq: int) -> dict[str, Any]:
    """Read the program's collectives, record the summary, fail with every contradiction of the Megatron layout."""
    __tracebackhide__ = True
    mesh, dtype = mesh_name(mesh), dtype_name(dtype)
    data, model = (int(p) for p in mesh.split("x"))
    expect = Expectation(config.n_layers, config.dim, config.vocab_size, data, model, batch, seq, dtype)
    found = collectives(hlo_text(program))
    problems = megatron_problems(found, expect)
    digest = summary(found, expect, problems)
    head = (f"communication of the compiled forward on mesh {mesh} ({dtype}, batch {batch} x seq {seq}) "
            f"contradicts the Megatron layout in {len(problems)} places")
    message = "\n  ".join([head, *problems, f"expected: {expect.text()}", "found:", table(found, digest)])
    metrics = {"bytes_per_token": digest["bytes_per_token"],
               "megatron_bytes_per_token": digest["megatron_bytes_per_token"],
               "collectives": float(sum(k["count"] for k in digest["kinds"].values()))}
    if digest["ratio_to_megatron"] is not None:
        metrics["ratio_to_megatron"] = digest["ratio_to_megatron"]
    metrics.update({f"{kind.replace('-', '_')}s": float(k["count"]) for kind, k in digest["kinds"].items()})
    record = {"test": request.node.nodeid, "component": "communication", "name": "compiled_forward", "layer": None,
              "reference": None, "dtype": dtype, "mesh": mesh, "metrics": metrics, "bounds": {},
              "passed": not problems, "failed_metrics": [], "worst_index": [], "worst": None,
              "error": message if problems else None, "communication": json.loads(json.dumps(digest))}
    request.node.user_properties.append((RECORD_KEY, record))
    if problems:
        raise AssertionError(message)
    print(f"communication of the compiled forward on mesh {mesh} ({dtype}, batch {batch} x seq {seq}):\n"
          + table(found, digest))
    return record
