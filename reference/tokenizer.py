"""The HF side of Llama 3's tokenizer: transformers' own `TikTokenConverter` on Meta's file, with Meta's encode.

The conversion is transformers' (nothing retyped from Meta); this module adds only what the converter leaves to
its caller (the special tokens by Meta's names in id order, the BOS/EOS/pad wrapper, tiktoken's file cache off)
and `hf_encode`/`hf_decode` with the signature and semantics of Meta's `Tokenizer.encode`/`decode`. The converted
tokenizer is cached on disk (`reference.tokenizer_cache`). docs/tokenizer.md tells the whole story.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Literal, Sequence, Union

from llama_models.llama3 import tokenizer as meta

from llama_spec.files import cache_root
from llama_spec.tokenizer import PACKAGED_TOKENIZER_PATH, meta_tokenizer
from reference.tokenizer_cache import load_or_build, source_of


def meta_encode_chunks(text: str) -> list[str]:
    """The substrings Meta's `Tokenizer.encode` hands to tiktoken one by one, cut by Meta's own code and limits."""
    step = meta.TIKTOKEN_MAX_ENCODE_CHARS
    return [piece
            for start in range(0, len(text), step)
            for piece in meta.Tokenizer._split_whitespaces_or_nonwhitespaces(text[start:start + step],
                                                                              meta.MAX_NO_WHITESPACES_CHARS)]


@contextlib.contextmanager
def _tiktoken_file_cache_off():
    """Make tiktoken read the file itself, not the copy its path-keyed cache may hold (docs/tokenizer.md)."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def convert_hf_backend(path: Union[str, os.PathLike], special_tokens: dict[str, int]):
    """transformers' `TikTokenConverter` on the tiktoken file `path`: a `tokenizers.Tokenizer`.

    `special_tokens` (Meta's `Tokenizer.special_tokens`, `{name: id}`) are handed to the converter by name in id
    order; the converter decides the ids (appended after the ranks), and the tests compare them with Meta's.
    The split regex is the converter's default.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter  # heavy: only when converting

    names = [name for name, _ in sorted(special_tokens.items(), key=lambda item: item[1])]
    with _tiktoken_file_cache_off():
        return TikTokenConverter(vocab_file=str(path), extra_special_tokens=names).converted()


def _wrap(backend, meta):
    from transformers import PreTrainedTokenizerFast  # heavy: only when converting

    names = {token_id: name for name, token_id in meta.special_tokens.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names[meta.bos_id],
        eos_token=names[meta.eos_id],
        pad_token=names[meta.pad_id],
        add_bos_token=True,   # HF's own BOS template; the converter leaves the post-processor without one
        add_eos_token=False,  # Meta's published HF tokenizer writes no EOS either
        clean_up_tokenization_spaces=False,
        model_max_length=131072,  # Llama 3.1 context length
    )


def _cache_key(path: Path) -> str:
    import tokenizers  # heavy: only when a key is computed
    import transformers

    converter = importlib.import_module("transformers.convert_slow_tokenizer")  # the module, not the function

    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    # an edit to the conversion (ours, or transformers' converter, edited or patched at run time) or a planted bug
    # gets a new key, so it never reads a cache written by other code
    for step in (_tiktoken_file_cache_off, convert_hf_backend, _wrap, converter.TikTokenConverter,
                 converter.bytes_to_unicode):
        digest.update(source_of(step).encode())
    digest.update(f"tokenizers {tokenizers.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:24]


def _load_or_convert(path: Path, cache_root: Path | None, rebuild: bool):
    """The cached conversion of `path` (under `cache_root`, None for no disk cache), else a fresh one."""
    meta_side = meta_tokenizer(path)
    target = None if cache_root is None else cache_root / "tokenizer" / _cache_key(path)
    return load_or_build(target, lambda: _wrap(convert_hf_backend(path, meta_side.special_tokens), meta_side),
                         rebuild)


_hf_tokenizer_for = functools.lru_cache(maxsize=None)(_load_or_convert)


def hf_tokenizer(path: Union[str, os.PathLike, None] = None, *, cache_dir: Union[str, os.PathLike, None, bool] = None,
                 rebuild: bool = False):
    """An HF `PreTrainedTokenizerFast` converted offline from the tiktoken file `path` (default: the packaged one).

    `cache_dir=None` uses `cache_root()`, `False` disables the disk cache; `rebuild=True` converts
    again and overwrites the cache entry. The same object is returned for the same arguments within a process.
    """
    path = Path(path) if path is not None else PACKAGED_TOKENIZER_PATH
    root = None if cache_dir is False else Path(cache_dir) if cache_dir is not None else cache_root()
    return _hf_tokenizer_for(path.resolve(), root, rebuild)


def _special_names(tokenizer) -> list[str]:
    return [token.content for token in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
            if token.special]


def _encode_segment(tokenizer, text: str, allowed: AbstractSet[str]) -> list[int]:
    if not text:
        return []
    if not allowed:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if set(allowed) >= set(_special_names(tokenizer)):
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=False)
    # a proper subset: cut at the allowed specials ourselves, encode the rest with every special as plain text
    ids: list[int] = []
    cutter = re.compile("|".join(re.escape(name) for name in sorted(allowed, key=len, reverse=True)))
    start = 0
    for match in cutter.finditer(text):
        ids += tokenizer.encode(text[start:match.start()], add_special_tokens=False, split_special_tokens=True)
        ids.append(tokenizer.convert_tokens_to_ids(match.group()))
        start = match.end()
    ids += tokenizer.encode(text[start:], add_special_tokens=False, split_special_tokens=True)
    return ids


def hf_encode(
    text: str,
    *,
    bos: bool,
    eos: bool,
    allowed_special: Union[Literal["all"], AbstractSet[str], None] = None,
    disallowed_special: Union[Literal["all"], Collection[str]] = (),
    chunk_like_meta: bool = False,
    tokenizer=None,
) -> list[int]:
    """HF ids for `text` with the signature and semantics of Meta's `Tokenizer.encode`.

    BOS comes from the HF post-processor template (`add_special_tokens=True`); EOS is appended here.
    Special-token text is plain text unless `allowed_special` allows it ("all" or a set of names), and any
    `disallowed_special` found in the text raises `ValueError`, as in tiktoken. `chunk_like_meta=True` encodes
    the pieces `meta_encode_chunks` returns one by one, reproducing Meta's ids on inputs whose pre-tokens its
    400k-character / 25k-run cuts split (docs/tokenizer.md, "Meta's chunking").
    """
    if type(text) is not str:
        raise TypeError(f"text must be str, got {type(text).__name__}")
    tok = tokenizer if tokenizer is not None else hf_tokenizer()
    specials = _special_names(tok)
    allowed = set(specials) if allowed_special == "all" else set(allowed_special or ())
    unknown = allowed - set(specials)
    if unknown:
        raise ValueError(f"allowed_special names tokens that are not special tokens: {sorted(unknown)[:5]}")
    disallowed = set(specials) - allowed if disallowed_special == "all" else set(disallowed_special)
    for name in disallowed:
        if name in text:
            raise ValueError(f"Encountered text corresponding to disallowed special token {name!r}.\n"
                             "Pass it to allowed_special, or disallowed_special=() to encode it as plain text.")
    pieces = meta_encode_chunks(text) if chunk_like_meta else [text]
    ids = [i for piece in pieces for i in _encode_segment(tok, piece, allowed)]
    if bos:
        ids = tok.encode("", add_special_tokens=True) + ids  # the template's BOS, the single source of it
    if eos:
        ids.append(tok.eos_token_id)
    return ids


def hf_decode(ids: Sequence[int], *, tokenizer=None) -> str:
    """HF text for `ids`, as Meta's `Tokenizer.decode` gives it: specials kept, spaces untouched."""
    tok = tokenizer if tokenizer is not None else hf_tokenizer()
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
