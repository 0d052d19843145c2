"""Native CPU kernels, built on first use with the machine's C++ compiler and called from jitted
programs through XLA's FFI.

`qmatmul` multiplies float32 activations by block-quantized int8 weights (qmatmul.cc), with
AVX-512 where the CPU has it; `qargmax` gives greedy decoding's next token from such a head
without the full product (qargmax.cc: integer dot products and exact bounds, AVX-512 VNNI where
the CPU has it); `decode_attention` is one decode step's attention core (attention.cc). Their
shared library is compiled once per source/jaxlib/flags into the gemma-batch cache (`kernels/`),
atomically, so Ray workers on one machine share it. Where it cannot be used (not
x86-64 with AVX2 and FMA, no compiler, a failed build) `available()` is False and `reason()` says
why; callers then keep their float32 path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.cpu import cpu_flags
from model.paths import atomic_write, cache_dir

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "qmatmul.cc", _HERE / "qargmax.cc", _HERE / "attention.cc"]
_HEADERS = [_HERE / "parallel.h", _HERE / "qrows.h", _HERE / "simd.h"]
# FFI target -> the handler symbol the library exports.
_TARGETS = {"gemma_batch_qmatmul": "GemmaBatchQMatmul",
            "gemma_batch_qargmax": "GemmaBatchQArgmax",
            "gemma_batch_qargmax_tiles": "GemmaBatchQArgmaxTiles",
            "gemma_batch_decode_attention": "GemmaBatchDecodeAttention"}
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w"]
# Added where the CPU has AVX-512F: qmatmul then takes 16 columns and up to 16 rows per pass (the
# 270M's head for 24 rows, [24, 640] x [640, 262144]: 75-78 -> 50-54 ms on a 2-core Xeon).
_AVX512 = ["-mavx512f"]
# Added where the CPU also has AVX512-VNNI: qargmax's integer products take vpdpbusd (64 byte
# products per instruction) instead of AVX2's vpmaddubsw.
_VNNI = ["-mavx512vnni", "-mavx512bw"]
_reason = ""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def flags() -> list[str]:
    """The compiler flags for this CPU ($GEMMA_BATCH_KERNEL_ISA=avx2 leaves AVX-512 out)."""
    wide = ("avx512f" in cpu_flags()
            and os.environ.get("GEMMA_BATCH_KERNEL_ISA", "").lower() != "avx2")
    vnni = wide and {"avx512_vnni", "avx512bw"} <= cpu_flags()
    return _FLAGS + (_AVX512 if wide else []) + (_VNNI if vnni else [])


def _build() -> Path:
    """The compiled library (cached); raises RuntimeError with the reason it cannot be built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernel is for x86-64, this machine is {platform.machine()}")
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(sorted(missing))}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    include = jax.ffi.include_dir()
    text = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(text + " ".join(
        flags() + [jax.__version__, cxx]).encode()).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"kernels-{key}.so"
    if lib.exists():
        return lib

    def compile_to(tmp: Path) -> None:
        r = subprocess.run([cxx, *flags(), f"-I{include}", *map(str, _SOURCES), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build the kernels: {r.stderr.strip()[-400:]}")

    atomic_write(lib, compile_to)
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernels can run here (builds and registers them on the first call)."""
    global _reason
    if jax.default_backend() != "cpu":
        _reason = f"the default JAX backend is {jax.default_backend()}, the kernel is for CPUs"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        _reason = str(e)
        log.warning("quantized decode kernel unavailable, decode keeps float32 weights: %s", e)
        return False
    return True


def reason() -> str:
    """Why `available()` is False ("" when it is True or was not asked yet)."""
    return _reason


def _wanted(m: int, rows: jax.Array | None) -> jax.Array:
    """The kernels' `rows` argument: int32 [M], nonzero for a wanted row (None: all)."""
    return jnp.ones((m,), jnp.int32) if rows is None else rows.astype(jnp.int32)


def qmatmul(x: jax.Array, q: jax.Array, so: jax.Array, group: int,
            vocab_major: bool = False, rows: jax.Array | None = None) -> jax.Array:
    """x float32 [M, K] . W^T with W[n, k] = so[n, k // group, 0] * q[n, k] + so[n, k // group, 1]
    (q int8 [N, K], so float32 [N, K / group, 2]) -> float32 [M, N], or [N, M] with
    `vocab_major`. `rows` (bool [M], default all): the rows wanted; the others are not computed
    and come out as zeros (the wanted rows' outputs are the same either way). Needs
    `available()`."""
    m, n = x.shape[0], q.shape[0]
    shape = (n, m) if vocab_major else (m, n)
    rows = _wanted(m, rows)
    call = jax.ffi.ffi_call("gemma_batch_qmatmul", jax.ShapeDtypeStruct(shape, jnp.float32))
    return call(x.astype(jnp.float32), q, so, rows, group=np.int64(group),
                transposed=np.int64(vocab_major))


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, key_pos: jax.Array,
                     query_pos: jax.Array, window: int | None = None,
                     cap: float | None = None) -> jax.Array:
    """One decode step's attention for float32 caches: q [B, K*G, Dh] (scaled, RoPE'd), keys
    [B, S, K, Dh], values [B, K, Dh, S], key_pos [B, S] (-1: empty), query_pos [B] ->
    [B, K*G, Dh]. A query at p sees a key at q iff 0 <= q <= p (and p - q < window); scores are
    soft-capped by `cap`; a row that sees nothing gets zeros. Needs `available()`, Dh % 8 == 0."""
    call = jax.ffi.ffi_call("gemma_batch_decode_attention",
                            jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, keys, values, key_pos.astype(jnp.int32), query_pos.astype(jnp.int32),
                window=np.int64(window or 0), cap=np.float32(cap or 0.0))


def qargmax_tiles(q: jax.Array, so: jax.Array, group: int) -> tuple[jax.Array, ...]:
    """A block-quantized head (q int8 [N, K], so float32 [N, K / group, 2], as `qmatmul`) laid
    out for `qargmax`, T = ceil(N / 16) tiles of 16 rows: (codes + 128 uint8 [T, K * 16], each 4
    columns of the 16 rows together; scale, offset and the bound's coefficient float32
    [T, K / group, 16]; the tile's largest coefficient float32 [T, K / group]). Needs
    `available()`."""
    (n, k), groups = q.shape, q.shape[1] // group
    t = -(-n // 16)
    f32 = jnp.float32
    shapes = (jax.ShapeDtypeStruct((t, k * 16), jnp.uint8),
              *[jax.ShapeDtypeStruct((t, groups, 16), f32)] * 3,
              jax.ShapeDtypeStruct((t, groups), f32))
    return tuple(jax.ffi.ffi_call("gemma_batch_qargmax_tiles", shapes)(
        q, so, group=np.int64(group)))


def qargmax(x: jax.Array, tiles: tuple[jax.Array, ...], q: jax.Array, so: jax.Array, group: int,
            offsets: bool = True, rows: jax.Array | None = None) -> jax.Array:
    """int32 [M]: per row of x float32 [M, K], the first index of the maximum of
    `qmatmul(x, q, so, group)` (the same float32 sums: the same token as `jnp.argmax` of them),
    found from integer products over `tiles` (`qargmax_tiles(q, so, group)`) and exact scores
    of the few tokens those cannot rule out. `offsets` False: every offset in `so` is zero (a
    product is skipped). `rows` (bool [M], default all): the rows wanted; the others give 0.
    Needs `available()`."""
    m = x.shape[0]
    rows = _wanted(m, rows)
    call = jax.ffi.ffi_call("gemma_batch_qargmax", jax.ShapeDtypeStruct((m,), jnp.int32))
    return call(x.astype(jnp.float32), *tiles, q, so, rows, group=np.int64(group),
                offsets=np.int64(offsets))
