"""A small, strict safetensors reader (numpy, memory-mapped, bfloat16 via ml_dtypes).

Written here rather than using `safetensors.numpy` because that cannot hold bfloat16 and because
a truncated or corrupt file must give an error naming the file, not a deep traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from model.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: Path) -> tuple[dict, int]:
    """Returns (tensor table, byte offset of the data section); checks the file is whole."""
    table, base, _ = _header(path)
    return table, base


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's `__metadata__` (string keys and values; {} when it has none)."""
    return _header(Path(path))[2]


def _header(path: Path) -> tuple[dict, int, dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has "
                f"{size}); re-download or re-save the checkpoint")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    meta = table.pop("__metadata__", None) or {}
    end = max((int(t["data_offsets"][1]) for t in table.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end}); "
            "re-download or re-save the checkpoint")
    return table, 8 + n, meta


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every tensor of one .safetensors file as a read-only memory-mapped numpy array."""
    path = Path(path)
    table, base = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in table.items():
        dt = t["dtype"]
        if dt not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dt}")
        lo, hi = (int(o) for o in t["data_offsets"])
        arr = mm[base + lo: base + hi].view(_DTYPES[dt])
        shape = tuple(t["shape"])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(
                f"{path}: tensor {name} has {arr.size} elements, its shape {shape} needs "
                f"{int(np.prod(shape))}; the file is corrupt")
        out[name] = arr.reshape(shape)
    return out


def load_dir(directory: Path) -> dict[str, np.ndarray]:
    """Reads all tensors of an HF checkpoint directory (sharded via its index, or not)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{directory}: no *.safetensors files; save the model with safe_serialization=True")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed in {index.name} but missing")
        tensors.update(load_file(f))
    return tensors
