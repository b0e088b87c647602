"""JAX's persistent compilation cache, for conservation's many small programs.

Most of a first call is XLA compilation (the README's first example: 142 programs at first,
28 now). With the cache on, a later process loads each compiled program from disk instead of
compiling it again; it still traces and lowers each one (JAX computes the cache key from the
lowered program), which is most of what a warm first call spends besides `import`.
The CLI turns it on by default; library users call `enable_compilation_cache()` once.
"""

import os
import pathlib

import jax

from ._validation import ArgumentError

ENV_DIR = "CONSERVATION_CACHE_DIR"
ENV_OFF = "CONSERVATION_NO_CACHE"


def default_cache_dir() -> pathlib.Path:
    """`$CONSERVATION_CACHE_DIR`, else `$XDG_CACHE_HOME/conservation/jax`, else
    `~/.cache/conservation/jax`."""
    if os.environ.get(ENV_DIR):
        return pathlib.Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "conservation" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache for this process, for every program
    (no minimum compile time or size: conservation's programs are many and small).

    **What it stores:** compiled XLA executables, one file per program, keyed by a hash of
    the program, the jax/jaxlib versions, the backend and the compiler options. A program
    embeds the constant arrays it closes over (e.g. a dataset captured by a jitted closure),
    so those are stored with it; nothing else (no results, no parameters passed as
    arguments). A cached program is the same executable that compiling gives, so a cached run
    equals a fresh one bit for bit.

    **Turning it off:** don't call this (library use), or pass `--no-cache` to the CLI or set
    the environment variable `CONSERVATION_NO_CACHE=1`. Delete the folder to empty it.

    **Arguments:**

    - `path`: the cache folder; default `default_cache_dir()` (`$CONSERVATION_CACHE_DIR`, else
      `~/.cache/conservation/jax`).

    **Returns:** the folder in use, or None when `CONSERVATION_NO_CACHE` is set. Where JAX's
    cache was already configured (`jax_compilation_cache_dir`), that folder stays in use.

    ```python
    import conservation as cn
    cn.enable_compilation_cache()  # later processes skip most compilation
    ```
    """
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        folder = pathlib.Path(configured)
    else:
        folder = default_cache_dir() if path is None else pathlib.Path(path).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArgumentError(
                f"`path` {str(folder)!r} cannot hold the compilation cache ({e.strerror}); pass "
                f"a writable folder or set {ENV_OFF}=1 to run without it.") from None
        jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
