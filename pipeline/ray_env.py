"""Ray setup: connecting to (or starting) a cluster, the generator actors' resources, and the
Ray Data settings a batch job runs with (quiet context, light repartition tasks)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

from pipeline import storage
from pipeline.errors import InputError
from pipeline.spec import JobSpec

READ_TASK_CPUS = 0.25  # reading is light; never let it compete with generator actors

NICENESS_ENV = "RAY_worker_niceness"  # Ray's setting: the nice value its workers run at

_started_ray = False
_started_local = False  # `ensure_ray` started the cluster here (not only connected to one)


def _starts_a_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` will start a new local cluster rather than connect (Ray's own
    resolution: RAY_ADDRESS, then a `ray start` cluster on this machine). Unsure: False."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception as e:  # noqa: BLE001 - a Ray without it, or an address it cannot resolve
        logging.getLogger(__name__).debug("cannot tell whether Ray starts here: %s", e)
        return False


def ensure_ray(debug: bool = False) -> bool:
    """Connects to Ray (RAY_ADDRESS, a `ray start` cluster on this machine, else a new local
    cluster); True when this call initialised Ray (`shutdown_ray` then disconnects)."""
    import ray

    global _started_ray, _started_local
    if ray.is_initialized():
        return False
    _started_ray = True
    address = os.environ.get("RAY_ADDRESS") or None
    local = _started_local = _starts_a_cluster(address)
    # A cluster started here runs its workers at the default priority. Ray's default (nice 15)
    # lets every nice-0 process (raylet, GCS, this driver, Ray Data's bookkeeping actors)
    # preempt the generator actor's compute threads at each wakeup; on a small machine that
    # cost the mixed-lengths benchmark 7% (98.9 s -> 91.5 s, bench/pipeline.py --mixed).
    # A user's own RAY_worker_niceness wins; a cluster we only connect to keeps its setting.
    saved = os.environ.get(NICENESS_ENV)
    if local and saved is None:
        os.environ[NICENESS_ENV] = "0"
    # A cluster started here inherits this process's environment (storage.worker_env() is part
    # of it): no job runtime_env, so the workers Ray prestarts for this driver can serve its
    # actors and tasks (a job-level env would leave them idle and start new ones: seconds on a
    # small machine). A cluster we connect to gets the variables through the job's env.
    try:
        ray.init(
            address=address,
            runtime_env=None if local else {"env_vars": storage.worker_env()},
            include_dashboard=False,
            logging_level=logging.INFO if debug else logging.ERROR,
            log_to_driver=debug,
        )
    finally:
        if saved is None:  # read by the raylet at its start: this process's env is left as found
            os.environ.pop(NICENESS_ENV, None)
    return True


def shutdown_ray() -> None:
    """Disconnects from Ray if `ensure_ray` connected, and stops the cluster if it started one
    (never a cluster someone else started)."""
    global _started_ray, _started_local
    if _started_ray:
        import ray

        if _started_local:
            monitor = local_monitor()
            if monitor is not None:
                monitor.kill()
                monitor.wait()
        ray.shutdown()
        _started_ray = _started_local = False


def local_monitor() -> Any:
    """The autoscaler monitor process (`subprocess.Popen`) of the cluster this process started,
    or None. `ray.shutdown` stops it after the GCS, so its SIGTERM handler waits on the GCS and
    Ray kills it a second later: 1.0 of a 1.35 s shutdown, at the end of every local job.
    Killed first, the rest stops in 0.2 s. Ray's node internals: None where they differ."""
    try:
        import ray
        from ray._private import ray_constants

        node = ray._private.worker._global_node
        infos = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        live = [i.process for i in infos if i.process.poll() is None]
        return live[0] if len(live) == 1 else None
    except Exception:  # noqa: BLE001 - another Ray: its own shutdown order
        return None


