"""docs/contract.md, the adapter contract, generated from the code that defines it so the page cannot drift.

Every fact on the page is read from where the suite keeps it: the protocol (adapters/protocol.py), the configs and
meshes the battery builds adapters with (conformance/support.py, plugin.py, strategies.py, the test modules' mesh
lists), the intermediate names (reference/layers.py), the dtype rule (test_dtype.py), the parameters() keys
(test_sharding.py) and the Meta<->HF helpers (llama_spec.convert). `python -m conformance.contract_page --write`
rewrites the page; `--check` exits 1 when the committed page differs (tests/test_docs.py runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from adapters import protocol
from conformance import (
    doctor,
    plugin,
    real_slice,
    sharding,
    strategies,
    support,
    test_communication,
    test_dtype,
    test_kv_cache,
    test_sharding,
    test_tp_invariance,
)
from llama_spec import convert
from llama_spec.config import LLAMA32_ROPE_SCALING, PRESETS, LlamaConfig
from llama_spec.layout import kv_replication
from llama_spec.tokenizer import meta_tokenizer
from reference import layers

PAGE = Path(__file__).resolve().parents[1] / "docs" / "contract.md"
GENERATOR = "python -m conformance.contract_page --write"
# The battery modules whose tests are parametrized over meshes of their own (the rest take --mesh).
MESH_MODULES = (test_sharding, test_communication, test_tp_invariance, test_kv_cache)
MESH_ARGUMENTS = ("mesh", "mesh_text", "real_mesh")


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _one_line(text: str) -> str:
    """A docstring as one table cell."""
    return re.sub(r"\s+", " ", text).strip()


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _config_row(what: str, config: LlamaConfig, used_by: str) -> tuple[str, ...]:
    scaling = config.rope_scaling
    rope = f"theta {config.rope_theta:g}, " + (f"scaled x{scaling.factor:g}" if scaling else "unscaled")
    return (what, config.dim, config.n_layers, f"{config.n_heads} / {config.n_kv_heads}", config.hidden_dim,
            config.vocab_size, f"{config.norm_eps:g}", rope, "yes" if config.tie_word_embeddings else "no", used_by)


def configs_section() -> str:
    tiny = support.CONFIG
    text = tiny.replace(vocab_size=meta_tokenizer().n_words)
    rows = [
        _config_row("`tiny` preset", tiny, "every check (conformance/support.py `CONFIG`), the doctor"),
        _config_row("`tiny`, Llama 3 vocabulary", text, "generation on real-tokenizer text, stop tokens"),
        _config_row("`tiny`, Llama 3.2 scaling, tied", tiny.replace(rope_scaling=LLAMA32_ROPE_SCALING,
                                                                   tie_word_embeddings=True),
                    "config cross-check, checkpoints"),
        *(_config_row(f"fixed drawn model {i + 1}", config, "properties under the `dev` profile")
          for i, (config, _, _) in enumerate(strategies.FIXED_MODELS)),
        _config_row("real model (SmolLM2-135M)", real_slice.config(),
                    "conformance/test_real_model.py"),
        _config_row("`8b` widths, 2 layers", PRESETS["8b"].replace(n_layers=2), "marker `slow` (test_8b_width)"),
    ]
    drawn = (f"Drawn configs (`conformance/strategies.py`, the hypothesis properties under `ci` and `thorough`): dim "
             f"up to {strategies.MAX_DIM}, head_dim in {strategies.HEAD_DIMS}, up to {strategies.MAX_HEADS} query "
             f"heads, kv heads in {strategies.KV_HEADS}, up to {strategies.MAX_LAYERS} layers, vocab up to "
             f"{strategies.MAX_VOCAB}, Llama 3.1, Llama 3.2 or no RoPE scaling; batch up to {strategies.MAX_BATCH}, "
             f"{strategies.MAX_SEQ} tokens, positions up to {strategies.MAX_POSITION}.")
    return "\n\n".join([
        "## Configs\n\nThe adapter is built with these `llama_spec.config.LlamaConfig`s (heads as query / kv):",
        _table(("config", "dim", "layers", "heads", "SwiGLU", "vocab", "eps", "RoPE", "tied", "used by"), rows),
        drawn])


@dataclasses.dataclass(frozen=True)
class MeshUse:
    meshes: tuple[str, ...]
    where: str


def _parametrized_meshes(module) -> list[MeshUse]:
    """The mesh lists a battery module's tests are parametrized with, read from their pytest marks."""
    found = []
    for name, test in inspect.getmembers(module, inspect.isfunction):
        for mark in getattr(test, "pytestmark", []):
            argnames = mark.args[0] if mark.name == "parametrize" and mark.args else ""
            if mark.name == "parametrize" and argnames in MESH_ARGUMENTS:
                found.append(MeshUse(tuple(mark.args[1]), f"`{module.__name__.split('.')[-1]}::{name}`"))
    return found


