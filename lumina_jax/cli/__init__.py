"""The commands: `lumina-sample`, `lumina-train` and `lumina-convert` once installed (each module's main()),
`python -m sample`, `python -m train` and `python -m convert` from the repository."""

import os
import sys
from pathlib import Path


def fail(message) -> int:
    """A one-line error for the user; the exit status of a bad argument or input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def use_compilation_cache() -> None:
    """Keep compiled programs across runs in $LUMINA_JAX_CACHE/xla (default ~/.cache/lumina_jax/xla): a
    restarted run or a second sampling job loads them instead of compiling again."""
    import jax

    cache = Path(os.environ.get("LUMINA_JAX_CACHE", Path.home() / ".cache" / "lumina_jax")) / "xla"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
