"""Where gemma-batch keeps files between runs (assembled GGUFs, dequantized trees, compiled
programs, schedule state)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GEMMA_BATCH_CACHE, else $XDG_CACHE_HOME/gemma-batch, else ~/.cache/gemma-batch."""
    env = os.environ.get("GEMMA_BATCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gemma-batch"