def actor_options(spec: JobSpec, cluster_cpus: float, in_flight: int = 1) -> dict[str, Any]:
    """Ray resources, pool size, batches in flight per actor and fault tolerance of the
    generator actors."""
    r = spec.resources
    import ray.data

    opts: dict[str, Any] = {}
    calls = dict(max_tasks_in_flight_per_actor=in_flight,
                 max_concurrent_calls_per_actor=in_flight) if in_flight > 1 else {}
    if r.num_actors is not None:
        opts["compute"] = ray.data.ActorPoolStrategy(size=r.num_actors, **calls)
    else:
        opts["compute"] = ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors,
                                                     **calls)
    if r.accelerator == "cpu":
        # Leave a whole CPU for Ray Data's task stages (reads), or they starve and the job hangs;
        # the request is a scheduling token: JAX uses the cores it finds either way.
        free = cluster_cpus - 1.0 if cluster_cpus >= 2 else cluster_cpus - 0.5
        opts["num_cpus"] = r.num_cpus_per_actor or max(0.1, min(1.0, free / r.pool_max))
    elif r.accelerator == "gpu":
        opts["num_cpus"] = r.num_cpus_per_actor or 1
        opts["num_gpus"] = r.gpus_per_actor
    else:
        opts["num_cpus"] = r.num_cpus_per_actor or 1
        tpu = tpu_layout(spec)
        opts["resources"] = {"TPU": tpu.chips_per_actor}
        if tpu.whole_slice:
            opts["resources"][f"TPU-{tpu.pod_type}-head"] = 1  # one actor per slice
    if r.extra_resources:
        opts["resources"] = {**opts.get("resources", {}), **r.extra_resources}
    if r.accelerator_type:
        opts["accelerator_type"] = r.accelerator_type
    opts["max_restarts"] = r.max_restarts
    opts["max_task_retries"] = r.max_task_retries
    return opts


@dataclasses.dataclass(frozen=True)
class TpuLayout:
    """How TPU actors sit on a slice's hosts."""

    chips_per_actor: int
    chips_per_host: int | None  # None: no topology given
    hosts: int | None
    pod_type: str | None  # e.g. "v6e-8", as Ray's TPU-<pod type>-head resource names it

    @property
    def whole_slice(self) -> bool:
        """One actor holds every chip of a single-host slice."""
        return self.hosts == 1 and self.chips_per_actor == self.chips_per_host


def tpu_layout(spec: JobSpec) -> TpuLayout:
    """Chips per TPU actor: `tpu_chips`, else every chip of a host of `tpu_topology` (sized by
    Ray's own TPU support), else Ray's default host of 4 chips."""
    r = spec.resources
    if not r.tpu_topology:
        return TpuLayout(r.tpu_chips or 4, None, None, None)
    from ray.util import tpu

    try:
        hosts, per_host = tpu.get_tpu_worker_resources(r.tpu_topology, r.accelerator_type)
        pod = tpu.infer_tpu_pod_type_from_topology(r.tpu_topology, r.accelerator_type)
    except ValueError as e:
        raise InputError(f"resources: tpu_topology {r.tpu_topology!r} with accelerator_type "
                         f"{r.accelerator_type!r}: {e}") from None
    host = int(per_host["TPU"])
    chips = r.tpu_chips or host
    if chips > host:
        raise InputError(f"resources: tpu_chips={chips} but a host of a {pod} slice has {host} "
                         f"chips; use tpu_chips <= {host} (one actor cannot span hosts)")
    return TpuLayout(chips, host, hosts, pod)


# Memory of one device by Ray accelerator type (GiB; nominal HBM per chip / per GPU).
DEVICE_MEMORY_GIB = {
    "TPU-V4": 32, "TPU-V5LITEPOD": 16, "TPU-V5P": 95, "TPU-V6E": 32,
    "T4": 16, "V100": 16, "L4": 24, "A10G": 24, "A100": 40, "A100-40G": 40, "A100-80G": 80,
    "H100": 80, "H200": 141,
}


def device_memory_bytes(spec: JobSpec) -> int | None:
    """Memory of one of an actor's devices, from its accelerator type (None: unknown)."""
    gib = DEVICE_MEMORY_GIB.get((spec.resources.accelerator_type or "").upper())
    return gib * 2**30 if gib else None


def devices_per_actor(spec: JobSpec) -> int | None:
    """Accelerator devices each actor holds (None on CPU: the devices its process sees)."""
    r = spec.resources
    if r.accelerator == "gpu":
        return r.gpus_per_actor
    if r.accelerator == "tpu":
        return tpu_layout(spec).chips_per_actor
    return None


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def quiet_data_context(debug: bool, ray_bars: bool = True) -> None:
    """Ray Data's progress bars on a terminal only, and not when ours is shown (`ray_bars=False`);
    its logs and advice only with --debug."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ray_bars and sys.stderr.isatty()
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
