"""Ray setup: connecting to (or starting) a cluster, the generator actors' resources, and the
Ray Data settings a batch job runs with (quiet context, light repartition tasks)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pipeline import storage
from pipeline.spec import JobSpec

READ_TASK_CPUS = 0.25  # reading is light; never let it compete with generator actors

_started_ray = False


def ensure_ray(debug: bool = False) -> bool:
    """Connects to Ray (RAY_ADDRESS or a new local cluster); True when this call started it."""
    import ray

    global _started_ray
    if ray.is_initialized():
        return False
    _started_ray = True
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        runtime_env={"env_vars": storage.worker_env()},
        include_dashboard=False,
        logging_level=logging.INFO if debug else logging.ERROR,
        log_to_driver=debug,
    )
    return True


def shutdown_ray() -> None:
    """Disconnects from Ray if `ensure_ray` connected (never a cluster someone else started)."""
    global _started_ray
    if _started_ray:
        import ray

        ray.shutdown()
        _started_ray = False


def actor_options(spec: JobSpec, cluster_cpus: float) -> dict[str, Any]:
    """Ray resources, pool size and fault tolerance of the generator actors."""
    r = spec.resources
    import ray.data

    opts: dict[str, Any] = {}
    if r.num_actors is not None:
        opts["compute"] = ray.data.ActorPoolStrategy(size=r.num_actors)
    else:
        opts["compute"] = ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors)
    if r.accelerator == "cpu":
        # Leave a whole CPU for Ray Data's task stages (reads), or they starve and the job hangs;
        # the request is a scheduling token: JAX uses the cores it finds either way.
        free = cluster_cpus - 1.0 if cluster_cpus >= 2 else cluster_cpus - 0.5
        opts["num_cpus"] = r.num_cpus_per_actor or max(0.1, min(1.0, free / r.pool_max))
    elif r.accelerator == "gpu":
        opts["num_cpus"] = r.num_cpus_per_actor or 1
        opts["num_gpus"] = 1
    else:
        opts["num_cpus"] = r.num_cpus_per_actor or 1
        opts["resources"] = {"TPU": r.tpu_chips}
    if r.accelerator_type:
        opts["accelerator_type"] = r.accelerator_type
    opts["max_restarts"] = r.max_restarts
    opts["max_task_retries"] = r.max_task_retries
    return opts


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def quiet_data_context(debug: bool) -> None:
    """Ray Data's progress bars on a terminal only; its logs and advice only with --debug."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = debug
    if not debug:
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # we report failures ourselves
        detectors = getattr(ctx, "issue_detectors_config", None)
        if detectors is not None and hasattr(detectors, "detectors"):
            detectors.detectors = []  # advice aimed at Ray developers, not at our users


def light_repartition(ds: Any) -> None:
    """Lets the streaming repartition fuse into the light read tasks.

    Ray Data gives the repartition step its own 1-CPU tasks; on a small machine whose CPUs the
    generator actors hold, those never get scheduled and the job hangs. With the read stage's
    fractional CPU request the two fuse into one light task. Best effort: `ray.data` exposes no
    public knob for this, so a layout it does not recognise is left alone.
    """
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if type(op).__name__ == "StreamingRepartition" and isinstance(
            getattr(op, "ray_remote_args", None), dict):
        try:
            object.__setattr__(op, "ray_remote_args", {"num_cpus": READ_TASK_CPUS})
        except (AttributeError, TypeError):
            pass