def meshes_section() -> str:
    uses = [MeshUse(plugin.DEFAULT_MESHES, "every test that takes `--mesh` (the default; repeatable)"),
            MeshUse(tuple(mesh for mesh, _ in doctor.BUILDS), "`llama-conformance doctor`"),
            *(use for module in MESH_MODULES for use in _parametrized_meshes(module)),
            MeshUse(real_slice.MESHES + real_slice.FULL_MESHES, "the real model (2x3 under marker `real_full`)"),
            MeshUse(strategies.MESHES, "drawn cases (those that fit the devices)")]
    tiny = support.CONFIG
    replicated = sorted({m for use in uses for m in use.meshes if kv_replication(tiny, _model_axis(m)) > 1},
                        key=lambda mesh: (_model_axis(mesh), mesh))
    return "\n\n".join([
        "## Meshes\n\nA mesh `DxM` is a `jax.sharding.Mesh` with axes `('data', 'model')`: D-way data parallel by "
        f"M-way tensor parallel, over {plugin.SIMULATED_CPU_DEVICES} simulated CPU devices by default. The adapter "
        "must place its parameters and run its programs on exactly the mesh it is given.",
        _table(("meshes", "where"), ((" ".join(f"`{m}`" for m in use.meshes), use.where) for use in uses)),
        f"On the `tiny` config ({tiny.n_kv_heads} kv heads) the meshes {', '.join(f'`{m}`' for m in replicated)} "
        "have more model ranks than kv heads: there the kv heads must be replicated, each device holding the one "
        "whole kv head its query heads read ([sharding contract](architecture.md#sharding-contract))."])


def _model_axis(mesh: str) -> int:
    return int(mesh.split("x")[1])


def size_hints_section() -> str:
    return "\n\n".join([
        "## Size hints",
        "`build` receives `max_batch_size` and `max_seq_len` (positions included) only if it accepts them (by name "
        "or `**kwargs`): the largest batch and the longest sequence the suite will ask for, for implementations that "
        "size caches or tables up front.",
        _table(("builds", "max_batch_size", "max_seq_len"), [
            ("the `impl` fixture and the battery", plugin.MAX_BATCH_SIZE, plugin.MAX_SEQ_LEN),
            ("drawn configs (conformance/strategies.py)", strategies.MAX_ROWS, strategies.MAX_POSITION)])])


def _signature(protocol_class) -> list[tuple[str, str]]:
    methods = [(name, member) for name, member in vars(protocol_class).items()
               if callable(member) and not name.startswith("_")]
    return [(f"`{name}{inspect.signature(member)}`", _one_line(_doc(member))) for name, member in methods]


def capabilities_section() -> str:
    class YourAdapter:
        pass

    rows = []
    for capability, protocol_class in protocol.CAPABILITIES.items():
        methods = _signature(protocol_class)
        contract = " ".join(filter(None, [_one_line(_doc(protocol_class)), *(doc for _, doc in methods)]))
        rows.append((f"`{capability}`", f"`{protocol_class.__name__}`", "<br>".join(sig for sig, _ in methods),
                     contract))
    example = protocol.missing(YourAdapter(), "decode")
    return "\n\n".join([
        "## Capabilities\n\nEach capability is one `typing.Protocol` of `adapters/protocol.py`, declared by having "
        "its methods; only `forward` is required.",
        _table(("capability", "Protocol", "methods", "contract"), rows),
        "## Not checked\n\nA check whose capability is missing ends **not checked**: it is skipped with the reason, "
        "listed in the JSON's `not_checked`, in the report and in the end-of-run summary; it is never passed and "
        "never run on another implementation. The reason names the capability and its methods, e.g.:",
        f"```text\n{example}\n```",
        "The same holds for an intermediate the forward does not capture, and for decode cases needing `pad` or "
        "`offset` when `step` does not take them."])


