"""Load Llama 3 checkpoints, Meta's original format or Hugging Face safetensors, lazily and safely.

Lazy because the real 8B model does not fit beside two references on one 24 GiB host: `load_checkpoint` reads and
validates only metadata, and each tensor is read when asked for, memory-mapped, in Meta's layout. Safe: `.pth`
files are opened with `torch.load(weights_only=True, mmap=True)`, so a pickle that asks to run code is refused.
Every problem with the files is one `CheckpointError` line naming the file and the field. The formats and the
CLI (`python -m llama_spec.checkpoint DIR`): docs/internals.md#the-checkpoint-loader.
"""
from __future__ import annotations

import abc
import argparse
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from llama_spec.config import LlamaConfig
from llama_spec.convert import META_TO_HF, TOP_META_TO_HF, hf_to_meta
from llama_spec.layout import check_splittable, meta_weight_shapes, parse_mesh
from llama_spec.tokenizer import load_meta_tokenizer

META, HF = "meta", "hf"
PARAMS_JSON = "params.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

# Axis of the (out, in) weight that fairscale splits across model-parallel ranks (llama_models/llama3/model.py):
# ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits out features; RowParallelLinear (wo, w2) splits in
# features; VocabParallelEmbedding (tok_embeddings) splits vocab rows, dim 0 (ParallelEmbedding, Llama 1/2's,
# split the embedding dim instead); norms are replicated (None).
SPLIT_AXIS: dict[str, int | None] = {
    "tok_embeddings": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}
# The config fields a tensor's shape follows from, for error messages (Meta names, HF names).
_SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "tok_embeddings": ("vocab_size", "dim"), "output": ("vocab_size", "dim"),
    "wq": ("n_heads", "dim"), "wo": ("n_heads", "dim"), "wk": ("n_kv_heads", "n_heads", "dim"),
    "wv": ("n_kv_heads", "n_heads", "dim"),
    "w1": ("dim", "multiple_of", "ffn_dim_multiplier"), "w2": ("dim", "multiple_of", "ffn_dim_multiplier"),
    "w3": ("dim", "multiple_of", "ffn_dim_multiplier"),
    "attention_norm": ("dim",), "ffn_norm": ("dim",), "norm": ("dim",),
}
_HF_FIELD = {"dim": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
             "vocab_size": "vocab_size", "multiple_of": "intermediate_size", "ffn_dim_multiplier": "intermediate_size"}
# The head count a fairscale shard of these weights must hold whole heads of.
_HEAD_FIELD = {"wq": "n_heads", "wo": "n_heads", "wk": "n_kv_heads", "wv": "n_kv_heads"}


_FLOAT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Exponent bits of each float dtype: all set means NaN or Inf (checked on the raw bits, fast for bfloat16 too).
_EXPONENT = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
             np.dtype(np.float16): (np.uint16, 0x7C00)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the field."""


def module_of(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'norm.weight' -> 'norm'."""
    return name.split(".")[-2]


def split_axis(name: str) -> int | None:
    return SPLIT_AXIS[module_of(name)]


def _fields(config: LlamaConfig, name: str, fmt: str) -> str:
    """'n_heads=32, dim=4096' (Meta names) or 'num_attention_heads=32, hidden_size=4096' (HF) for a tensor."""
    parts = []
    for field in _SHAPE_FIELDS[module_of(name)]:
        if fmt == HF:
            key, value = _HF_FIELD[field], (config.hidden_dim if _HF_FIELD[field] == "intermediate_size"
                                            else getattr(config, field))
        else:
            key, value = field, getattr(config, field)
        part = f"{key}={value}"
        if part not in parts:
            parts.append(part)
    return ", ".join(parts)


# ---- torch <-> numpy, reading files -----------------------------------------------------------------


