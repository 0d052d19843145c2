"""A local cluster that `ensure_ray` starts: its workers' priority, and the caller's env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.ray_env import NICENESS_ENV

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, os, ray
from pipeline.ray_env import NICENESS_ENV, ensure_ray, shutdown_ray
assert ensure_ray()
nice = ray.get(ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
left = os.environ.get(NICENESS_ENV)
shutdown_ray()
print(json.dumps({"nice": nice, "env_after": left}))
"""


def _probe(extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", NICENESS_ENV)}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **extra_env})
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_cluster_workers_run_at_default_priority_and_env_is_restored():
    # Ray's own default is nice 15: the generator actor's threads would yield to every
    # Ray daemon wakeup.
    r = _probe({})
    assert r == {"nice": 0, "env_after": None}


def test_user_niceness_setting_wins():
    r = _probe({NICENESS_ENV: "7"})
    assert r == {"nice": 7, "env_after": "7"}
