"""Where gemma-batch keeps files between runs (assembled GGUFs, dequantized trees, compiled
programs, schedule state), and how it writes them: atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """$GEMMA_BATCH_CACHE, else $XDG_CACHE_HOME/gemma-batch, else ~/.cache/gemma-batch."""
    env = os.environ.get("GEMMA_BATCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gemma-batch"


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its cache off: off, 0, none or false."""
    return os.environ.get(name, "").lower() in ("off", "0", "none", "false")


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Creates `target` through `write(tmp)` on a temporary file in its folder, then renames it
    into place (mode 0644 less the umask): readers never see a half-written file, and two
    processes writing at once both end with a whole one. The temporary file never stays.

    Raises:
      OSError: the folder cannot be created or written; whatever `write` raises.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp creates 0600; the cache holds ordinary files
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
