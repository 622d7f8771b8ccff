"""JAX's persistent compilation cache, switched on for the suite and the benchmarks.

On CPU most of a cold run of the suite is XLA compiling the model's programs; with the cache, a later run
(and the second pytest-xdist worker) loads the executables from disk instead. JAX writes by default only
programs that took over a second to compile, which leaves out nearly every program of the tiny preset, so
here every program is written unless the user set JAX's own thresholds.

Where the cache lives, first match wins:
1. the `path` argument;
2. $TP_LLAMA_COMPILATION_CACHE (`off`, `0`, `false`, `no` or empty switches the cache off);
3. a directory already given to JAX (`jax_compilation_cache_dir`, e.g. $JAX_COMPILATION_CACHE_DIR);
4. $XDG_CACHE_HOME/tp_llama/jax_compilation_cache, else ~/.cache/tp_llama/jax_compilation_cache.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TP_LLAMA_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no")
# Unbounded, as JAX's own default. A bounded cache lists and reads every entry's access time on each write
# (jax._src.lru_cache.LRUCache._evict_if_needed) under a directory lock the other worker waits on, which costs
# seconds per write in a well-used directory (the timings: benchmarks/RESULTS.md). An entry
# read while the other worker is still writing it fails to decompress; JAX warns and compiles it itself (tried
# with a halved and an empty entry: the warning 'Error reading persistent compilation cache entry', no crash).
# JAX_COMPILATION_CACHE_MAX_SIZE (bytes) bounds it.
DEFAULT_MAX_BYTES = -1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tp_llama" / "jax_compilation_cache"


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The directory the cache would use (see the module docstring), or None when it is switched off."""
    import jax

    if path is not None:
        return Path(path).expanduser()
    if ENV_VAR in os.environ:
        value = os.environ[ENV_VAR].strip()
        return None if value.lower() in _OFF else Path(value).expanduser()
    configured = jax.config.jax_compilation_cache_dir
    return Path(configured).expanduser() if configured else default_cache_dir()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `path` (or the resolved default) and cache every program.

    Call it before the first compilation of the process (conftest's pytest_configure does). Returns the
    directory, or None when the cache is switched off. JAX's own settings, when given through their
    environment variables, win over the thresholds set here.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = resolve_cache_dir(path)
    if directory is None or not jax.config.jax_enable_compilation_cache:  # the latter: JAX's own off switch
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"JAX compilation cache directory {directory} cannot be created ({err}); set "
                      f"{ENV_VAR} to a writable directory, or to 'off'") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"JAX compilation cache directory {directory} is not writable; set {ENV_VAR} to a "
                              f"writable directory, or to 'off'")
    for option, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                          ("jax_persistent_cache_min_entry_size_bytes", -1),
                          ("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)):
        if option.upper() not in os.environ:
            jax.config.update(option, value)
    compilation_cache.reset_cache()  # a cache opened earlier in this process would keep its old directory
    compilation_cache.set_cache_dir(str(directory))
    return directory
