"""What each reference's own library reads from a checkpoint's config file, and where the suite disagrees.

The implementation under test is built from the suite's `LlamaConfig` (llama_spec.config); the references read
the same directory through their own libraries, never through the suite's parser:
- HF: `transformers.AutoConfig.from_pretrained(directory)` on config.json (either style; transformers 5 folds the
  hub's `rope_scaling` + top-level `rope_theta` into `rope_parameters`);
- Meta: llama-models' `ModelArgs(**params.json)`, its FeedForward's own SwiGLU width rule, and the RoPE scaling
  its `apply_scaling` applies when `use_scaled_rope` is set.

`cross_check(config, directory)` compares the suite's config with each library's reading, field by field, in
the suite's field names. A disagreement names the field, both values, who read which and the file; it means the
implementation under test and that reference would compute different models from the same checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from llama_spec.config import LLAMA31_ROPE_SCALING, LlamaConfig, RopeScaling
from reference.meta import _apply_scaling, _meta

PARAMS_JSON, CONFIG_JSON = "params.json", "config.json"
SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LibraryRead:
    """The fields one library read from one file, in the suite's names; `rope_scaling` is 'llama3' or None,
    with `rope_scaling.<parameter>` entries when scaled."""
    reader: str
    reference: str  # 'meta' or 'hf': the reference that runs on this reading
    file: Path
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Disagreement:
    field: str
    suite: Any
    library: Any
    reader: str
    file: Path

    def __str__(self) -> str:
        return f"{self.field}: the suite read {self.suite!r}, {self.reader} read {self.library!r} ({self.file})"


@dataclasses.dataclass(frozen=True)
class CrossCheck:
    """One library's reading compared with the suite's config."""
    read: LibraryRead
    compared: tuple[str, ...]
    disagreements: tuple[Disagreement, ...]

    @property
    def agrees(self) -> bool:
        return not self.disagreements

    def message(self) -> str:
        """One line: what was compared, and every disagreement."""
        head = f"config cross-check {self.read.file} ({self.read.reader}): {len(self.compared)} fields"
        if self.agrees:
            return f"{head} agree"
        return f"{head}, {len(self.disagreements)} disagree: " + "; ".join(map(str, self.disagreements))


def _scaling_fields(scaling: RopeScaling | None) -> dict[str, Any]:
    if scaling is None:
        return {"rope_scaling": None}
    return {"rope_scaling": "llama3",
            **{f"rope_scaling.{name}": float(getattr(scaling, name)) for name in SCALING_FIELDS}}


def suite_fields(config: LlamaConfig) -> dict[str, Any]:
    """The suite's config in the compared fields (derived ones, head_dim and hidden_dim, as the model uses them)."""
    return {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_dim": config.hidden_dim,
            "vocab_size": config.vocab_size, "norm_eps": float(config.norm_eps),
            "rope_theta": float(config.rope_theta), **_scaling_fields(config.rope_scaling),
            "tie_word_embeddings": bool(config.tie_word_embeddings), "max_seq_len": config.max_seq_len}


def _version(name: str) -> str:
    return importlib.metadata.version(name)


# ---- transformers -------------------------------------------------------------------------------------------


def read_with_transformers(directory: str | Path) -> LibraryRead:
    """What `transformers.AutoConfig.from_pretrained` reads from DIR/config.json (a local directory: no download)."""
    import transformers

    directory = Path(directory)
    hf = transformers.AutoConfig.from_pretrained(directory)
    rope = dict(hf.rope_parameters or {})
    rope_type = rope.get("rope_type") or "default"
    if rope_type == "llama3":
        scaling = {"rope_scaling": "llama3", **{f"rope_scaling.{name}": float(rope[name]) for name in SCALING_FIELDS}}
    else:
        scaling = {"rope_scaling": None if rope_type == "default" else rope_type}
    fields = {"dim": hf.hidden_size, "n_layers": hf.num_hidden_layers, "n_heads": hf.num_attention_heads,
              "n_kv_heads": hf.num_key_value_heads, "head_dim": hf.head_dim, "hidden_dim": hf.intermediate_size,
              "vocab_size": hf.vocab_size, "norm_eps": float(hf.rms_norm_eps),
              "rope_theta": float(rope["rope_theta"]), **scaling,
              "tie_word_embeddings": bool(hf.tie_word_embeddings), "max_seq_len": hf.max_position_embeddings}
    return LibraryRead(f"transformers {_version('transformers')} AutoConfig", "hf", directory / CONFIG_JSON, fields)


