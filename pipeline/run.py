"""Builds and runs one batch job on Ray Data, commits its output atomically, and summarises it.

    shards --(read tasks: row groups, needed columns, ids, resume filter)-->
    Predictor actor pool (prompt + generate, one row out per row in) -->
    driver: each finished batch committed as a part file under `_parts/` (this is what --resume
    trusts) --> publish: parts coalesced into `part-NNNNN.parquet`, `_SUMMARY.json`, `_SUCCESS`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.spec import JobSpec
from pipeline import storage
from pipeline.errors import InputError, JobError
from pipeline.predictor import BATCH, CONTEXT, LATENCY, QUESTION, TEXT, GenSettings, Predictor
from pipeline.preflight import Plan, ReadUnit, preflight
from pipeline.storage import Output, get_fs

log = logging.getLogger(__name__)

# Fault injection for tests only: SIGKILL the driver right after committing this many parts.
_KILL_AFTER_PARTS_ENV = "_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS"
READ_TASK_CPUS = 0.25  # reading is light; never let it compete with generator actors


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """What a read task needs: columns, id policy and the ids already committed."""

    id_column: str | None
    id_type: pa.DataType
    text_column: str
    question_column: str | None
    context_column: str | None
    carry: dict[str, str]
    carry_schema: pa.Schema
    read_columns: tuple[str, ...]
    done_ids: pa.Array | None


def read_unit(unit: ReadUnit, rs: ReadSettings) -> pa.Table:
    """Reads one unit's row groups and shapes them for the predictor (ids, text, carried)."""
    fs, path = get_fs(unit.url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        present = [c for c in rs.read_columns if c in pf.schema_arrow.names]
        t = pf.read_row_groups(list(unit.row_groups), columns=present)
    n = t.num_rows
    if rs.id_column is None:
        ids = pa.array([f"{unit.name}:{unit.first_row + i}" for i in range(n)], pa.string())
    else:
        ids = t.column(rs.id_column).cast(rs.id_type)
    cols: dict[str, Any] = {"id": ids, TEXT: _as_text(t, rs.text_column, n)}
    if rs.question_column:
        cols[QUESTION] = _as_text(t, rs.question_column, n)
    if rs.context_column:
        cols[CONTEXT] = _as_text(t, rs.context_column, n)
    for field in rs.carry_schema:
        src = next(k for k, v in rs.carry.items() if v == field.name)
        if src in t.column_names:
            cols[field.name] = t.column(src).cast(field.type)
        else:
            cols[field.name] = pa.nulls(n, field.type)
    out = pa.table(cols)
    if rs.done_ids is not None and len(rs.done_ids):
        out = out.filter(pc.invert(pc.is_in(out.column("id"), value_set=rs.done_ids)))
    return out


def _as_text(t: pa.Table, col: str, n: int) -> pa.ChunkedArray | pa.Array:
    if col not in t.column_names:
        return pa.nulls(n, pa.string())
    return t.column(col).cast(pa.string())


def _read_batch(batch: pa.Table, rs: ReadSettings) -> pa.Table:
    """Ray Data task: a batch of serialized units -> their rows."""
    units = [ReadUnit(**_unit_from_json(u)) for u in batch.column("unit").to_pylist()]
    tables = [read_unit(u, rs) for u in units]
    return pa.concat_tables(tables) if tables else pa.table({})


def _unit_to_json(u: ReadUnit) -> str:
    return json.dumps(dataclasses.asdict(u))


def _unit_from_json(s: str) -> dict[str, Any]:
    d = json.loads(s)
    d["row_groups"] = tuple(d["row_groups"])
    return d


def gen_settings(spec: JobSpec, plan: Plan) -> GenSettings:
    s = spec.sampling
    return GenSettings(
        model=spec.model, dtype=spec.dtype, prompt_format=spec.prompt_format, task=spec.task,
        instruction=spec.instruction, summary_words=spec.summary_words,
        max_prompt_tokens=spec.max_prompt_tokens, long_document=spec.long_document,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        seed=s.seed, stop=tuple(s.stop) if s.stop else None, schema=plan.output_schema())


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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(e: BaseException) -> str:
    """The user-facing cause inside Ray's wrappers: 'ErrorType: first line of its message'."""
    seen: set[int] = set()
    queue: list[BaseException] = [e]
    found: BaseException | None = None
    while queue:
        x = queue.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        is_ray = type(x).__module__.startswith("ray") or type(x).__name__.startswith("Ray")
        if not is_ray and not isinstance(x, JobError) and str(x).strip():
            found = x  # keep the deepest non-Ray error with a message
        nexts = [getattr(x, "cause", None), x.__cause__, x.__context__,
                 *(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))]
        queue.extend(n for n in nexts if isinstance(n, BaseException))
    if found is not None:
        first = _ANSI.sub("", str(found)).strip().splitlines()[0]
        return f"{type(found).__name__}: {first}"[:400]
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]


