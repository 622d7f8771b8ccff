"""Llama 3 tokenizers: Meta's official tiktoken tokenizer, and an HF fast tokenizer converted offline from it.

Both sides read the same file, the `tokenizer.model` that the `llama-models` package ships
(`llama_models/llama3/tokenizer.model`): tiktoken BPE, one `<base64 token bytes> <rank>` per line, 128000 ranks.
Meta's `Tokenizer` puts 256 special tokens after them (ids 128000..128255).

Public API
----------
- `meta_tokenizer()`               Meta's `llama_models.llama3.tokenizer.Tokenizer` on the packaged file (cached).
- `load_meta_tokenizer(path)`      the same for an explicit file; raises `TokenizerFileError` (a `ValueError`)
                                   naming the file when it is not tiktoken BPE (a SentencePiece `tokenizer.model`
                                   from Llama 1/2, an HF `tokenizer.json`, a truncated download, ...).
                                   `load_tokenizer` is an alias.
- `read_tiktoken_ranks(path)`      the strict parser/validator behind it: `{token bytes: rank}`.
- `hf_tokenizer(path=None)`        a transformers `PreTrainedTokenizerFast` converted from that file (cached in
                                   memory and on disk, see "Cache" below).
- `convert_hf_backend(path, special_tokens)`
                                   the conversion itself (transformers' `TikTokenConverter`), no caching.
- `hf_encode(text, *, bos, eos, allowed_special=None, disallowed_special=())`
                                   HF ids with the signature and semantics of Meta's `Tokenizer.encode`.
- `hf_decode(ids)`                 HF text, with Meta's `Tokenizer.decode` semantics (special tokens kept verbatim,
                                   no "clean up" of spaces, invalid UTF-8 replaced by U+FFFD).
- `meta_encode_chunks(text)`       the pieces Meta's `encode` cuts a text into before tiktoken sees it.

How the HF tokenizer is built
-----------------------------
By transformers itself: `transformers.convert_slow_tokenizer.TikTokenConverter` (the class transformers 5 uses for
every tiktoken file, e.g. `TokenizersBackend._convert_from_tiktoken`; 4.x's `Llama3Converter` subclassed it). It
reads the file with tiktoken's own loader and builds a byte-level BPE: vocab = every token's bytes through GPT-2's
byte-to-unicode table -> its rank; merges = every `left + right` split of every token whose halves are tokens,
ordered by the merged token's rank; `ignore_merges=True`; pre-tokenizer `Split(pattern, "isolated")` then
`ByteLevel(use_regex=False)`; decoder `ByteLevel`; the extra special tokens appended as special `AddedToken`s.
This module adds only what the converter leaves to its caller, and nothing is retyped from Meta:
- `pattern`: the converter's default, not Meta's `Tokenizer.pat_str` (the tests pin that the two are equal);
- special tokens: the names of Meta's `Tokenizer.special_tokens`, passed in id order, so they land on ids
  128000..128255 if and only if the converter appends them as Meta numbers them (the tests check every id);
- tiktoken's file cache is switched off while the converter reads (see "tiktoken's cache" below);
- the transformers wrapper: bos `<|begin_of_text|>` with `add_bos_token=True` (the post-processor becomes HF's
  `TemplateProcessing` "<|begin_of_text|> $A"; the converter itself writes no BOS), eos `<|end_of_text|>`
  (Meta's `eos_id`), pad `<|finetune_right_pad_id|>` (Meta's `pad_id`), `clean_up_tokenization_spaces=False`
  (True would turn " ." into "." on decode and break `decode(encode(x)) == x`). transformers does not save
  `add_bos_token` in `tokenizer_config.json`: a reloaded tokenizer reports `add_bos_token=False` yet still
  writes BOS, because the template travels in `tokenizer.json`.

Until issue 14 this module held a hand-written byte-level BPE; transformers' conversion gives the same vocab,
merges, pre-tokenizer, decoder and added tokens (only the post-processor differed, by the BOS template), and
agrees with Meta on everything the tests check, so the hand-written one was removed.

tiktoken's cache
----------------
`tiktoken.load.load_tiktoken_bpe` (which `TikTokenConverter` calls) keeps a copy of every file it reads under
`$TIKTOKEN_CACHE_DIR` (default `$TMPDIR/data-gym-cache`), keyed by the file's *path*, and prefers that copy on the
next read: a `tokenizer.model` replaced in place would be converted from its stale copy while Meta's loader reads
the new file. The conversion therefore runs with `TIKTOKEN_CACHE_DIR=""` (tiktoken's switch for "no cache").

BOS / EOS
---------
Meta: `encode(s, bos=..., eos=...)` inserts `bos_id` / appends `eos_id` explicitly. HF: BOS comes from the
post-processor template (`add_special_tokens=True` writes it, `False` does not); EOS is appended explicitly by
`hf_encode`, because neither Meta's published HF tokenizer nor this one has a template for it.

Special tokens written as text
------------------------------
Meta's `encode` defaults to `allowed_special=set()`, `disallowed_special=()`: the text `<|begin_of_text|>` is
encoded as ordinary text (`<|`, `begin`, `_of`, `_text`, `|>`), never as id 128000, and nothing raises.
An HF tokenizer by default matches added tokens in the text. `hf_encode` follows Meta: it encodes with
`split_special_tokens=True` unless specials are allowed; `allowed_special="all"` lets the backend match them;
a subset is honoured by cutting the text at the allowed specials; `disallowed_special` raises `ValueError`
like tiktoken does. Calling `hf_tokenizer()(text)` directly keeps HF's own default (specials matched).

Where Meta and HF differ: Meta's chunking
-----------------------------------------
Meta's `encode` cuts its input into slices of at most 400,000 characters, and cuts any run of more than 25,000
consecutive whitespace (or non-whitespace) characters, before tiktoken sees it (a workaround for
openai/tiktoken#195). A cut inside a pre-token changes the ids near the cut: 30,000 digits give 10,001 ids from
Meta and 10,000 from HF (25,000 is not a multiple of 3). HF has no such cut. Below 400,000 characters with no such
run, Meta makes no cut and the ids agree; past 400,000 they agree when the cut falls between pre-tokens
("a " * 225_000 is cut between "a " and "a", which HF reads as "a", " a": one id more from Meta).
`hf_encode(..., chunk_like_meta=True)` encodes Meta's chunks one by one and then agrees always. The conformance
tests pin both facts.

Cache
-----
The converted tokenizer is saved (`save_pretrained`) under `$TP_LLAMA_CACHE_DIR`, else
`$XDG_CACHE_HOME/tp_llama`, else `~/.cache/tp_llama`, in `tokenizer/<key>/` (a directory `from_pretrained` can
load), with the sha256 of its `tokenizer.json` beside it (`tokenizer.json.sha256`, checked on every load). The key
hashes the tokenizer file, the source of the conversion (this module's functions and transformers'
`TikTokenConverter` and `bytes_to_unicode` as they are at run time, so a method patched in counts) and the
`tokenizers` and `transformers` versions: an edit to the conversion (or a planted bug) never reads a stale cache.
After a conversion the tokenizer is read back from its entry, so a cold run and a warm run test the same object.
Writes are atomic (build in a temporary directory, then rename), so pytest-xdist workers may race; an entry that
fails its digest is rebuilt with a warning; entries unused for a week are pruned when a new one is written; an
unwritable cache directory only costs the conversion time. Measured (CPU time, 2 shared cores): a cold
conversion 6.1 s plus 0.6 s to save it, loading the cached one 2.2 s (half of it transformers' `from_pretrained`
parsing tokenizer.json in Python for its added tokens). `read_tiktoken_ranks` keeps the last few parses by content
hash, so the validation, the tests and a reload share one parse of the file.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import AbstractSet, Collection, Literal, Sequence, Union

__all__ = [
    "PACKAGED_TOKENIZER_PATH",
    "TokenizerFileError",
    "read_tiktoken_ranks",
    "load_meta_tokenizer",
    "load_tokenizer",
    "meta_tokenizer",
    "convert_hf_backend",
    "hf_tokenizer",
    "hf_encode",
    "hf_decode",
    "meta_encode_chunks",
    "tokenizer_cache_dir",
]


def _packaged_path() -> Path:
    import llama_models.llama3

    return Path(llama_models.llama3.__file__).parent / "tokenizer.model"


PACKAGED_TOKENIZER_PATH: Path = _packaged_path()

_EXPECTED = ("a tiktoken BPE file (Llama 3's tokenizer.model): UTF-8 text, one '<base64 token bytes> <rank>' "
             "per line, ranks 0..N-1 each used once, all 256 single bytes present")


class TokenizerFileError(ValueError):
    """The tokenizer file is not tiktoken BPE (or not the one a checkpoint expects)."""


# ---------------------------------------------------------------------------------------------------------------
# Meta side
# ---------------------------------------------------------------------------------------------------------------

def _format_hint(data: bytes) -> str:
    head = data[:64].lstrip()
    if not data.strip():
        return "the file is empty"
    if head.startswith((b"{", b"[")):
        return "it looks like JSON (an HF tokenizer.json or tokenizer_config.json?)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if b"<unk>" in data[:4096] or b"\xe2\x96\x81" in data[:65536]:
        return "it looks like a SentencePiece model (Llama 1/2's tokenizer.model), not Llama 3's tiktoken BPE"
    return ""


def read_tiktoken_ranks(path: Union[str, os.PathLike]) -> dict[bytes, int]:
    """Parse and validate a tiktoken BPE file; return `{token bytes: rank}`.

    Meta's own loader (`llama_models.tokenizer_utils.load_bpe_file`) logs and skips lines it cannot parse, so a
    wrong file yields a silently broken tokenizer (or a bare UnicodeDecodeError); this one refuses it and says why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    data = path.read_bytes()
    content_key = hashlib.sha256(data).digest()
    if content_key in _PARSED_RANKS:  # the same bytes parsed before (any path): a copy, callers may mutate it
        return dict(_PARSED_RANKS[content_key])

    def fail(reason: str) -> TokenizerFileError:
        hint = _format_hint(data)
        return TokenizerFileError(f"{path}: not {_EXPECTED}; {reason}" + (f" ({hint})" if hint else ""))

    if not data.strip():
        raise fail("found no ranks")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(f"it is binary (not UTF-8 at byte {err.start})") from None

    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        shown = line if len(line) <= 60 else line[:57] + "..."
        if len(fields) != 2:
            raise fail(f"line {lineno} has {len(fields)} fields, expected 2: {shown!r}")
        token_b64, rank_text = fields
        try:
            token = base64.b64decode(token_b64, validate=True)
        except (binascii.Error, ValueError):
            raise fail(f"line {lineno}: {token_b64[:40]!r} is not base64") from None
        if not (rank_text.isascii() and rank_text.isdigit()):
            raise fail(f"line {lineno}: rank {rank_text[:20]!r} is not a non-negative integer")
        rank = int(rank_text)
        if not token:
            raise fail(f"line {lineno}: empty token")
        if token in ranks:
            raise fail(f"line {lineno}: token {token!r} repeated (first at rank {ranks[token]})")
        if rank in seen_ranks:
            raise fail(f"line {lineno}: rank {rank} used twice")
        ranks[token] = rank
        seen_ranks.add(rank)

    if not ranks:
        raise fail("found no ranks")
    if max(seen_ranks) != len(ranks) - 1:
        missing = min(set(range(len(ranks))) - seen_ranks)
        raise fail(f"{len(ranks)} ranks but the largest is {max(seen_ranks)} (rank {missing} is missing)")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise fail(f"{len(missing_bytes)} single-byte tokens are missing (first: {bytes([missing_bytes[0]])!r}), "
                   "so some text could not be encoded")
    if len(_PARSED_RANKS) >= 4:
        _PARSED_RANKS.pop(next(iter(_PARSED_RANKS)))
    _PARSED_RANKS[content_key] = ranks
    return dict(ranks)


