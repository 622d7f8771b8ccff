"""Llama 3's tokenizer as every side reads it: Meta's `Tokenizer` on the tiktoken file llama-models ships.

The file (`llama_models/llama3/tokenizer.model`) holds 128000 BPE ranks, one `<base64 token bytes> <rank>` per
line; Meta's `Tokenizer` puts 256 special tokens after them. The file is validated before Meta's loader reads it,
because that loader skips lines it cannot parse. The HF side (a conversion of the same file) is in
`reference.tokenizer`; docs/tokenizer.md tells the whole story.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from pathlib import Path
from typing import Union

import llama_models.llama3
from llama_models.llama3.tokenizer import Tokenizer

PACKAGED_TOKENIZER_PATH: Path = Path(llama_models.llama3.__file__).parent / "tokenizer.model"

_EXPECTED = ("a tiktoken BPE file (Llama 3's tokenizer.model): UTF-8 text, one '<base64 token bytes> <rank>' "
             "per line, ranks 0..N-1 each used once, all 256 single bytes present")


class TokenizerFileError(ValueError):
    """The tokenizer file is not tiktoken BPE (or not the one a checkpoint expects)."""


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


@functools.lru_cache(maxsize=None)
def meta_tokenizer(path: Path = PACKAGED_TOKENIZER_PATH):
    """Meta's Llama 3 `Tokenizer` on `path` (default: the file llama-models ships), built once per process."""
    return load_meta_tokenizer(path)
