"""Compiled programs kept on disk (model/engine/saved.py): a later process loads them without
tracing and computes the same tokens, on one device and on a device mesh; anything a program is
made from changes its key; a damaged entry is compiled again and replaced; a compile JAX's own
cache answered is not saved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from model.engine import saved

ROOT = Path(__file__).parents[2]
_PROBE = r"""
import json, sys
from model.engine import enable_compile_cache, saved
enable_compile_cache(sys.argv[1])
loaded, lowered = [], []
read, named = saved._read, saved.named

def counted_read(path):
    found = read(path)
    if found is not None:
        loaded.append(path.name)
    return found

def counted_named(fn, name):
    lowered.append(name)
    return named(fn, name)

saved._read, saved.named = counted_read, counted_named
from model import load_model
mesh = tuple(map(int, sys.argv[4].split("x"))) if len(sys.argv) > 4 else None
m = load_model(sys.argv[2], mesh_shape=mesh)
assert (m.engine.mesh is None) == (mesh is None)
prompts = [[2, 5, 6, 7], [2, 9, 10, 11, 12, 13, 14, 15, 16]]
out = m.generate(prompts, max_new_tokens=int(sys.argv[3]), stop_token_ids=[])
print(json.dumps({"tokens": [list(map(int, g.tokens)) for g in out], "loaded": len(loaded),
                  "lowered": len(lowered), "programs": m.engine.compile_log.count}))
"""


def _run(cache: Path, model: str = "tiny-gemma3", new: int = 8, mesh: str | None = None,
         **env: str) -> tuple[dict, str]:
    if mesh is not None:  # CPU devices for the mesh (the suite's own flags stay)
        env.setdefault("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} "
                                    "--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", _PROBE, str(cache), model, str(new),
                        *([mesh] if mesh else [])],
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _entries(cache: Path) -> list[Path]:
    d = cache / "programs"
    return sorted(d.glob("*.program")) if d.exists() else []


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-recurrentgemma"])
def test_a_later_process_loads_the_programs_and_computes_the_same(tmp_path, model):
    cache = tmp_path / "jax"
    first, _ = _run(cache, model)
    assert first["programs"] >= 2 and first["lowered"] == first["programs"]
    assert first["loaded"] == 0 and len(_entries(cache)) == first["programs"]
    again, _ = _run(cache, model)
    assert again["lowered"] == 0 and again["loaded"] == first["programs"]
    assert again["tokens"] == first["tokens"]
    off, _ = _run(cache, model, GEMMA_BATCH_PROGRAM_CACHE="off")
    assert off["loaded"] == 0 and off["lowered"] == off["programs"]
    assert off["tokens"] == first["tokens"]


def test_programs_on_a_device_mesh_load_by_mesh_and_compute_the_same(tmp_path):
    """Sharded programs are kept too, keyed by the mesh's shape and devices and the shardings:
    a later process on the same mesh loads every one; another mesh shape compiles its own."""
    cache = tmp_path / "jax"
    first, _ = _run(cache, mesh="2x2")
    assert first["programs"] >= 2 and first["lowered"] == first["programs"]
    assert first["loaded"] == 0 and len(_entries(cache)) == first["programs"]
    again, _ = _run(cache, mesh="2x2")
    assert again["lowered"] == 0 and again["loaded"] == first["programs"]
    assert again["tokens"] == first["tokens"]
    other, _ = _run(cache, mesh="1x4")
    assert other["loaded"] == 0 and other["lowered"] == other["programs"]
    assert other["tokens"] == first["tokens"]
    assert len(_entries(cache)) == first["programs"] + other["programs"]


def test_the_embedded_models_quantized_decode_loads_and_matches(tmp_path):
    """The 270M's decode calls the native kernels (FFI targets) from the loaded program."""
    cache = tmp_path / "jax"
    first, _ = _run(cache, "gemma3-270m", new=6)
    again, _ = _run(cache, "gemma3-270m", new=6)
    assert first["loaded"] == 0 and first["lowered"] == first["programs"] >= 2
    assert again["lowered"] == 0 and again["loaded"] == first["programs"]
    assert again["tokens"] == first["tokens"] and len(first["tokens"][0]) == 6


def test_a_damaged_program_is_compiled_again_and_replaced(tmp_path):
    cache = tmp_path / "jax"
    first, _ = _run(cache)
    damaged = _entries(cache)[0]
    whole = damaged.read_bytes()
    damaged.unlink()  # a new file: never rewrite one a process may have mapped
    damaged.write_bytes(whole[:len(whole) // 2])
    again, err = _run(cache)
    assert "is damaged" in err and damaged.name in err
    assert again["lowered"] == 1 and again["loaded"] == first["programs"] - 1
    assert again["tokens"] == first["tokens"]
    assert damaged.read_bytes() != whole[:len(whole) // 2]  # replaced by a whole entry
    third, err = _run(cache)
    assert third["lowered"] == 0 and "damaged" not in err and third["tokens"] == first["tokens"]


def test_a_compile_answered_by_jax_cache_is_not_saved(tmp_path):
    """On XLA:CPU an executable loaded from JAX's cache serializes incompletely: only programs
    the process compiled itself are saved."""
    cache = tmp_path / "jax"
    first, _ = _run(cache)
    shutil.rmtree(cache / "programs")
    again, _ = _run(cache)  # same keys: JAX's cache holds the same-named modules
    assert again["lowered"] == again["programs"] and _entries(cache) == []
    assert again["tokens"] == first["tokens"]


def test_the_key_follows_what_a_program_is_made_of(tmp_path, monkeypatch):
    args = ({"w": jnp.zeros((4, 8), jnp.float32)}, np.int32(3))
    base = saved.key(("gemma3", "cfg", ("decode", 8)), args)
    assert saved.key(("gemma3", "cfg", ("decode", 8)), args) == base
    assert saved.key(("gemma3", "cfg", ("decode", 16)), args) != base
    assert saved.key(("gemma3", "cfg", ("decode", 8)),
                     ({"w": jnp.zeros((4, 8), jnp.bfloat16)}, np.int32(3))) != base
    assert saved.key(("gemma3", "cfg", ("decode", 8)),
                     ({"w": jnp.zeros((4, 9), jnp.float32)}, np.int32(3))) != base
    assert saved.key(("gemma3", "cfg", ("decode", 8)),
                     ({"v": jnp.zeros((4, 8), jnp.float32)}, np.int32(3))) != base
    monkeypatch.setenv("GEMMA_BATCH_QUANT_DECODE", "off")
    assert saved.key(("gemma3", "cfg", ("decode", 8)), args) != base
    monkeypatch.delenv("GEMMA_BATCH_QUANT_DECODE")
    monkeypatch.setenv("GEMMA_BATCH_JAX_CACHE", str(tmp_path))  # where, not what
    assert saved.key(("gemma3", "cfg", ("decode", 8)), args) == base
    # The model package's source: one changed byte in any file is another fingerprint.
    pkg = tmp_path / "model"
    shutil.copytree(saved._PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(saved, "_PACKAGE", pkg)
    before = saved._static_fingerprint.__wrapped__()
    kernel = pkg / "kernels" / "qmatmul.cc"
    kernel.write_bytes(kernel.read_bytes() + b" ")
    assert saved._static_fingerprint.__wrapped__() != before