_PARSED_RANKS: dict[bytes, dict[bytes, int]] = {}  # sha256 of a valid file's bytes -> its ranks (last 4 files)


def load_meta_tokenizer(path: Union[str, os.PathLike], *, vocab_size: int | None = None):
    """Meta's `Tokenizer` for the tiktoken file `path`, validated first.

    Raises `TokenizerFileError` (a `ValueError`) naming the file if it is not tiktoken BPE, or if `vocab_size`
    (e.g. a checkpoint's `params.json` `vocab_size`) is given and differs from the tokenizer's `n_words`.
    """
    from llama_models.llama3.tokenizer import Tokenizer

    path = Path(path)
    ranks = read_tiktoken_ranks(path)  # raises with a reason; Meta's loader would skip bad lines silently

    def check(n_ranks: int, n_special: int) -> None:
        if vocab_size is not None and n_ranks + n_special != vocab_size:
            raise TokenizerFileError(
                f"{path}: tokenizer has {n_ranks + n_special} ids ({n_ranks} BPE ranks + {n_special} special "
                f"tokens) but vocab_size={vocab_size} was expected")

    check(len(ranks), Tokenizer.num_reserved_special_tokens)  # before paying for Meta's build
    tokenizer = Tokenizer(path)
    check(tokenizer.n_words - len(tokenizer.special_tokens), len(tokenizer.special_tokens))  # Meta's own count
    return tokenizer


