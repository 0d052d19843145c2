"""A local cluster that `ensure_ray` starts: its workers' priority, the caller's env in its
workers without a job runtime env; a cluster it connects to gets the variables through one."""

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
seen = ray.get(ray.remote(num_cpus=0)(
    lambda: [os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3",
                                         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")]).remote())
job_env = ray.get_runtime_context().runtime_env.get("env_vars")
left = os.environ.get(NICENESS_ENV)
from pipeline.ray_env import local_monitor
monitor = local_monitor()
cmd = " ".join(monitor.args) if monitor is not None else None
node = ray._private.worker._global_node
daemons = [i.process for infos in node.all_processes.values() for i in infos]
shutdown_ray()
print(json.dumps({"nice": nice, "env_after": left, "worker_env": seen, "job_env": job_env,
                  "monitor": cmd, "monitor_rc": monitor.poll() if monitor else None,
                  "daemons_left": sum(p.poll() is None for p in daemons),
                  "initialized": ray.is_initialized()}))
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
    r = _probe({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    assert (r["nice"], r["env_after"]) == (0, None)
    # The workers inherit the caller's environment (storage defaults included), and the job
    # has no runtime env: the workers Ray prestarts serve it.
    assert r["worker_env"] == ["http://127.0.0.1:9", "false"]
    assert r["job_env"] is None
    # Shutdown stops the autoscaler monitor first (found through Ray's node: this fails if Ray
    # changes how it keeps it), then every process the cluster started.
    assert r["monitor"] is not None and "monitor.py" in r["monitor"]
    assert r["monitor_rc"] == -9 and r["daemons_left"] == 0 and not r["initialized"]


def test_user_niceness_setting_wins():
    r = _probe({NICENESS_ENV: "7"})
    assert (r["nice"], r["env_after"]) == (7, "7")


def test_a_cluster_it_connects_to_gets_the_variables_in_the_job_env(ray_cluster):
    from pipeline.ray_env import _starts_a_cluster

    assert _starts_a_cluster(ray_cluster) is False
    r = _probe({"RAY_ADDRESS": ray_cluster, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    assert r["job_env"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"
    assert r["worker_env"] == ["http://127.0.0.1:9", "false"]
    assert r["monitor"] is None  # a cluster it only connected to: nothing of it is stopped