# ---- llama-models -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _swapped(module, **attributes):
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _meta_hidden_dim(args) -> int:
    """The SwiGLU width Meta's own FeedForward derives for these ModelArgs (its TransformerBlock's call), read off
    the Linear it would build, without allocating weights."""
    import torch


    m, widths = _meta(), []

    class _Width(torch.nn.Module):
        def __init__(self, in_features, out_features, **_):
            super().__init__()
            widths.append(out_features)

    with _swapped(m, ColumnParallelLinear=_Width, RowParallelLinear=_Width):
        m.FeedForward(dim=args.dim, hidden_dim=4 * args.dim, multiple_of=args.multiple_of,
                      ffn_dim_multiplier=args.ffn_dim_multiplier)
    return widths[0]  # w1: dim -> hidden


@functools.lru_cache(maxsize=1)
def meta_applied_scaling() -> RopeScaling:
    """The parameters llama-models' Llama 3 `apply_scaling` applies whenever use_scaled_rope is set: it hard-codes
    them, so they are checked here, bit for bit against the formula at Llama 3.1's numbers, rather than assumed."""
    import torch


    shipped = _meta().apply_scaling
    for head_dim in (64, 128):
        freqs = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        if not torch.equal(shipped(freqs), _apply_scaling(freqs, LLAMA31_ROPE_SCALING)):
            raise RuntimeError(f"llama-models {_version('llama-models')}: apply_scaling no longer computes Llama "
                               "3.1's factor 8/1/4/8192; update reference/config_check.py for what it does now")
    return LLAMA31_ROPE_SCALING


def read_with_llama_models(directory: str | Path) -> LibraryRead:
    """What llama-models reads from DIR/params.json: `ModelArgs(**params)` (which keeps only the fields it knows),
    its FeedForward's width, and the scaling its apply_scaling applies."""
    from llama_models.llama3.args import ModelArgs

    directory = Path(directory)
    path = directory / PARAMS_JSON
    params = json.loads(path.read_text())
    args = ModelArgs(**params)
    fields = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "head_dim": args.dim // args.n_heads, "hidden_dim": _meta_hidden_dim(args),
              "vocab_size": args.vocab_size, "norm_eps": float(args.norm_eps), "rope_theta": float(args.rope_theta),
              **_scaling_fields(meta_applied_scaling() if args.use_scaled_rope else None)}
    if "max_seq_len" in params:  # otherwise a runtime argument of Meta's generator, not read from the file
        fields["max_seq_len"] = args.max_seq_len
    return LibraryRead(f"llama-models {_version('llama-models')} ModelArgs", "meta", path, fields)


# ---- the comparison -----------------------------------------------------------------------------------------


def compare(config: LlamaConfig, read: LibraryRead) -> CrossCheck:
    """Every field the library read, against the suite's; scaling parameters only when both sides scale."""
    ours = suite_fields(config)
    compared, disagreements = [], []
    for name, value in read.fields.items():
        if name not in ours:
            continue
        compared.append(name)
        if ours[name] != value:
            disagreements.append(Disagreement(name, ours[name], value, read.reader, read.file))
    return CrossCheck(read, tuple(compared), tuple(disagreements))


def library_reads(directory: str | Path) -> list[LibraryRead]:
    """Each reference library's reading of the config files DIR holds (params.json: llama-models; config.json:
    transformers)."""
    directory = Path(directory)
    reads = []
    if (directory / PARAMS_JSON).is_file():
        reads.append(read_with_llama_models(directory))
    if (directory / CONFIG_JSON).is_file():
        reads.append(read_with_transformers(directory))
    if not reads:
        raise FileNotFoundError(f"{directory}: neither {PARAMS_JSON} nor {CONFIG_JSON}; nothing to cross-check")
    return reads


def cross_check(config: LlamaConfig, directory: str | Path) -> list[CrossCheck]:
    """The suite's `config` (what the implementation under test is built from) against every reference library's
    own reading of DIR."""
    return [compare(config, read) for read in library_reads(directory)]
