"""Files the suite reads and keeps: a command's input JSON file, refused alike by every command (one line naming the
file and what is wrong with it, printed as `error: ...` before exit status 2), and the root of the on-disk cache."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class InputFileError(ValueError):
    """An input file is missing, unreadable, not JSON or not what the command reads; the message names it."""


def read_json(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> Any:
    """The parsed file; `what` says what it should be ('a --parity-json document') and `keys` the fields such a
    JSON object must have."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file; give {what}") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text file (not UTF-8); give {what}") from None
    except OSError as err:
        raise InputFileError(f"{path}: cannot read ({err.strerror or err}); give {what}") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                             f"give {what}") from None
    if keys and not isinstance(content, dict):
        raise InputFileError(f"{path}: a JSON {type(content).__name__}, not {what}")
    missing = [key for key in keys if key not in content]
    if missing:
        raise InputFileError(f"{path}: no {missing[0]!r} field, so not {what}")
    return content


def cache_root() -> Path:
    """Root of the suite's on-disk cache (converted tokenizer, real model): `$TP_LLAMA_CACHE_DIR`, else
    `$XDG_CACHE_HOME/tp_llama`, else ~/.cache/tp_llama."""
    if os.environ.get("TP_LLAMA_CACHE_DIR"):
        return Path(os.environ["TP_LLAMA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tp_llama"
