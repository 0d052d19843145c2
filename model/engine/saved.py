"""The engine's compiled programs kept on disk by what they are made from, so that a later
process loads them without tracing or lowering them.

JAX's persistent cache (`buckets.enable_compile_cache`) keys an executable by its lowered
module: every process still traces and lowers each program before it can look it up. For the
270M on 2 cores that is 0.5-0.65 s of tracing and 0.13-0.23 s of lowering per program, against
0.3-0.4 s to load the executable: 2.2 of the README demo's 3.7 s of warm "compiling". Here a
program is keyed by its inputs instead: the model package's source (.py, .cc, .h), the versions
of JAX, jaxlib, NumPy and the backend's runtime, the devices and the CPU's flags, JAX's
settings, the GEMMA_BATCH_* (but the cache folders) and XLA_FLAGS variables, the engine's
identity (family, config, dtype), the program's static key (`CompileLog` key, donated
arguments), on a device mesh its axes, device ids and the programs' shardings, and its
arguments' tree and types. Any change to one of them is a miss, never a stale program.

Entries live in `programs/` inside JAX's cache folder (off where that cache is off, or with
GEMMA_BATCH_PROGRAM_CACHE=off), one file per program: a magic line, the payload's SHA-256, and
the payload (`jax.experimental.serialize_executable`). A damaged or unreadable entry is logged
and compiled again. Only programs this process compiled are written: on XLA:CPU (jaxlib 0.10)
an executable loaded from JAX's cache serializes incompletely, and its copy fails at its first
run ("Function ... not found"); a compile JAX's cache answered is used, not stored. So that
JAX's cache cannot answer a program whose key is new, the lowered module is named after the
key. Nothing is evicted, as in JAX's cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import threading
from pathlib import Path
from typing import Any, Callable, Hashable

import jax
import numpy as np

from model.cpu import cpu_flags
from model.engine.buckets import compile_cache_dir
from model.paths import atomic_write, switched_off

log = logging.getLogger(__name__)

MAGIC = b"gemma-batch program 1\n"
_PACKAGE = Path(__file__).resolve().parents[1]  # model/
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
# Variables that say where caches are, not what a program is.
_WHERE = frozenset({"GEMMA_BATCH_CACHE", "GEMMA_BATCH_JAX_CACHE", "GEMMA_BATCH_PROGRAM_CACHE"})
_events = threading.local()  # .seen: JAX monitoring events of this thread's compile, or None


def directory() -> Path | None:
    """Where programs are kept: `programs/` in JAX's cache folder; None where that cache is
    off (GEMMA_BATCH_JAX_CACHE=off, not enabled in this process) or GEMMA_BATCH_PROGRAM_CACHE
    is off, and in a process of a multi-process JAX job (each compiles its own)."""
    if switched_off("GEMMA_BATCH_PROGRAM_CACHE") or jax.process_count() > 1:
        return None
    d = compile_cache_dir()
    return None if d is None else d / "programs"


@functools.cache
def _static_fingerprint() -> str:
    """What cannot change within a process: the model package's source, versions, backend and
    its runtime's version, devices and CPU flags."""
    import jaxlib

    h = hashlib.sha256()
    for path in sorted(p for p in _PACKAGE.rglob("*")
                       if p.suffix in (".py", ".cc", ".h") and p.is_file()):
        h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    runtime = jax.devices()[0].client.platform_version  # e.g. the CUDA/driver versions
    h.update(repr((jax.__version__, jaxlib.__version__, np.__version__, platform.machine(),
                   jax.default_backend(), runtime, devices, sorted(cpu_flags()))).encode())
    return h.hexdigest()


def _arg_types(args: tuple) -> str:
    """The arguments' tree and each leaf's type, shape, dtype and weak type."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return repr((str(tree), [(type(x).__name__, tuple(np.shape(x)), str(getattr(x, "dtype", "")),
                              bool(getattr(x, "weak_type", False))) for x in leaves]))


def key(parts: Hashable, args: tuple) -> str:
    """The entry name of a program: `parts` (the engine's identity and the program's static key)
    with its arguments' types, in this process's code, JAX, machine and settings."""
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith("GEMMA_BATCH_") or k == "XLA_FLAGS") and k not in _WHERE)
    config = sorted((k, repr(v)) for k, v in jax.config.values.items())
    text = repr((_static_fingerprint(), env, config, parts, _arg_types(args)))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _read(path: Path) -> Any:
    """The program saved at `path` (a `jax.stages.Compiled`), or None: missing or damaged."""
    from jax.experimental import serialize_executable

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the compiled program %s (%s): compiling it again", path, e)
        return None
    try:
        start = len(MAGIC) + 32  # magic line, SHA-256 of the payload, payload
        digest, payload = data[len(MAGIC):start], data[start:]
        if not data.startswith(MAGIC) or hashlib.sha256(payload).digest() != digest:
            raise ValueError("not a whole gemma-batch program file")
        blob, in_tree, out_tree = pickle.loads(payload)
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    except Exception as e:  # noqa: BLE001 - any damage: compile again, and replace it
        log.warning("the compiled program %s is damaged (%s): compiling it again", path, e)
        return None


def _write(path: Path, compiled: Any) -> None:
    """Saves a program this process compiled; a failure only costs the next process a compile."""
    from jax.experimental import serialize_executable

    try:
        payload = pickle.dumps(serialize_executable.serialize(compiled))
        atomic_write(path, lambda tmp: tmp.write_bytes(
            MAGIC + hashlib.sha256(payload).digest() + payload))
    except Exception as e:  # noqa: BLE001 - unserializable program, full or read-only disk
        log.info("compiled program not kept on disk (%s): %s", path.name, e)


@functools.cache
def _listen() -> None:
    def on_event(event: str, **_: Any) -> None:
        seen = getattr(_events, "seen", None)
        if seen is not None:
            seen.add(event)

    jax.monitoring.register_event_listener(on_event)


def named(fn: Callable, name: str) -> Callable:
    """`fn` under the name `name`: JAX names the lowered module after the function, and keys
    its own cache by the module."""
    def program(*args: Any) -> Any:
        return fn(*args)

    program.__name__ = program.__qualname__ = name
    return program


def load_or_compile(program: str, parts: Hashable, args: tuple,
                    lower: Callable[[str], Any]) -> Any:
    """The program keyed by `parts` and `args` (see `key`): loaded from disk, else lowered
    (`lower(name)`: a `jax.stages.Lowered` of the function under that name), compiled, and
    saved when this process compiled it itself.

    The name is `program` and the key, so that JAX's cache can only answer (and this one then
    not save) what was compiled under the same key, its entry here since removed; a damaged
    entry is compiled under a new name and replaced."""
    d = directory()
    if d is None:
        return lower(program).compile()
    k = key(parts, args)
    path = d / f"{k}.program"
    found = _read(path)
    if found is not None:
        return found
    name = f"{program}_{k[:16]}" + ("_again" if path.exists() else "")
    lowered = lower(name)  # tracing may run (and cache) small eager programs: not watched
    _listen()
    _events.seen = set()
    try:
        compiled = lowered.compile()
        seen = _events.seen
    finally:
        _events.seen = None
    if _MISS in seen and _HIT not in seen:
        _write(path, compiled)
    return compiled