def torch_to_numpy(t) -> np.ndarray:
    """A CPU tensor -> a NumPy array sharing its memory (bfloat16 as ml_dtypes.bfloat16); keeps `t` alive."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray, dtype: str):
    """A NumPy array (bfloat16 included) -> a contiguous torch tensor at `dtype`, sharing memory when it can."""
    import torch

    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == ml_dtypes.bfloat16 else \
        torch.from_numpy(a)
    return t.to(getattr(torch, dtype))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def open_pth(path: Path) -> Mapping:
    """`torch.load(path, weights_only=True, mmap=True)`, every failure turned into a one-line CheckpointError."""
    import pickle

    import torch

    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a complete PyTorch checkpoint ({size} bytes, no zip directory at the "
                              "end): the file is truncated or not a torch.save file; re-download or re-write it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"calls {found.group(1)}" if found else "is not plain tensors"
        raise CheckpointError(f"{path}: refused to load: its pickle {what}, which could run code; a checkpoint "
                              "must hold only tensors (torch.load weights_only=True)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({first}); re-download or re-write it") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor, found {type(state).__name__}")
    return state


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a .safetensors file, read without touching its data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
            return out
    except SafetensorError as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}): truncated or corrupt; "
                              "re-download or re-write it") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None


def _read_safetensors(path: Path, key: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return torch_to_numpy(f.get_tensor(key))  # memory-mapped: the pages stay on disk until touched
    except SafetensorError as err:
        raise CheckpointError(f"{path}: cannot read tensor {key} ({err})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_finite(array: np.ndarray, name: str, path: Path) -> None:
    """Raise a CheckpointError naming the file and tensor when `array` holds NaN or Inf."""
    bits, mask = _EXPONENT[array.dtype]
    bad = (array.view(bits) & mask) == mask
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
        raise CheckpointError(f"{path}: tensor {name} has {int(bad.sum())} NaN/Inf value(s) (first at {first}); "
                              "the checkpoint is corrupt: re-download or regenerate it")


def check_mesh(config: LlamaConfig, model_parallel: int, source: str | Path) -> None:
    """Raise a CheckpointError naming the config file when a model axis of `model_parallel` cannot split the
    checkpoint's heads, kv heads, SwiGLU width or vocab."""
    try:
        check_splittable(config, model_parallel, where=str(source))
    except ValueError as err:
        raise CheckpointError(str(err)) from None


# ---- the lazy weights ---------------------------------------------------------------------------------


class LazyWeights(Mapping, abc.ABC):
    """Meta-layout tensors of a checkpoint, read from disk when indexed (validated at open, NaN/Inf-checked on
    every read). Keys and shapes follow `llama_spec.synthetic.meta_weight_shapes(config)`."""

    format: str

    def __init__(self, directory: Path, config: LlamaConfig, config_path: Path):
        self.directory = directory
        self.config = config
        self.config_path = config_path
        self.shapes = meta_weight_shapes(config)
        self.dtypes: dict[str, str] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(f"{name}: not a tensor of this checkpoint ({self.directory})")
        return self._read(name)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """The tensor in Meta's layout, checked finite."""

    @abc.abstractmethod
    def files(self) -> list[Path]:
        """Every weight file of the checkpoint."""

    def file_name(self, name: str) -> str:
        """How the checkpoint's own files spell a Meta tensor name."""
        return name

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(_FLOAT_DTYPES[self.dtypes[n]]).itemsize for n, s in self.shapes.items())

    def check_mesh(self, model_parallel: int) -> None:
        check_mesh(self.config, model_parallel, self.config_path)

    def _check_dtype(self, name: str, dtype: str, path: Path) -> None:
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; expected one of {sorted(_FLOAT_DTYPES)}")

    def _check_names(self, found: Mapping[str, Path], where: str) -> None:
        """Every expected tensor present, nothing else; messages name the config field that decides."""
        missing = [n for n in self.shapes if n not in found]
        extra = [n for n in found if n not in self.shapes]
        layers = (f"{self.config_path.name} says {'n_layers' if self.format == META else 'num_hidden_layers'}="
                  f"{self.config.n_layers}")
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            why = f" ({layers})" if missing[0].startswith("layers.") else ""
            raise CheckpointError(f"{where}: tensor {self.file_name(missing[0])}{more} missing{why}; the config "
                                  "does not belong to these weights or the files are incomplete")
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise CheckpointError(f"{found[extra[0]]}: unexpected tensor {self.file_name(extra[0])}{more} "
                                  f"({layers}); not a Llama 3.1 checkpoint of this config")