def intermediate_rows() -> list[tuple[str, str, str]]:
    """The name table of reference/layers.py's docstring, checked against `intermediate_names`."""
    rows = [(name, shape.strip(), meaning) for name, shape, meaning in
            re.findall(r"^ {4}'([^']+)'\s+(\([^)]*\))\s*(.*)$", layers.__doc__ or "", re.MULTILINE)]
    expected = ["embedding", *(f"layers.{{i}}.{n}" for n in layers.PER_LAYER_NAMES), "final_norm", "logits"]
    if [name for name, _, _ in rows] != expected:
        raise ValueError(f"reference/layers.py: the docstring's name table {[r[0] for r in rows]} disagrees with "
                         f"intermediate_names {expected}; fix the table there")
    return rows


def intermediates_section() -> str:
    return "\n\n".join([
        "## Intermediate names\n\n`forward(tokens, capture=True)` returns `(logits, intermediates)`: any subset of "
        "these names (B batch, S the tokens of the call, D dim, V vocab, H n_heads, KV n_kv_heads, hd head_dim), "
        "in Meta's layout. Names left out are not checked; an unknown name fails.",
        _table(("name", "shape", "what"), ((f"`{name}`", f"`{shape}`", meaning)
                                           for name, shape, meaning in intermediate_rows()))])


def dtype_section() -> str:
    return ("## The dtype rule\n\nEvery intermediate and every floating parameter comes back in the dtype `build` was "
            "given; conformance/test_dtype.py checks it:\n\n" + _doc(test_dtype))


def parameters_section() -> str:
    keys = _doc(test_sharding).split("Keys are", 1)[1]
    return "\n\n".join([
        "## `parameters()` keys\n\n" + _one_line(_doc(protocol.Parameters.parameters)),
        _one_line("Keys are" + keys),
        "The model axis splits each Meta tensor along (Meta orientation `(out, in)`; `None`: replicated):",
        _table(("Meta name (suffix)", "split axis"), ((f"`{name}`", axis) for name, axis in
                                                       sharding.META_SPLIT_AXIS.items()))])


def convert_section() -> str:
    helpers = [convert.meta_to_hf, convert.hf_to_meta, convert.interleaved_to_halves_last_axis,
               convert.halves_to_interleaved_last_axis]
    names = {**convert.TOP_META_TO_HF, **{f"layers.{{i}}.{k}": f"model.layers.{{i}}.{v}"
                                           for k, v in convert.META_TO_HF.items()}}
    return "\n\n".join([
        "## Converting between Meta and HF\n\n" + _one_line(_doc(convert)),
        _table(("`llama_spec.convert`", "what"), ((f"`{f.__name__}{inspect.signature(f)}`",
                                                   _doc(f) or f"inverse of `{helpers[helpers.index(f) - 1].__name__}`")
                                                  for f in helpers)),
        "Weight names (`META_TO_HF`, `TOP_META_TO_HF`):",
        _table(("Meta", "HF"), ((f"`{meta}`", f"`{hf}`") for meta, hf in names.items()))])


def page() -> str:
    header = (f"# Adapter contract\n\n<!-- generated by `{GENERATOR}` from the code; do not edit by hand -->\n\n"
              "What an adapter receives and must return. How to run the suite on it: [User guide]"
              "(user-guide.md#testing-your-own-implementation-impl).\n\n## The factory\n\n```text\n"
              f"{inspect.cleandoc(protocol.FACTORY_CONTRACT)}\n```")
    sections = [header, configs_section(), meshes_section(), size_hints_section(), capabilities_section(),
                intermediates_section(), dtype_section(), parameters_section(), convert_section()]
    return "\n\n".join(sections) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.contract_page",
                                     description="Write or check docs/contract.md, generated from the code.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"rewrite {PAGE.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when the committed {PAGE.name} is stale")
    args = parser.parse_args(argv)
    text = page()
    if args.write:
        PAGE.write_text(text)
        return 0
    if not PAGE.is_file() or PAGE.read_text() != text:
        print(f"{PAGE}: differs from what the code generates; run {GENERATOR} and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
