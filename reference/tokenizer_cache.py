"""The on-disk cache of the converted HF tokenizer: one directory per key, written atomically, checked on load.

An entry is what `save_pretrained` writes plus the sha256 of its tokenizer.json, checked on every load; a corrupt
entry is rebuilt with a warning, entries unused for a week are pruned when another is written, and an unwritable
cache costs only the conversion time. Writes go through a temporary directory and a rename, so pytest-xdist
workers may race. The caller's key must change whenever the conversion does (see `source_of`).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

DIGEST_FILE = "tokenizer.json.sha256"
_STALE_AFTER_S = 7 * 24 * 3600


def source_of(obj) -> str:
    """Source of a function, or of every function a class holds now (so a method patched in at run time counts)."""
    if inspect.isclass(obj):
        members = sorted(vars(obj).items())
        return "\n".join(f"{name}: {source_of(getattr(member, '__func__', member))}" for name, member in members
                         if callable(getattr(member, "__func__", member)))
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return repr(obj)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prune(cache_parent: Path, keep: Path) -> None:
    """Drop entries unused for a week (other keys: older conversions) and abandoned half-built directories."""
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
    from transformers import PreTrainedTokenizerFast  # heavy: only when a cache entry is read

    recorded = (directory / DIGEST_FILE).read_text().strip()
    if file_digest(directory / "tokenizer.json") != recorded:
        raise ValueError("tokenizer.json does not match the digest written with it (edited or truncated)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _publish(tokenizer, target: Path, replace: bool) -> None:
    """Save into a temporary directory beside `target`, then rename it into place (atomic for racing workers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    staging.chmod(0o755)
    tokenizer.save_pretrained(str(staging))
    (staging / DIGEST_FILE).write_text(file_digest(staging / "tokenizer.json") + "\n")
    if replace and target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process published it first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    _prune(target.parent, keep=target)


def load_or_build(target: Path | None, build: Callable[[], Any], rebuild: bool):
    """The tokenizer cached at `target` if it is there and intact, else `build()`, published there.

    With a cache, the tokenizer returned is always the one read back from disk (also right after a build), so
    every run tests the object later runs will load. `target=None` builds without caching.
    """
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
    tokenizer = build()
    if target is None:
        return tokenizer
    try:
        _publish(tokenizer, target, replace=rebuild)
        return _load_cached(target)
    except (OSError, ValueError) as err:
        warnings.warn(f"could not cache the converted tokenizer under {target}: {err}")
        return tokenizer
