"""A persistent XLA compilation cache, so that a second run of the same shapes skips compiling its step.

On CPU the train step's XLA compilation takes seconds to tens of seconds (benchmarks/results), every run
again; JAX can keep compiled executables on disk (``jax_compilation_cache_dir``). Its defaults cache only
programs that took >= 1 s to compile and, left at 0, let JAX choose a minimum entry size: this turns both
limits off so that the many small CPU programs of a run (loading, the optimizer's init, generation) are
cached as well.

Where: ``$JAXLORA_COMPILATION_CACHE`` if set (a directory, or ``0`` / ``off`` / ``none`` to disable),
else ``$XDG_CACHE_HOME/jaxlora/xla`` (``~/.cache/jaxlora/xla``). A directory the caller already gave JAX
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) wins over both. JAX reads the setting at each compile
that finds no cache yet, so enabling it after some programs were compiled caches the later ones.

The cache is trusted code: JAX loads executables from it. Do not point it at a directory others can write.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAXLORA_COMPILATION_CACHE"
_OFF = ("0", "off", "none", "false", "no")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxlora/xla``, with XDG's default ``~/.cache`` when the variable is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxlora" / "xla"


def cache_dir_from_env() -> Path | None:
    """The directory `enable_compilation_cache` would use; None when ``$JAXLORA_COMPILATION_CACHE`` turns it off."""
    value = os.environ.get(ENV)
    if value is None:
        return default_cache_dir()
    if value.strip().lower() in _OFF or not value.strip():
        return None
    return Path(value).expanduser()


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache at `path` (default: `cache_dir_from_env()`); return the
    directory in use, or None when it is off. Idempotent; a directory already set in ``jax.config`` is kept."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    target = Path(path) if path is not None else cache_dir_from_env()
    if target is None:
        return None
    target.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(target))
    # Cache every program: JAX's default 1 s threshold skips most of a small CPU run's programs, and its
    # automatic minimum entry size (chosen when this is left at 0) is meant for remote file systems.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return target
