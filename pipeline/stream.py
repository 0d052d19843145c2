"""The streaming part of a run: the Ray Data pipeline (read tasks -> one block per batch ->
generator actors, which write each finished batch as a part themselves) and the driver's loop
over the actors' small per-batch records (progress, latencies, placements, phases). No output
row passes through the driver, except for a memory:// output, which lives in its process."""

from __future__ import annotations

import json
import logging
import os
import signal
import warnings
from typing import Callable, Iterator

import pyarrow as pa

from pipeline import parts, ray_env
from pipeline.errors import InputError, JobError, root_cause
from pipeline.output import OutputDir
from pipeline.phases import PhaseBoard, phase_text
from pipeline.plan import Plan
from pipeline.predictor import ClosedPredictor, GenSettings, StreamingPredictor
from pipeline.progress import Progress
from pipeline.publish import AttemptStats
from pipeline.read import ReadSettings, read_batch, read_unit, unit_to_json
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)

# Fault injection for tests only: SIGKILL the driver right after committing this many parts.
_KILL_AFTER_PARTS_ENV = "_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS"


def generate_and_commit(spec: JobSpec, plan: Plan, out: OutputDir, attempt: str, prog: Progress,
                         stats: AttemptStats, debug: bool,
                         on_commit: Callable[[pa.Table], None] | None,
                         lease: str | None = None) -> None:
    """Streams the pipeline's batches and commits each as a part; notes their latencies and the
    actors' placements in `stats`. Workers write only while the run's `lease` token is live."""
    kill_after = int(os.environ.get(_KILL_AFTER_PARTS_ENV, "0") or 0)
    seq = 0
    board = _start_ray(prog, debug)
    r = spec.resources
    prog.set_phase(phase_text("actors", n=r.num_actors or r.min_actors))
    try:
        own_bar = prog.mode == "bar"
        for records in _batches(spec, plan, out, debug, board.name, own_bar, lease):
            if records.num_rows == 0:
                continue
            failed = [e for e in records.column("error").to_pylist()
                      if e] if "error" in records.column_names else []
            if failed:
                raise _storage_failed(failed[0])
            if seq == 0:
                board.flush()  # every phase before the first row is shown before it
            try:
                if seq == 0 and not plan.resumed:
                    out.write_run_record(json.loads(spec.model_dump_json()), attempt)
                if parts.RECORD_COLUMN in records.column_names:  # memory://: rows came back
                    records = _commit_here(out, records)
            except Exception as e:  # noqa: BLE001 - every filesystem raises its own types
                raise _storage_failed(f"storage error writing {spec.output}: {root_cause(e)}"
                                      ) from e
            for r in records.select(["rows", "output_tokens", "errors", "latency_s",
                                     "placement"]).to_pylist():
                stats.latencies.append(r["latency_s"])
                stats.placements.add(r["placement"])
                prog.add(r["rows"], r["output_tokens"], r["errors"])
            seq += 1
            if on_commit is not None:
                on_commit(records)
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
        try:
            written = prog.rows or plan.resumed or any(
                n.endswith(".parquet") for n in out.ls(OutputDir.PARTS))
        except Exception:  # noqa: BLE001 - the storage itself may be what failed
            written = True
        kept = ("the rows done are committed; fix the cause and rerun with --resume"
                if written else "nothing was written")
        raise JobError(f"generation failed: {root_cause(e)} ({kept})") from e
    finally:
        board.close()
        prog.stop()


def _storage_failed(cause: str) -> JobError:
    """The job's one line when writing its output failed (a batch's part or the driver's own)."""
    return JobError(f"{cause}; the rows done are committed: fix the storage and rerun with "
                    "--resume")


def _start_ray(prog: Progress, debug: bool) -> PhaseBoard:
    """Starts the progress display, then Ray (its phase shown), then the actors' phase board."""
    prog.start()
    try:
        import ray

        if not ray.is_initialized():
            prog.set_phase(phase_text("ray_connect" if os.environ.get("RAY_ADDRESS")
                                      else "ray_start"))
        ray_env.ensure_ray(debug)
        return PhaseBoard(prog.set_phase)
    except BaseException:
        prog.stop()
        raise


def _commit_here(out: OutputDir, rows: pa.Table) -> pa.Table:
    """Commits rows an actor sent back (one part per batch) and returns their records."""
    recs = []
    col = rows.column(parts.RECORD_COLUMN).to_pylist()
    table = rows.drop_columns([parts.RECORD_COLUMN])
    start = 0
    while start < len(col):
        end = start
        while end < len(col) and col[end] == col[start]:
            end += 1
        meta = json.loads(col[start])
        rec = meta["record"]
        out.commit_part(rec["batch"] + ".parquet", table.slice(start, end - start), [rec])
        recs.append({"part": rec["batch"] + ".parquet", **{k: rec[k] for k in (
            "rows", "prompt_tokens", "output_tokens", "errors", "latency_s")},
            "placement": meta["placement"], "batch": json.dumps(rec), "error": None})
        start = end
    return pa.Table.from_pylist(recs, schema=parts.RECORD_SCHEMA)


def _batches(spec: JobSpec, plan: Plan, out: OutputDir, debug: bool,
             phase_board: str | None = None, own_bar: bool = False,
             lease: str | None = None) -> Iterator[pa.Table]:
    """Builds the Ray Data pipeline (read -> one block per batch -> actors, which write their
    parts) and yields the actors' per-batch records (`parts.RECORD_SCHEMA`)."""
    import ray.data

    # Ray Data's own bars only for --debug on a terminal, and never beside ours.
    ray_env.quiet_data_context(debug, ray_bars=debug and not own_bar)
    rs = ReadSettings.of(spec, plan)
    units = plan.units
    if all(not u.url.startswith("memory://") for u in units):
        ds = ray.data.from_items([{"unit": unit_to_json(u)} for u in units],
                                 override_num_blocks=len(units))
        ds = ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"rs": rs}, num_cpus=ray_env.READ_TASK_CPUS)
    else:  # memory:// lives in this process only: read it here
        tables = [read_unit(u, rs) for u in units]
        ds = ray.data.from_arrow([t for t in tables if t.num_rows] or tables[:1])
    # One block per generate batch: an actor task is then one batch, so the driver commits (and
    # --resume keeps) work batch by batch, and a lost actor costs only its in-flight batches.
    ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
    ray_env.light_repartition(ds)
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter yet; we want them explicit
        # (Ray Data's default retries forever, which loops on a batch that kills every actor).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        # Workers write the parts; a memory:// output lives in this process only.
        where = None if out.url.startswith("memory://") else out.fs.unstrip_protocol(out.path)
        gs = GenSettings.of(spec, plan, phase_board, where,
                            tuple(plan.param_columns), lease)
        stream = spec.batching == "stream"
        ds = ds.map_batches(StreamingPredictor if stream else ClosedPredictor,
                            fn_constructor_kwargs={"settings": gs},
                            batch_size=spec.batch_size, batch_format="pyarrow",
                            **ray_env.actor_options(spec, ray_env.cluster_cpus(),
                                                    spec.batches_in_flight if stream else 1))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