class Progress:
    """Counts rows and tokens; prints a plain line every `interval` s when enabled."""

    def __init__(self, total: int, enabled: bool, interval: float = 5.0,
                 stream: Any = None, label: str = "gemma-batch"):
        self.total, self.enabled, self.interval = total, enabled, interval
        self.stream = stream or sys.stderr
        self.label = label
        self.rows = self.tokens = self.errors = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, rows: int, tokens: int, errors: int) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            self.errors += errors

    def line(self) -> str:
        with self._lock:
            el = time.perf_counter() - self.t0
            pct = 100.0 * self.rows / self.total if self.total else 100.0
            tps = self.tokens / el if el > 0 else 0.0
            return (f"{self.label}: {self.rows}/{self.total} rows ({pct:.0f}%) | "
                    f"{tps:.1f} tokens/s | {self.errors} errors | {el:.0f}s")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
    return v[k]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("gemma-batch", "ray", "jax", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _shareable(url: str) -> bool:
    """False for filesystems that live in one process (memory://): read those in the driver."""
    return not url.startswith("memory://")


def _light_repartition(ds: Any) -> None:
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


def _batches(spec: JobSpec, plan: Plan, units: list[ReadUnit], rs: ReadSettings,
             gs: GenSettings, debug: bool) -> Iterator[pa.Table]:
    """Runs the Ray Data pipeline and yields finished output batches."""
    import ray
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
    if all(_shareable(u.url) for u in units):
        ds = ray.data.from_items([{"unit": _unit_to_json(u)} for u in units],
                                 override_num_blocks=len(units))
        ds = ds.map_batches(_read_batch, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"rs": rs}, num_cpus=READ_TASK_CPUS)
    else:
        tables = [read_unit(u, rs) for u in units]
        ds = ray.data.from_arrow([t for t in tables if t.num_rows] or tables[:1])
    # One block per generate batch: an actor task is then one batch, so the driver commits (and
    # --resume keeps) work batch by batch, and a lost actor costs only its in-flight batches.
    ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
    _light_repartition(ds)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter yet; we want them explicit
        # (Ray Data's default retries forever, which loops on a batch that kills every actor).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"settings": gs},
                            batch_size=spec.batch_size, batch_format="pyarrow",
                            **actor_options(spec, cpus))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def run_job(spec: JobSpec, *, progress: bool | None = None, debug: bool = False,
            on_plan: Callable[[Plan], None] | None = None,
            on_commit: Callable[[pa.Table], None] | None = None) -> dict[str, Any]:
    """Runs a job end to end and returns its summary (also written as `_SUMMARY.json`).

    `on_plan` sees the preflight plan; `on_commit` sees each batch right after it is committed.

    Raises InputError (nothing written) for refused inputs and JobError when the job fails.
    """
    t_start = time.perf_counter()
    plan, out, mode = preflight(spec)
    if on_plan is not None:
        on_plan(plan)
    if mode == "finished":
        summary = out.read_json(Output.SUMMARY) if out.exists(Output.SUMMARY) else {}
        summary["note"] = "output already finished; nothing to resume"
        return summary
    if mode == "overwrite":
        out.clear_ours()
    attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_rel = f"{Output.PARTS}/{Output.RUN}"
    run_record = {"spec": json.loads(spec.model_dump_json()), "started": attempt}
    rs = ReadSettings(
        spec.id_column, plan.id_type, spec.text_column, spec.question_column,
        spec.context_column, plan.carry, plan.carry_schema, tuple(plan.read_columns),
        pa.array(sorted(plan.done_ids, key=str), plan.id_type) if plan.done_ids else None)
    gs = gen_settings(spec, plan)
    todo = plan.total_rows - len(plan.done_ids)
    prog = Progress(todo, enabled=(progress if progress is not None else not sys.stderr.isatty()))
    latencies: list[float] = []
    kill_after = int(os.environ.get(_KILL_AFTER_PARTS_ENV, "0") or 0)
    seq = 0
    t_gen = time.perf_counter()
    if todo > 0 and plan.units:
        ensure_ray(debug)
        prog.start()
        try:
            for batch in _batches(spec, plan, plan.units, rs, gs, debug):
                if batch.num_rows == 0:
                    continue
                lat = batch.column(LATENCY).to_pylist()
                bids = batch.column(BATCH).to_pylist()
                per_batch = {b: v for b, v in zip(bids, lat)}
                latencies.extend(per_batch.values())
                table = batch.drop_columns([LATENCY, BATCH])
                if seq == 0 and not plan.resumed:
                    out.write_json(run_rel, run_record)  # first write of a new run
                out.write_table(f"{Output.PARTS}/{attempt}-{seq:06d}.parquet", table)
                seq += 1
                errs = pc.sum(pc.equal(table.column("finish_reason"), "error")).as_py() or 0
                toks = pc.sum(table.column("output_tokens")).as_py() or 0
                prog.add(table.num_rows, toks, errs)
                if on_commit is not None:
                    on_commit(table)
                if kill_after and seq >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        except (InputError, JobError):
            raise
        except KeyboardInterrupt:
            raise JobError(
                f"interrupted; {prog.rows} rows are committed under {spec.output}/_parts; "
                "rerun with --resume to finish") from None
        except Exception as e:  # noqa: BLE001 - Ray wraps the real failure
            if debug:
                log.exception("pipeline failed")
            kept = (f"{prog.rows + len(plan.done_ids)} rows committed; fix the cause and rerun "
                    "with --resume") if prog.rows or plan.resumed else "nothing was written"
            raise JobError(f"generation failed: {_root_cause(e)} ({kept})") from e
        finally:
            prog.stop()
    gen_wall = time.perf_counter() - t_gen
    summary = publish(spec, plan, out, attempt_stats={
        "rows_generated": prog.rows, "output_tokens": prog.tokens, "wall_s": gen_wall,
        "latencies": latencies, "mode": mode})
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    out.write_json(Output.SUMMARY, summary)
    out.write_bytes(Output.SUCCESS, b"")
    out.remove([Output.PARTS, Output.STAGING])
    return summary