class MetaWeights(LazyWeights):
    """consolidated.NN.pth shards, merged along fairscale's split axes on each read."""

    format = META

    def __init__(self, directory: Path, config: LlamaConfig, config_path: Path, shards: list[Path]):
        super().__init__(directory, config, config_path)
        self.shards = shards
        n = len(shards)
        located: dict[str, Path] = {}
        for index, path in enumerate(shards):
            state = open_pth(path)
            if index == 0:
                located = {name: path for name in state}
                self._check_names(located, str(path))
            else:
                names = set(state)
                if names != set(located):
                    odd = sorted(names ^ set(located))[0]
                    raise CheckpointError(f"{path}: tensor {odd} is in some shards and not others; every "
                                          "consolidated.NN.pth must hold the same tensor names")
            for name, tensor in state.items():
                dtype = _dtype_name(tensor.dtype)
                self._check_dtype(name, dtype, path)
                if self.dtypes.setdefault(name, dtype) != dtype:
                    raise CheckpointError(f"{path}: tensor {name} is {dtype} but {self.dtypes[name]} in "
                                          f"{shards[0].name}; shards must agree on dtypes")
                self._check_shard_shape(name, tuple(tensor.shape), n, path)
            del state

    def _check_shard_shape(self, name: str, shape: tuple[int, ...], n: int, path: Path) -> None:
        full = self.shapes[name]
        axis = split_axis(name)
        params = f"{self.config_path.name} ({_fields(self.config, name, META)})"
        if axis is not None and n > 1:
            module = module_of(name)
            if full[axis] % n:
                raise CheckpointError(f"{path}: {n} shards cannot split {name} evenly: its {full[axis]} "
                                      f"{'rows' if axis == 0 else 'columns'} from {params} are not divisible by {n}")
            if module in _HEAD_FIELD and getattr(self.config, _HEAD_FIELD[module]) % n:
                field = _HEAD_FIELD[module]
                raise CheckpointError(f"{path}: {n} shards cannot split {field}={getattr(self.config, field)} "
                                      f"({self.config_path.name}) into whole heads for {name}")
            expected = tuple(size // n if i == axis else size for i, size in enumerate(full))
        else:
            expected = full
        if shape != expected:
            hint = ""
            if module_of(name) == "tok_embeddings" and n > 1 and shape == (full[0], full[1] // n):
                hint = ("; it is split along the embedding dim (fairscale ParallelEmbedding, Llama 1/2) but Llama 3 "
                        "splits vocab rows (VocabParallelEmbedding)")
            shard = f" (1/{n} of {full} along axis {axis})" if expected != full else ""
            raise CheckpointError(f"{path}: tensor {name} has shape {shape} but {params} implies {expected}{shard}; "
                                  f"the params.json does not belong to these weights{hint}")

    def files(self) -> list[Path]:
        return list(self.shards)

    def _read(self, name: str) -> np.ndarray:
        merged = self._merged(name)
        if name == "output.weight" and self.config.tie_word_embeddings:
            embedding = self._merged("tok_embeddings.weight")
            if not np.array_equal(merged.view(np.uint8), embedding.view(np.uint8)):
                raise CheckpointError(f"{self.shards[0]}: tensor output.weight differs from tok_embeddings.weight, but "
                                      f"{self.config_path.name} is Llama 3.2's shape, which ties them; not a Llama 3.2 "
                                      "checkpoint, or a corrupt one")
        return merged

    def _merged(self, name: str) -> np.ndarray:
        parts = []
        for path in self.shards:
            state = open_pth(path)
            part = torch_to_numpy(state[name])  # only this tensor's mapping survives `state`
            del state
            check_finite(part, name, path)
            parts.append(part)
        axis = split_axis(name)
        if axis is None:
            for path, part in zip(self.shards[1:], parts[1:]):
                if not np.array_equal(part.view(np.uint8), parts[0].view(np.uint8)):
                    raise CheckpointError(f"{path}: replicated tensor {name} differs from {self.shards[0].name}; "
                                          "every shard must hold the same copy")
            return parts[0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _hf_name(meta_name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_name)
    if m and m.group(2) in META_TO_HF:
        return f"model.layers.{m.group(1)}.{META_TO_HF[m.group(2)]}"
    return TOP_META_TO_HF.get(meta_name, meta_name)  # a name of no known tensor: as the file spells it


def _meta_name(hf_name: str) -> str:
    top = {v: k for k, v in TOP_META_TO_HF.items()}
    per_layer = {v: k for k, v in META_TO_HF.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if hf_name in top:
        return top[hf_name]
    return f"layers.{m.group(1)}.{per_layer[m.group(2)]}" if m and m.group(2) in per_layer else hf_name


class HFWeights(LazyWeights):
    """HF safetensors, read per tensor and converted to Meta's layout (q/k rows un-permuted)."""

    format = HF

    def __init__(self, directory: Path, config: LlamaConfig, config_path: Path, weight_map: dict[str, Path],
                 index_path: Path | None):
        super().__init__(directory, config, config_path)
        self.weight_map = weight_map
        # Meta name -> the file's name; a name of no known tensor maps to itself and is reported as unexpected
        located = {_meta_name(hf_name): path for hf_name, path in weight_map.items()}
        where = str(index_path or next(iter(weight_map.values()), directory))
        if config.tie_word_embeddings:  # the output projection is the embedding: the files hold it once
            if "output.weight" in located:
                raise CheckpointError(f"{located['output.weight']}: tensor lm_head.weight present, but "
                                      f"{config_path.name} says tie_word_embeddings=true (transformers would ignore "
                                      "it and use the embedding); remove one or the other")
            if "tok_embeddings.weight" in located:
                located["output.weight"] = located["tok_embeddings.weight"]
        self._check_names(located, where)
        headers: dict[Path, dict] = {}
        for meta_name in self.shapes:
            hf_name = self.file_name(meta_name)
            path = weight_map[hf_name]
            if path not in headers:
                headers[path] = _safetensors_header(path)
            if hf_name not in headers[path]:
                raise CheckpointError(f"{path}: tensor {hf_name} missing, but {where} lists it in this file")
            shape, dtype = headers[path][hf_name]
            self._check_dtype(hf_name, dtype, path)
            self.dtypes[meta_name] = dtype
            if shape != self.shapes[meta_name]:
                raise CheckpointError(f"{path}: tensor {hf_name} has shape {shape} but {config_path.name} "
                                      f"({_fields(config, meta_name, HF)}) implies {self.shapes[meta_name]}; the "
                                      "config.json does not belong to these weights")

    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def file_name(self, name: str) -> str:
        if name == "output.weight" and self.config.tie_word_embeddings:
            name = "tok_embeddings.weight"
        return _hf_name(name)

    def _read(self, name: str) -> np.ndarray:
        hf_name = self.file_name(name)
        path = self.weight_map[hf_name]
        array = _read_safetensors(path, hf_name)
        check_finite(array, hf_name, path)
        (converted,) = hf_to_meta({hf_name: array}, self.config).values()
        return converted


# ---- opening a directory ------------------------------------------------------------------------------


def detect_format(directory: str | Path) -> str:
    """'meta' or 'hf' from the files present; a CheckpointError says what is missing."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the checkpoint's directory")
    shards = [p for p in directory.iterdir() if _SHARD.fullmatch(p.name)]
    tensors = list(directory.glob("*.safetensors"))
    has_params, has_config = (directory / PARAMS_JSON).is_file(), (directory / HF_CONFIG).is_file()
    if shards and not tensors:
        if not has_params:
            raise CheckpointError(f"{directory / PARAMS_JSON}: missing; a Meta checkpoint ({shards[0].name} found) "
                                  "needs params.json beside its consolidated.NN.pth")
        return META
    if tensors and not shards:
        if not has_config:
            raise CheckpointError(f"{directory / HF_CONFIG}: missing; an HF checkpoint ({tensors[0].name} found) "
                                  "needs config.json beside its *.safetensors")
        return HF
    if shards and tensors:
        raise CheckpointError(f"{directory}: holds both consolidated.NN.pth and *.safetensors; point at one format")
    if has_params:
        raise CheckpointError(f"{directory / 'consolidated.00.pth'}: missing; a Meta checkpoint needs params.json "
                              "and consolidated.NN.pth")
    if has_config:
        raise CheckpointError(f"{directory / HF_SINGLE}: missing; an HF checkpoint needs config.json and "
                              f"{HF_SINGLE} or {HF_INDEX} with its files")
    raise CheckpointError(f"{directory}: not a checkpoint: expected params.json + consolidated.NN.pth (Meta) or "
                          "config.json + *.safetensors (HF)")


def _meta_shards(directory: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _SHARD.fullmatch(p.name))}
    for index in range(max(found) + 1):
        if index not in found:
            raise CheckpointError(f"{directory / f'consolidated.{index:02d}.pth'}: missing; found {len(found)} "
                                  f"shards up to consolidated.{max(found):02d}.pth, which need every index below")
    return [found[i] for i in range(len(found))]


def read_config(path: str | Path) -> LlamaConfig:
    """The config of a params.json (Meta) or config.json (HF, either style) file, as the loader reads it; every
    problem is a one-line CheckpointError naming the file and the field."""
    path = Path(path)
    try:
        if path.name == PARAMS_JSON:
            return LlamaConfig.from_params_json(path)
        return LlamaConfig.from_hf(_read_json(path), source=str(path))
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from None


def _hf_weight_map(directory: Path) -> tuple[dict[str, Path], Path | None]:
    index = directory / HF_INDEX
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map' (tensor name -> file)")
        out = {}
        for name, file in weight_map.items():
            path = directory / str(file)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; {index.name} weight_map lists it for {name}")
            out[name] = path
        return out, index
    files = sorted(directory.glob("*.safetensors"))
    if len(files) > 1:
        raise CheckpointError(f"{index}: missing; {len(files)} *.safetensors files need an index saying which "
                              "holds each tensor")
    return {name: files[0] for name in _safetensors_header(files[0])}, None


def load_checkpoint(directory: str | Path) -> tuple[LlamaConfig, LazyWeights]:
    """(config from the checkpoint's own file, lazily read Meta-layout weights); metadata validated now."""
    directory = Path(directory)
    fmt = detect_format(directory)
    if fmt == META:
        config_path = directory / PARAMS_JSON
        config = read_config(config_path)
        return config, MetaWeights(directory, config, config_path, _meta_shards(directory))
    config_path = directory / HF_CONFIG
    config = read_config(config_path)
    weight_map, index = _hf_weight_map(directory)
    return config, HFWeights(directory, config, config_path, weight_map, index)


def tokenizer_path(directory: str | Path) -> Path | None:
    """DIR/tokenizer.model, else DIR/original/tokenizer.model (where Meta's HF repos keep it), else None."""
    for path in (Path(directory) / TOKENIZER, Path(directory) / "original" / TOKENIZER):
        if path.is_file():
            return path
    return None


def load_tokenizer(directory: str | Path, config: LlamaConfig):
    """Meta's tiktoken `Tokenizer` for the checkpoint, its id count checked against vocab_size; None when the
    checkpoint ships none (HF format). A Meta checkpoint without tokenizer.model is an error."""
    path = tokenizer_path(directory)
    if path is None:
        if detect_format(directory) == META:
            raise CheckpointError(f"{Path(directory) / TOKENIZER}: missing; a Meta checkpoint ships its tokenizer")
        return None
    try:
        return load_meta_tokenizer(path, vocab_size=config.vocab_size)
    except ValueError as err:
        raise CheckpointError(str(err).splitlines()[0]) from None


def load_for_generation(directory: str | Path):
    """(config, lazy Meta-layout weights, tokenizer or None) for `tp_llama.generate`: place the weights with
    `TPLlama.place(tp_llama.convert.meta_to_jax(weights))`; with no tokenizer in the checkpoint (HF format),
    fall back to `llama_spec.tokenizer.meta_tokenizer()` if the vocab is Llama 3's."""
    config, weights = load_checkpoint(directory)
    return config, weights, load_tokenizer(directory, config)


# ---- CLI ----------------------------------------------------------------------------------------------


def _scaling_text(config: LlamaConfig) -> str:
    scaling = config.rope_scaling
    if scaling is None:
        return "none"
    return (f"llama3(factor={scaling.factor}, low_freq_factor={scaling.low_freq_factor}, high_freq_factor="
            f"{scaling.high_freq_factor}, original_max_position_embeddings={scaling.original_max_position_embeddings})")


def summary(directory: Path, config: LlamaConfig, weights: LazyWeights) -> list[str]:
    files = weights.files()
    dtypes = sorted(set(weights.dtypes.values()))
    params = sum(int(np.prod(s)) for s in weights.shapes.values())
    kind = "Meta" if weights.format == META else "HF"
    return [
        f"{directory}: {kind} checkpoint, config {weights.config_path.name}, {len(files)} weight file(s): "
        + ", ".join(p.name for p in files[:4]) + (" ..." if len(files) > 4 else ""),
        f"config: dim={config.dim} n_layers={config.n_layers} n_heads={config.n_heads} "
        f"n_kv_heads={config.n_kv_heads} head_dim={config.head_dim} hidden_dim={config.hidden_dim} "
        f"vocab_size={config.vocab_size} norm_eps={config.norm_eps} rope_theta={config.rope_theta} "
        f"rope_scaling={_scaling_text(config)} tie_word_embeddings={config.tie_word_embeddings}",
        f"tensors: {len(weights)}, {params / 1e6:.1f} M parameters, {weights.nbytes / 2 ** 20:.1f} MiB, "
        f"dtype {'/'.join(dtypes)}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_spec.checkpoint",
                                     description="Validate a Llama 3.1 checkpoint (Meta or HF format), summarise it.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--mesh", action="append", default=[], metavar="DxM",
                        help="also check that this mesh's model axis can split the checkpoint (repeatable)")
    parser.add_argument("--no-scan", action="store_true", help="skip reading every tensor for NaN/Inf")
    args = parser.parse_args(argv)
    try:
        config, weights = load_checkpoint(args.directory)
        lines = summary(args.directory, config, weights)
        tokenizer = load_tokenizer(args.directory, config)
        lines.append(f"tokenizer: {tokenizer_path(args.directory)} ({tokenizer.n_words} ids)" if tokenizer
                     else "tokenizer: none in the checkpoint")
        for mesh in args.mesh:
            weights.check_mesh(parse_mesh(mesh)[1])
            lines.append(f"mesh {mesh}: the model axis splits heads, kv heads, SwiGLU width and vocab")
        if not args.no_scan:
            start = time.perf_counter()
            for name in weights:
                weights[name]
            lines.append(f"scan: all {len(weights)} tensors finite ({time.perf_counter() - start:.1f} s)")
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
