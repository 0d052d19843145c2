"""A GGUF's quantized blocks as int8 codes plus float32 (scale, offset) per group, for the
decode kernel (model/quant.py, model/kernels). GGUF's Q8_0, Q5_0, Q4_K and Q6_K blocks are all
`scale * q + offset` over groups of 32 (16 for Q6_K) with small integer codes q; products
scale * q are exact in float32, so the codes give the dequantized float32 weights bit for bit
(`quant.codes_exact`). Other types have no decoder here (their tensors keep float32)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from model.checkpoints.gguf import LAYER_TENSORS
from model.checkpoints.gguf_format import GGUFFile, TensorInfo, open_gguf

Codes = tuple[np.ndarray, np.ndarray, int]  # q int8 [N, K], so float32 [N, K / G, 2], G

# GGUF matrix names -> our flat names (GGUF order [out, in]: see quant.gguf_order).
_MATRICES = {g: ours for g, (ours, is_norm) in LAYER_TENSORS.items() if not is_norm}


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> float32 [...]: little-endian float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _q8_0(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 34] blocks -> codes [n, 32], scale [n, 1], offset [n, 1]."""
    d = _f16(blk[:, :2])[:, None]
    return blk[:, 2:].view(np.int8), d, np.zeros_like(d)


def _q5_0(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 22] blocks (d f16, 32 high bits, 16 bytes of low nibbles) -> codes in [-16, 15]."""
    d = _f16(blk[:, :2])[:, None]
    hi = np.ascontiguousarray(blk[:, 2:6]).view(np.uint32)  # [n, 1]
    hi = ((hi >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)  # [n, 32]
    lo = blk[:, 6:22]
    nib = np.concatenate([lo & 0x0F, lo >> 4], axis=1).astype(np.int16)  # [n, 32]
    return (nib | (hi << 4)) - 16, d, np.zeros_like(d)


def _q4_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 144] super-blocks of 8 x 32 -> codes in [0, 15], scale d*sc, offset -dmin*m."""
    n = blk.shape[0]
    d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
    sc6 = blk[:, 4:16].reshape(n, 3, 4)
    a, b, c = sc6[:, 0], sc6[:, 1], sc6[:, 2]  # 6-bit scales and mins, packed
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)  # [n, 8]
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    qs = blk[:, 16:].reshape(n, 4, 32)  # each 32 bytes: sub-block 2j (low), 2j+1 (high)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n * 8, 32)
    scale = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)
    offset = -(dmin[:, None] * mn.astype(np.float32)).reshape(-1, 1)
    return codes, scale, offset


def _q6_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 210] super-blocks of 16 x 16 -> codes in [-32, 31], scale d*sc (int8 sc)."""
    n = blk.shape[0]
    ql, qh = blk[:, :128].reshape(n, 2, 64), blk[:, 128:192].reshape(n, 2, 32)
    sc = blk[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    d = _f16(blk[:, 208:210])
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # halves of 128
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)  # [n, 2, 4, 32]
    codes = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    return codes.reshape(n * 16, 16), (d[:, None] * sc).reshape(-1, 1), np.zeros((n * 16, 1),
                                                                                 np.float32)


# type name -> (bytes per block, weights per block, decoder, group).
_DECODERS: dict[str, tuple[int, int, Callable, int]] = {
    "Q8_0": (34, 32, _q8_0, 32), "Q5_0": (22, 32, _q5_0, 32),
    "Q4_K": (144, 256, _q4_k, 32), "Q6_K": (210, 256, _q6_k, 16),
}


def gguf_codes(g: GGUFFile, t: TensorInfo) -> Codes | None:
    """A 2-D tensor's int8 codes and per-group (scale, offset), in GGUF's [rows, K] order; None
    for types without a decoder here (F32, F16, other quantizations)."""
    spec = _DECODERS.get(t.qtype.name)
    if spec is None or len(t.shape) != 2:
        return None
    nbytes, per, decode, group = spec
    rows, k = t.shape
    blk = np.asarray(g.tensor_bytes(t)).reshape(rows * k // per, nbytes)
    codes, scale, offset = decode(blk)
    q = codes.astype(np.int8).reshape(rows, k)
    so = np.stack([scale, offset], axis=-1).astype(np.float32).reshape(rows, k // group, 2)
    return q, so, group


class GGUFCodes:
    """The codes of one GGUF file for `quant.decode_weights`: calling it returns them from the
    cache when an earlier engine checked them against the float32 tree (`checked` is then True),
    else reads them from the file; `remember` caches codes that passed the check."""

    def __init__(self, path: str | Path):
        self.path, self.checked = Path(path), False
        self._ahead: dict[str, Codes] | None = None
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        """Reads the codes now (host arrays only, no device work), for the next call to return:
        a caller with idle time before its first decode (pipeline/predictor.py)."""
        with self._lock:
            if self._ahead is None:
                self._ahead = self._read()

    def __call__(self) -> dict[str, Codes]:
        with self._lock:
            got, self._ahead = self._ahead, None  # handed over once: not kept past its use
            return got if got is not None else self._read()

    def _read(self) -> dict[str, Codes]:
        from model.checkpoints.gguf_cache import read_codes_cache

        cached = read_codes_cache(self.path)
        self.checked = cached is not None
        return cached if cached is not None else read_codes(self.path)

    def remember(self, codes: dict[str, Codes]) -> None:
        from model.checkpoints.gguf_cache import write_codes_cache

        write_codes_cache(self.path, codes)


def read_codes(path: str | Path) -> dict[str, Codes]:
    """Codes of every decodable matrix of a Gemma GGUF: {"embed": ..., "layers.3.q": ...}."""
    g = open_gguf(path)
    layer_re = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
    out: dict[str, Codes] = {}
    for t in g.tensors:
        m = layer_re.fullmatch(t.name)
        if t.name == "token_embd.weight":
            name = "embed"
        elif m and m.group(2) in _MATRICES:
            name = f"layers.{m.group(1)}.{_MATRICES[m.group(2)]}"
        else:
            continue
        codes = gguf_codes(g, t)
        if codes is not None:
            out[name] = codes
    return out