def publish(spec: JobSpec, plan: Plan, out: Output, attempt_stats: dict[str, Any]) -> dict:
    """Coalesces committed parts into output shards (deduplicated by id) and moves them in place.

    Returns the summary; the caller writes `_SUMMARY.json` then `_SUCCESS`.
    """
    stale = [n for n in out.ls() if n.startswith("part-") and n.endswith(".parquet")]
    out.remove(stale + [Output.STAGING])
    schema = plan.output_schema()
    seen: set = set()
    pending: list[pa.Table] = []
    pending_rows = 0
    shard_names: list[str] = []
    errors: dict[str, int] = {}
    finish: dict[str, int] = {}
    prompt_tokens = output_tokens = 0

    def flush(force: bool = False) -> None:
        nonlocal pending, pending_rows
        if not pending and not (force and not shard_names):
            return
        table = pa.concat_tables(pending) if pending else schema.empty_table()
        name = f"part-{len(shard_names):05d}.parquet"
        out.write_table(f"{Output.STAGING}/{name}", table)
        shard_names.append(name)
        pending, pending_rows = [], 0

    for name in out.ls(Output.PARTS):
        if not name.endswith(".parquet"):
            continue
        try:
            t = out.read_table(f"{Output.PARTS}/{name}")
        except (pa.ArrowException, OSError):
            continue  # a leftover that was never committed
        ids = t.column("id").to_pylist()
        keep = [i for i, v in enumerate(ids) if v not in seen]
        if len(keep) != len(ids):
            t = t.take(pa.array(keep, pa.int64()))
        seen.update(ids)
        if t.num_rows == 0:
            continue
        t = t.select(schema.names).cast(schema)
        for k, c in zip(*_value_counts(t.column("error_kind"))):
            if k is not None:
                errors[k] = errors.get(k, 0) + c
        for k, c in zip(*_value_counts(t.column("finish_reason"))):
            finish[k] = finish.get(k, 0) + c
        prompt_tokens += pc.sum(t.column("prompt_tokens")).as_py() or 0
        output_tokens += pc.sum(t.column("output_tokens")).as_py() or 0
        pending.append(t)
        pending_rows += t.num_rows
        if pending_rows >= spec.rows_per_output_shard:
            flush()
    flush(force=True)
    if len(seen) != plan.total_rows:
        raise JobError(
            f"output has {len(seen)} rows for {plan.total_rows} input rows; nothing was "
            "published; rerun with --resume to finish the missing rows")
    for name in shard_names:
        out.move(f"{Output.STAGING}/{name}", name)
    lat = attempt_stats["latencies"]
    wall = attempt_stats["wall_s"]
    gen_tokens = attempt_stats["output_tokens"]
    return {
        "rows_in": plan.total_rows,
        "rows_out": len(seen),
        "rows_generated_this_run": attempt_stats["rows_generated"],
        "rows_resumed": len(plan.done_ids),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "finish_reasons": finish,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "generation_wall_s": round(wall, 3),
        "tokens_per_s": round(gen_tokens / wall, 3) if wall > 0 and gen_tokens else 0.0,
        # Per actor, generate calls only (no startup, model load or queueing).
        "generate_tokens_per_s": round(gen_tokens / sum(lat), 3) if lat and sum(lat) > 0 else 0.0,
        "batches": len(lat),
        "batch_latency_p50_s": _round(_percentile(lat, 0.5)),
        "batch_latency_p95_s": _round(_percentile(lat, 0.95)),
        "model": spec.model,
        "output_files": shard_names,
        "mode": attempt_stats["mode"],
        "spec": json.loads(spec.model_dump_json()),
        "versions": _versions(),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _value_counts(col: pa.ChunkedArray) -> tuple[list, list]:
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
