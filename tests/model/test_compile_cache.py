"""The persistent compilation cache (model/engine/buckets.py): entries are written whole (a temp
file renamed in place), so processes that compile the same programs at once never leave an
entry another process cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
_PROBE = r"""
import sys
from model import load_model
from model.engine import enable_compile_cache
enable_compile_cache(sys.argv[1])
m = load_model("tiny-gemma3")
g = m.generate([[2, 5, 6, 7]], max_new_tokens=6, stop_token_ids=[])[0]
print(" ".join(map(str, g.tokens)))
"""


def test_processes_compiling_at_once_leave_whole_entries(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", _PROBE, str(cache)]
    racing = [subprocess.Popen(run, env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(3)]  # the same programs, compiled and written at once
    outs = [p.communicate(timeout=600)[0] for p in racing]
    assert all(p.returncode == 0 for p in racing) and len(set(outs)) == 1
    entries = [f for f in os.listdir(cache) if f.endswith("-cache")]
    assert entries and not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout == outs[0]  # every entry loads
