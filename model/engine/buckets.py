"""Shape buckets, the per-engine compile log, and JAX's persistent compilation cache.

The engine rounds every dynamic size up to a small fixed set of buckets so that a job with
thousands of differently sized prompts compiles a handful of programs:
  * batch: number of decode slots B, and rows per prefill call P;
  * length: cache length L (prompt + max_new_tokens, rounded up);
  * pack: tokens N of a packed prefill call (several rows' prompts in one sequence, so prefill
    cost follows the real token count);
  * span: the longest segment a pack holds (a row's prompt past the largest span continues in
    chunks);
  * chunk: tokens per row of a chunked prefill call T (the part of a prompt past the largest
    span, in chunks of at most the largest, so peak activation memory is bounded).
Steps between buckets are about 1.25-1.5x (padding stays small) and a job meets a handful.
Every compile is logged (program, shapes, seconds) and counted in its engine's `CompileLog`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Hashable

from model.paths import cache_dir, switched_off

log = logging.getLogger(__name__)


def round_up(n: int, buckets: tuple[int, ...], what: str = "size") -> int:
    """Smallest bucket >= n; beyond the largest, n rounded up to a multiple of the largest."""
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    for b in buckets:
        if b >= n:
            return b
    top = buckets[-1]
    return -(-n // top) * top


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shape buckets of one engine (a config setting; hashable).

    Attributes:
      batch: allowed batch sizes (decode slots and chunked-prefill rows), ascending.
      length: allowed cache lengths (prompt + max_new_tokens, rounded up), ascending.
      chunk: allowed chunked-prefill lengths, ascending; the largest is the chunk size.
      pack: allowed packed-prefill lengths N (multiples of 32), ascending.
      span: allowed bounds on one row's tokens in a pack (multiples of 32), ascending; the
        largest is the most of a row's prompt one packed call takes.
    """

    batch: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    length: tuple[int, ...] = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                               6144, 8192, 12_288, 16_384, 32_768, 65_536, 131_072)
    chunk: tuple[int, ...] = (32, 128, 512)
    pack: tuple[int, ...] = (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768,
                             896, 1024, 1280, 1536, 1792, 2048)
    span: tuple[int, ...] = (64, 128, 256, 512, 1024)

    def __post_init__(self) -> None:
        for name in ("pack", "span"):
            if any(v % 32 for v in getattr(self, name)):
                raise ValueError(f"Buckets.{name} must be multiples of 32, got "
                                 f"{getattr(self, name)}")
        if self.span and self.pack and self.span[-1] > self.pack[-1]:
            raise ValueError(f"Buckets.span's largest ({self.span[-1]}) must fit the largest "
                             f"pack ({self.pack[-1]})")
        for name in ("batch", "length", "chunk", "pack", "span"):
            v = getattr(self, name)
            if not v or list(v) != sorted(set(v)) or v[0] < 1:
                raise ValueError(f"Buckets.{name} must be distinct positive ints in ascending "
                                 f"order, got {v}")

    @property
    def chunk_size(self) -> int:
        return self.chunk[-1]

    @property
    def max_batch(self) -> int:
        """The largest batch bucket: decode slots per generate call at most."""
        return self.batch[-1]

    def batch_bucket(self, n: int) -> int:
        return round_up(max(n, 1), self.batch, "batch size")

    def length_bucket(self, n: int) -> int:
        return round_up(max(n, 1), self.length, "sequence length")

    def out_bucket(self, n: int, length: int) -> int:
        """Room for n generated tokens: the next power of two (at least 16), at most L."""
        return min(length, max(16, 1 << (max(n, 1) - 1).bit_length()))

    def chunk_bucket(self, n: int) -> int:
        return min(round_up(max(n, 1), self.chunk, "chunk length"), self.chunk_size)

    @property
    def pack_size(self) -> int:
        """The most tokens one packed prefill call takes."""
        return self.pack[-1]

    @property
    def span_max(self) -> int:
        """The most of one row's prompt a packed call takes (the rest goes in chunks)."""
        return self.span[-1]

    def pack_bucket(self, n: int) -> int:
        return min(round_up(max(n, 1), self.pack, "pack length"), self.pack_size)

    def span_bucket(self, n: int) -> int:
        return min(round_up(max(n, 1), self.span, "span"), self.span_max)


DEFAULT_BUCKETS = Buckets()


@dataclasses.dataclass
class PrefillStats:
    """Prefill work of one engine, cumulative (`padding_ratio`: computed / real tokens).

    Attributes:
      real_tokens: prompt tokens fed to the model (prefixes counted once per compute).
      padded_tokens: token slots the prefill programs computed (real + padding).
      prompt_tokens: tokens of the prompts placed (what prefilling each row in full feeds).
      prefix_rows: rows that started from a prefilled prefix; prefix_tokens: tokens they skipped.
      prefixes_computed: prefixes prefilled (each once per engine while cached).
    """

    real_tokens: int = 0
    padded_tokens: int = 0
    prompt_tokens: int = 0
    prefix_rows: int = 0
    prefix_tokens: int = 0
    prefixes_computed: int = 0

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "padding_ratio": round(self.padding_ratio, 4)}


