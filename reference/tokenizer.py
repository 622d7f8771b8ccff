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
- `build_hf_backend(...)`          the conversion itself: a `tokenizers.Tokenizer` built from ranks, no caching.
- `hf_encode(text, *, bos, eos, allowed_special=None, disallowed_special=())`
                                   HF ids with the signature and semantics of Meta's `Tokenizer.encode`.
- `hf_decode(ids)`                 HF text, with Meta's `Tokenizer.decode` semantics (special tokens kept verbatim,
                                   no "clean up" of spaces, invalid UTF-8 replaced by U+FFFD).
- `meta_encode_chunks(text)`       the pieces Meta's `encode` cuts a text into before tiktoken sees it.

How the HF tokenizer is built
-----------------------------
A byte-level BPE, as HF's `TikTokenConverter` builds one, written here from the ranks Meta's file holds:
- vocab: every token's bytes mapped through GPT-2's byte-to-unicode table -> its rank (= its id);
- merges: for every token of two or more bytes, every split `left + right` with both halves in the vocab, ordered
  by the rank of the merged token (ties by the halves' ranks). tiktoken merges the adjacent pair whose
  concatenation has the lowest rank; an HF BPE with these merges picks the same pair. `ignore_merges=True`
  makes a pre-token that is itself a token come out whole, as tiktoken does;
- pre-tokenizer: `Split(Meta's Tokenizer.pat_str, "isolated")` then `ByteLevel(add_prefix_space=False,
  use_regex=False)`; decoder: `ByteLevel`;
- special tokens: Meta's `Tokenizer.special_tokens`, read from Meta's class (not retyped), added in id order as
  special `AddedToken`s, so they land on ids 128000..128255 with Meta's names;
- post-processor: `ByteLevel(trim_offsets=False)` then a `TemplateProcessing` that writes `<|begin_of_text|>`
  before the text (the layout of Meta's published HF `tokenizer.json`). No template writes EOS.
- the transformers wrapper: bos `<|begin_of_text|>`, eos `<|end_of_text|>` (Meta's `eos_id`), pad
  `<|finetune_right_pad_id|>` (Meta's `pad_id`), `clean_up_tokenization_spaces=False` (True would turn
  " ." into "." on decode and break `decode(encode(x)) == x`).

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
load); the key hashes the tokenizer file, the source of the conversion functions and the `tokenizers` and
`transformers` versions, so an edit to the conversion (or a planted bug) never reads a stale cache. Writes are
atomic (build in a temporary directory, then rename), so pytest-xdist workers may race; entries unused for a
week are pruned when a new one is written. A cold conversion takes about 2.5 s (2 cores); loading the cached one
about 0.8 s; an unwritable cache directory only costs the conversion time.
"""
from __future__ import annotations

import base64
import binascii
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
    "build_hf_backend",
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
    return ranks


def load_meta_tokenizer(path: Union[str, os.PathLike], *, vocab_size: int | None = None):
    """Meta's `Tokenizer` for the tiktoken file `path`, validated first.

    Raises `TokenizerFileError` (a `ValueError`) naming the file if it is not tiktoken BPE, or if `vocab_size`
    (e.g. a checkpoint's `params.json` `vocab_size`) is given and differs from the tokenizer's `n_words`.
    """
    from llama_models.llama3.tokenizer import Tokenizer

    path = Path(path)
    read_tiktoken_ranks(path)  # raises with a reason; Meta's loader would skip bad lines silently
    tokenizer = Tokenizer(path)
    if vocab_size is not None and tokenizer.n_words != vocab_size:
        raise TokenizerFileError(
            f"{path}: tokenizer has {tokenizer.n_words} ids ({tokenizer.n_words - len(tokenizer.special_tokens)} BPE "
            f"ranks + {len(tokenizer.special_tokens)} special tokens) but vocab_size={vocab_size} was expected")
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
# HF side: conversion
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, the one the ByteLevel pre-tokenizer/decoder use."""
    from tokenizers import pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    # cross-check against the tokenizers library for every byte that can occur alone in a str (ASCII)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ascii_pieces = "".join(piece for piece, _ in byte_level.pre_tokenize_str("".join(map(chr, range(128)))))
    if (len(table) != 256 or set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet())
            or ascii_pieces != "".join(table[b] for b in range(128))):
        raise RuntimeError("transformers' bytes_to_unicode disagrees with the tokenizers ByteLevel alphabet")
    return table


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every `left + right` split of every multi-byte token whose halves are tokens, lowest merged rank first."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_hf_backend(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str):
    """A `tokenizers.Tokenizer` equal in ids to tiktoken with these ranks, specials and split regex."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    table = _byte_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in _merges_from_ranks(ranks)]
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    ordered = sorted(special_tokens.items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in ordered])
    bos_name, bos_id = ordered[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos_name}:0 $A:0",
                                      pair=f"{bos_name}:0 $A:0 {bos_name}:1 $B:1",
                                      special_tokens=[(bos_name, bos_id)]),
    ])
    return backend


def _wrap(backend, meta):
    from transformers import PreTrainedTokenizerFast

    names = {token_id: name for name, token_id in meta.special_tokens.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names[meta.bos_id],
        eos_token=names[meta.eos_id],
        pad_token=names[meta.pad_id],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,  # Llama 3.1 context length
    )


def tokenizer_cache_dir() -> Path:
    """Root of the on-disk cache (`$TP_LLAMA_CACHE_DIR`, else `$XDG_CACHE_HOME/tp_llama`, else ~/.cache/tp_llama)."""
    if os.environ.get("TP_LLAMA_CACHE_DIR"):
        return Path(os.environ["TP_LLAMA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tp_llama"


def _cache_key(path: Path) -> str:
    import inspect

    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    for step in (_byte_to_unicode, _merges_from_ranks, build_hf_backend, _wrap):  # an edit to the conversion
        digest.update(inspect.getsource(step).encode())                           # (or a planted bug) rebuilds
    digest.update(f"tokenizers {tokenizers.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:24]


_STALE_AFTER_S = 7 * 24 * 3600


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
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


@functools.lru_cache(maxsize=None)
def _hf_tokenizer_for(path: Path, cache_root: Path | None, rebuild: bool):
    meta = _meta_tokenizer_for(path)
    target = None if cache_root is None else cache_root / "tokenizer" / _cache_key(path)
    if target is not None and not rebuild and (target / "tokenizer.json").is_file():
        try:
            tokenizer = _load_cached(target)
            try:
                os.utime(target)  # mark it used, for _prune
            except OSError:
                pass
            return tokenizer
        except Exception as err:  # a corrupt cache is rebuilt, not fatal
            warnings.warn(f"rebuilding unreadable tokenizer cache {target}: {err}")
            rebuild = True
    ranks = read_tiktoken_ranks(path)
    tokenizer = _wrap(build_hf_backend(ranks, meta.special_tokens, meta.pat_str), meta)
    if target is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
            staging.chmod(0o755)
            tokenizer.save_pretrained(str(staging))
            if rebuild and target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(staging, target)
            except OSError:  # another process published it first; its copy is identical
                shutil.rmtree(staging, ignore_errors=True)
            _prune(target.parent, keep=target)
        except OSError as err:
            warnings.warn(f"could not cache the converted tokenizer under {target}: {err}")
    return tokenizer


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
