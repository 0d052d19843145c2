"""Runs one batch job end to end on Ray Data.

    preflight (spec, shards, model source, output mode)
    --> the output's lease taken (one writer per output: pipeline/lease.py), held to the end
    --> read tasks: row groups -> rows with ids, text and carried columns, minus committed ids
    --> Predictor actor pool: prompt + generate, one output row per input row
    --> driver: each finished batch committed as a part under `_parts/` (what --resume trusts)
    --> publish: parts compacted into `part-NNNNN.parquet`, `_ERRORS.parquet`, `_BATCHES.jsonl`,
        `_REPORT.html`, `_SUMMARY.json`, then `_SUCCESS`.
(`--retry-errors` regenerates a finished output's error rows: pipeline/retry.py.)
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import pyarrow as pa

from pipeline.lease import Lease
from pipeline.output import OutputDir
from pipeline.plan import Plan
from pipeline.preflight import preflight
from pipeline.progress import Progress, choose_mode
from pipeline.publish import AttemptStats, compact_parts, run_summary, write_side_files
from pipeline.spec import JobSpec
from pipeline.stream import generate_and_commit


def run_job(spec: JobSpec, *, progress: bool | None = None, debug: bool = False,
            on_plan: Callable[[Plan], None] | None = None,
            on_commit: Callable[[pa.Table], None] | None = None) -> dict[str, Any]:
    """Runs a job end to end and returns its summary (also written as `_SUMMARY.json`).

    `on_plan` sees the preflight plan; `on_commit` sees each batch right after it is committed.

    Raises InputError (nothing written) for refused inputs or an output another run holds, and
    JobError when the job fails.
    """
    if spec.retry_errors:
        from pipeline.retry import retry_errors

        return retry_errors(spec, progress=progress, debug=debug, on_commit=on_commit)
    t_start = time.perf_counter()
    plan, out, mode = preflight(spec)
    if on_plan is not None:
        on_plan(plan)
    if mode == "finished":
        summary = out.read_json(OutputDir.SUMMARY) if out.exists(OutputDir.SUMMARY) else {}
        summary["note"] = "output already finished; nothing to resume"
        return summary
    with Lease(out, command=f"gemma-batch run ({mode})") as lease:
        out.confirm_mode(mode, overwrite=spec.overwrite, resume=spec.resume)
        if mode == "overwrite":
            out.clear_ours()
        attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        todo = plan.total_rows - len(plan.done_ids)
        prog = Progress(todo, mode=choose_mode(progress))
        t_gen = time.perf_counter()
        stats = AttemptStats(mode=mode)
        if todo > 0 and plan.units:
            generate_and_commit(spec, plan, out, attempt, prog, stats, debug, on_commit,
                                lease.me.token)
        stats.rows_generated, stats.output_tokens = prog.rows, prog.tokens
        stats.wall_s = time.perf_counter() - t_gen
        lease.check()  # compaction clears earlier shards: only the lease holder may do it
        compacted = compact_parts(out, plan, spec.rows_per_output_shard, spec.batch_size)
        summary = run_summary(spec, plan, compacted, stats)
        summary["wall_s"] = round(time.perf_counter() - t_start, 3)
        out.publish(compacted.names, summary, lambda: write_side_files(
            out, compacted, summary, plan.output_schema()), rows=compacted.shard_rows)
        if plan.increment is not None:  # only now: a run killed before publishing marks none
            plan.increment.record(out, compacted.names, attempt)
    return summary
