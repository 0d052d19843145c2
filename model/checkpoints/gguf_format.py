"""The GGUF container: a fast reader of the header (metadata + tensor table) over a memory map.

`open_gguf(path)` parses GGUF v2/v3 little-endian files and checks that every tensor lies inside
the file; tensor types and block sizes come from the `gguf` package. Nothing here knows Gemma.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: numpy-order shape (GGUF lists dims innermost first)."""

    name: str
    shape: tuple[int, ...]  # e.g. attn_q: (H*Dh, D)
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the whole file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data: np.ndarray  # uint8 memmap of the file

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        return self.data[t.offset : t.offset + t.nbytes]


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a byte buffer; running past its end raises _Truncated."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        v = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def value(self, vtype: int) -> Any:
        if vtype == 8:  # string
            return self.string()
        if vtype == 9:  # array: element type, count, elements
            etype, count = self.take("<I"), self.take("<Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype == 9:
                return [self.value(9) for _ in range(count)]
            if etype not in self._NUMPY:
                raise ValueError(f"unknown array element type {etype}")
            dt = np.dtype(self._NUMPY[etype])
            if self.pos + count * dt.itemsize > len(self.buf):
                raise _Truncated
            arr = np.frombuffer(self.buf, dt, count, self.pos)
            self.pos += count * dt.itemsize
            return (arr != 0).tolist() if etype == 7 else arr.tolist()
        if vtype not in self._SCALARS:
            raise ValueError(f"unknown value type {vtype}")
        return self.take(self._SCALARS[vtype])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses a GGUF header (metadata + tensor table) and checks every tensor lies in the file.

    A small reader of our own: `gguf.GGUFReader` builds a numpy view per array element, which
    takes tens of seconds on a 262k-token vocabulary; this reads the same layout in well under
    a second. Quantization types and block sizes still come from the `gguf` package.

    Raises:
      CheckpointError: missing file, not GGUF, truncated or corrupt header or tensor data.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "pass a .gguf produced by llama.cpp's converter"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    cur.pos = 4
    try:
        version = cur.take("<I")
        if version not in (2, 3):
            raise CheckpointError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are; a huge number "
                "means a big-endian file); convert it again with a current llama.cpp"
            )
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
        md: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            md[key] = cur.value(cur.take("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    except _Truncated:
        raise CheckpointError(
            f"{path} is truncated: the file ends inside its header ({size} bytes); "
            "download or assemble the file again"
        ) from None
    except (ValueError, OverflowError) as e:
        raise CheckpointError(
            f"{path} is corrupt: its header does not parse ({e}); download or assemble the "
            "file again"
        ) from None
    align = int(md.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, dims, qt, off in raw_infos:
        try:
            qtype = GGMLQuantizationType(qt)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{path}: tensor {name} has quantization type {qt}, unknown to the installed "
                "gguf package; upgrade it: pip install -U gguf"
            ) from None
        n = int(np.prod(dims)) if dims else 1
        if dims and dims[0] % block:
            raise CheckpointError(f"{path} is corrupt: tensor {name} rows of {dims[0]} do not "
                                  f"fill {qtype.name} blocks of {block}")
        info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, start + int(off),
                          n // block * type_size)
        if info.offset + info.nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to "
                f"{info.offset + info.nbytes} but the file has {size}; download or assemble "
                "the file again"
            )
        tensors.append(info)
    md["GGUF.version"] = version
    return GGUFFile(path, version, md, tensors, data)
