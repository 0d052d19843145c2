"""The on-disk cache of dequantized GGUF trees: one float32 safetensors file (config and info in
its metadata) plus the tokenizer proto, keyed by the GGUF's content, so a reload takes seconds;
beside it, the block codes the decode kernel reads (checkpoints/gguf_codes.py), once they were
checked against that tree."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoints.safetensors_io import load_file, read_metadata
from model.config import GemmaConfig
from model.paths import atomic_write, cache_dir

# Bump when the mapping in gguf.py changes (v2: MLP weights kept [out, in]); entries of an older
# format are removed when the new one is written.
CACHE_FORMAT = "gemma-batch-gguf-f32-v2"

# How the codes file holds a layer's matrices: v2 stacks q, k, v ("qkv") and gate, up ("gate_up")
# as the decode kernel reads them (quant.FUSED), so an engine places them without copying. The
# layout is in the file's name: another version's file is never read as this one.
CODES_LAYOUT = "stacked-v2"

Hit = tuple[GemmaConfig, dict[str, Any], dict[str, np.ndarray], bytes]  # cfg, info, flat, proto


def _content_key(path: Path) -> str:
    """A cheap content key: size, the first 8 MiB (header + metadata) and the last 1 MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|".encode())
    with path.open("rb") as f:
        h.update(f.read(8 << 20))
        if size > 9 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:24]


def cache_paths(path: Path) -> tuple[Path, Path]:
    """(weights .safetensors, tokenizer .model) of the GGUF at `path` in the cache."""
    key = _content_key(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    base = cache_dir() / "gguf-f32"
    return base / f"{stem}-{key}.safetensors", base / f"{stem}-{key}.tokenizer.model"


def _current_meta(file: Path) -> dict[str, str] | None:
    """A cache file's metadata if it was written in CACHE_FORMAT, else None (a damaged file
    raises)."""
    meta = read_metadata(file)
    return meta if meta.get("format") == CACHE_FORMAT else None


def codes_file(path: Path) -> Path:
    """Where the checked block codes of the GGUF at `path` are cached."""
    weights_file, _ = cache_paths(path)
    return weights_file.with_name(f"{weights_file.stem}.codes-{CODES_LAYOUT}.safetensors")


def read_codes_cache(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]] | None:
    """{name: (q, so, group)} cached by `write_codes_cache` (memory-mapped), or None if
    absent/damaged."""
    file = codes_file(path)
    if not file.exists():
        return None
    try:
        meta = _current_meta(file)
        if meta is None or meta.get("layout") != CODES_LAYOUT:
            return None
        groups = json.loads(meta["groups"])
        arrays = load_file(file)
        return {n: (arrays[f"{n}.q"], arrays[f"{n}.so"], int(g)) for n, g in groups.items()}
    except Exception:  # rebuilt from the GGUF, never trusted
        return None


def write_codes_cache(path: Path, codes: dict[str, tuple[np.ndarray, np.ndarray, int]]) -> None:
    """Stores codes that gave the cached float32 tree exactly; a read-only cache is skipped."""
    from safetensors.numpy import save_file

    arrays = {}
    for n, (q, so, _) in codes.items():
        arrays[f"{n}.q"], arrays[f"{n}.so"] = np.asarray(q), np.asarray(so)
    meta = {"format": CACHE_FORMAT, "layout": CODES_LAYOUT, "source": str(path),
            "groups": json.dumps({n: g for n, (_, _, g) in codes.items()})}
    file = codes_file(path)
    try:
        atomic_write(file, lambda tmp: save_file(arrays, str(tmp), metadata=meta))
    except OSError:
        return
    # The layout before stacked-v2 (one matrix per tensor), the size of the codes again.
    file.with_name(file.name.replace(f".codes-{CODES_LAYOUT}.", ".codes.")).unlink(
        missing_ok=True)


def _config_from_json(text: str) -> GemmaConfig:
    d = json.loads(text)
    d["layer_types"] = tuple(d["layer_types"])
    return GemmaConfig(**d)


def read_cache(path: Path) -> Hit | None:
    """(cfg, info, flat weights (memory-mapped), tokenizer proto) from the cache, or None if
    absent/damaged."""
    weights_file, proto_file = cache_paths(path)
    if not (weights_file.exists() and proto_file.exists()):
        return None
    try:
        meta = _current_meta(weights_file)
        if meta is None:
            return None
        cfg = _config_from_json(meta["config"])
        info = json.loads(meta["info"])
        return cfg, info, load_file(weights_file), proto_file.read_bytes()
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None


def write_cache(path: Path, cfg: GemmaConfig, info: dict[str, Any],
                flat: dict[str, np.ndarray], proto: bytes) -> None:
    """Stores the tree of the GGUF at `path`; a read-only cache is skipped silently."""
    from safetensors.numpy import save_file

    weights_file, proto_file = cache_paths(path)
    meta = {
        "format": CACHE_FORMAT,
        "source": str(path),
        "config": json.dumps(dataclasses.asdict(cfg)),
        "info": json.dumps(info),
    }
    try:
        atomic_write(proto_file, lambda tmp: tmp.write_bytes(proto))
        atomic_write(weights_file, lambda tmp: save_file(flat, str(tmp), metadata=meta))
    except OSError:
        return  # a read-only cache only costs the dequantization next time
    _drop_old_formats(weights_file.parent)


def _drop_old_formats(base: Path) -> None:
    """Removes cached trees written by an older CACHE_FORMAT (each the size of the model)."""
    for old in base.glob("*.safetensors"):
        try:
            current = _current_meta(old) is not None
        except Exception:
            current = False  # damaged: never read back either
        if not current:
            old.unlink(missing_ok=True)
            old.with_suffix(".tokenizer.model").unlink(missing_ok=True)