load_tokenizer = load_meta_tokenizer


@functools.lru_cache(maxsize=None)
def _meta_tokenizer_for(path: Path):
    return load_meta_tokenizer(path)


def meta_tokenizer():
    """Meta's Llama 3 `Tokenizer` on the file the llama-models package ships (built once per process)."""
    return _meta_tokenizer_for(PACKAGED_TOKENIZER_PATH)


def meta_encode_chunks(text: str) -> list[str]:
    """The substrings Meta's `Tokenizer.encode` hands to tiktoken one by one, cut by Meta's own code and limits."""
    from llama_models.llama3 import tokenizer as meta

    step = meta.TIKTOKEN_MAX_ENCODE_CHARS
    return [piece
            for start in range(0, len(text), step)
            for piece in meta.Tokenizer._split_whitespaces_or_nonwhitespaces(text[start:start + step],
                                                                              meta.MAX_NO_WHITESPACES_CHARS)]


# ---------------------------------------------------------------------------------------------------------------
# HF side: conversion (transformers' own TikTokenConverter)
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tiktoken_file_cache_off():
    """Make tiktoken read the file itself, not the copy its path-keyed cache may hold (module docstring)."""
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
    from transformers.convert_slow_tokenizer import TikTokenConverter

    names = [name for name, _ in sorted(special_tokens.items(), key=lambda item: item[1])]
    with _tiktoken_file_cache_off():
        return TikTokenConverter(vocab_file=str(path), extra_special_tokens=names).converted()