@dataclasses.dataclass
class DecodeStats:
    """Decode work (of a stream, or cumulative in an engine): steps, busy slot-steps, and the
    same while rows were waiting for a slot (their ratio to usable slot-steps: occupancy)."""

    decode_steps: int = 0
    busy_slot_steps: int = 0  # active slots summed over decode steps
    waiting_steps: int = 0  # decode steps that ran while rows were waiting
    waiting_busy_slot_steps: int = 0  # active slots summed over those steps
    waiting_slot_steps: int = 0  # usable slots (max_batch) summed over those steps
    resizes: int = 0

    def add(self, steps: int, busy: int, usable: int, waiting: bool) -> None:
        """One decode call: `steps` steps with `busy` active slot-steps over `usable` slots."""
        self.decode_steps += steps
        self.busy_slot_steps += busy
        if waiting:
            self.waiting_steps += steps
            self.waiting_busy_slot_steps += busy
            self.waiting_slot_steps += steps * usable

    @property
    def occupancy_while_waiting(self) -> float:
        """Busy / usable slot-steps over the decode steps that ran while rows were waiting."""
        return (self.waiting_busy_slot_steps / self.waiting_slot_steps
                if self.waiting_slot_steps else 1.0)


@dataclasses.dataclass
class CompileRecord:
    program: str
    shapes: str
    seconds: float
    key: Hashable = None  # the program's cache key: (program, shapes...)


class CompileLog:
    """One engine's compiled programs, keyed by (program, static shapes); logs each compile."""

    def __init__(self) -> None:
        self._programs: dict[Hashable, Any] = {}
        self.records: list[CompileRecord] = []
        self._lock = threading.Lock()

    def get(self, key: Hashable, program: str, shapes: str, build: Callable[[], Any]) -> Any:
        """Returns the compiled program for `key`, compiling (and logging) it on first use."""
        with self._lock:
            hit = self._programs.get(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            compiled = build()
            dt = time.perf_counter() - t0
            self._programs[key] = compiled
            self.records.append(CompileRecord(program, shapes, dt, key))
            log.info("compiled %s %s in %.2fs", program, shapes, dt)
            return compiled

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def clear(self) -> None:
        """Forgets compiled programs (the persistent cache on disk is kept)."""
        with self._lock:
            self._programs.clear()
            self.records.clear()


_cache_dir: Path | None = None


def compile_cache_dir() -> Path | None:
    """JAX's persistent cache folder in this process (`enable_compile_cache`), or None: off."""
    return _cache_dir


def default_cache_dir() -> Path:
    """`cache_dir()/jax`: $GEMMA_BATCH_CACHE/jax, else ~/.cache/gemma-batch/jax (XDG honoured)."""
    return cache_dir() / "jax"


def _atomic_cache_writes() -> None:
    """Makes JAX's file cache write each entry whole: to a temp file, then renamed in place.

    JAX writes an entry in place (`Path.write_bytes`); two processes that compile the same
    program at once (a driver and its actors, two actors) can interleave their bytes, or a
    reader can see a half-written entry, and loading a damaged executable is not checked.
    Only the unbounded cache is patched (no eviction: the default); the bounded one keeps
    JAX's own locking."""
    try:
        from jax._src import lru_cache
    except ImportError:  # a JAX without this module: leave it as it is
        return
    cls = lru_cache.LRUCache
    if getattr(cls, "_whole_writes", False) or not hasattr(cls, "put"):
        return
    put = cls.put
    suffix = getattr(lru_cache, "_CACHE_SUFFIX", "-cache")

    def whole_put(self: Any, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True) or not key:
            return put(self, key, value)
        path = Path(self.path) / f"{key}{suffix}"
        if path.exists():
            return None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(value)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return None

    cls.put, cls._whole_writes = whole_put, True


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (once per process); returns its directory.

    The directory is `path`, else $GEMMA_BATCH_JAX_CACHE, else `default_cache_dir()`; set
    GEMMA_BATCH_JAX_CACHE=off to disable it. A directory that cannot be created is logged and
    skipped: the cache only makes later runs start faster.
    """
    global _cache_dir
    import jax  # here, so that the bucket config imports without JAX

    if _cache_dir is not None:
        return _cache_dir
    env = os.environ.get("GEMMA_BATCH_JAX_CACHE", "")
    if path is None and switched_off("GEMMA_BATCH_JAX_CACHE"):
        return None
    d = Path(path or env or default_cache_dir()).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("JAX compilation cache disabled: cannot create %s (%s)", d, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _atomic_cache_writes()
    _cache_dir = d
    log.info("JAX persistent compilation cache: %s", d)
    return d