def _wrap(backend, meta):
    from transformers import PreTrainedTokenizerFast

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


def tokenizer_cache_dir() -> Path:
    """Root of the on-disk cache (`$TP_LLAMA_CACHE_DIR`, else `$XDG_CACHE_HOME/tp_llama`, else ~/.cache/tp_llama)."""
    if os.environ.get("TP_LLAMA_CACHE_DIR"):
        return Path(os.environ["TP_LLAMA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tp_llama"


def _source_of(obj) -> str:
    """Source of a function, or of every function a class holds now (so a method patched in at run time counts)."""
    import inspect

    if inspect.isclass(obj):
        members = sorted(vars(obj).items())
        return "\n".join(f"{name}: {_source_of(getattr(member, '__func__', member))}" for name, member in members
                         if callable(getattr(member, "__func__", member)))
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return repr(obj)


def _cache_key(path: Path) -> str:
    import importlib

    import tokenizers
    import transformers

    converter = importlib.import_module("transformers.convert_slow_tokenizer")  # the module, not the function

    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    # an edit to the conversion (ours, or transformers' converter, edited or patched at run time) or a planted bug
    # gets a new key, so it never reads a cache written by other code
    for step in (_tiktoken_file_cache_off, convert_hf_backend, _wrap, converter.TikTokenConverter,
                 converter.bytes_to_unicode):
        digest.update(_source_of(step).encode())
    digest.update(f"tokenizers {tokenizers.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:24]


_STALE_AFTER_S = 7 * 24 * 3600
_DIGEST_FILE = "tokenizer.json.sha256"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prune(cache_parent: Path, keep: Path) -> None:
    """Drop entries unused for a week (other keys: older conversions) and abandoned half-built directories."""
    import time

    now = time.time()
    for entry in cache_parent.iterdir():
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        abandoned = entry.name.startswith(".building-") and age > 3600
        if entry != keep and (abandoned or (not entry.name.startswith(".") and age > _STALE_AFTER_S)):
            shutil.rmtree(entry, ignore_errors=True)


def _load_cached(directory: Path):
    """The tokenizer saved in `directory`, after checking `tokenizer.json` against the digest written with it."""
    from transformers import PreTrainedTokenizerFast

    recorded = (directory / _DIGEST_FILE).read_text().strip()
    if _file_digest(directory / "tokenizer.json") != recorded:
        raise ValueError("tokenizer.json does not match the digest written with it (edited or truncated)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _publish(tokenizer, target: Path, replace: bool) -> None:
    """Save into a temporary directory beside `target`, then rename it into place (atomic for racing workers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    staging.chmod(0o755)
    tokenizer.save_pretrained(str(staging))
    (staging / _DIGEST_FILE).write_text(_file_digest(staging / "tokenizer.json") + "\n")
    if replace and target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process published it first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    _prune(target.parent, keep=target)


def _load_or_convert(path: Path, cache_root: Path | None, rebuild: bool):
    """The cached conversion of `path` if it is there and intact, else a fresh one, published to the cache.

    With a cache, the tokenizer returned is always the one read back from disk (also right after a conversion),
    so every run tests the object later runs will load.
    """
    meta = _meta_tokenizer_for(path)
    target = None if cache_root is None else cache_root / "tokenizer" / _cache_key(path)
    if target is not None and not rebuild and target.is_dir():
        try:
            tokenizer = _load_cached(target)
            try:
                os.utime(target)  # mark it used, for _prune
            except OSError:
                pass
            return tokenizer
        except Exception as err:  # a corrupt or half-written entry is rebuilt, not fatal
            warnings.warn(f"rebuilding unreadable tokenizer cache {target}: {err}")
            rebuild = True
    tokenizer = _wrap(convert_hf_backend(path, meta.special_tokens), meta)
    if target is None:
        return tokenizer
    try:
        _publish(tokenizer, target, replace=rebuild)
        return _load_cached(target)
    except (OSError, ValueError) as err:
        warnings.warn(f"could not cache the converted tokenizer under {target}: {err}")
        return tokenizer


_hf_tokenizer_for = functools.lru_cache(maxsize=None)(_load_or_convert)


def hf_tokenizer(path: Union[str, os.PathLike, None] = None, *, cache_dir: Union[str, os.PathLike, None, bool] = None,
                 rebuild: bool = False):
    """An HF `PreTrainedTokenizerFast` converted offline from the tiktoken file `path` (default: the packaged one).

    `cache_dir=None` uses `tokenizer_cache_dir()`, `False` disables the disk cache; `rebuild=True` converts
    again and overwrites the cache entry. The same object is returned for the same arguments within a process.
    """
    path = Path(path) if path is not None else PACKAGED_TOKENIZER_PATH
    root = None if cache_dir is False else Path(cache_dir) if cache_dir is not None else tokenizer_cache_dir()
    return _hf_tokenizer_for(path.resolve(), root, rebuild)


# ---------------------------------------------------------------------------------------------------------------
# HF side: Meta's encode/decode signature
# ---------------------------------------------------------------------------------------------------------------

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
    400k-character / 25k-run cuts split (see the module docstring).
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
