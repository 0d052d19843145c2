"""`run --retry-errors`: regenerate only the error rows of a finished output (e.g. after raising
max_new_tokens or max_prompt_tokens) and republish it, each id still exactly once.

    take the output's lease (pipeline/lease.py), held to the end
    --> read the published shards' ids and error ids  (the output stays finished and readable)
    --> generate the error rows into `_parts/` (an interrupted retry keeps what it committed)
    --> remove `_SUCCESS`; move the kept rows into `_parts/` (shard by shard: copy, then delete)
    --> the usual publish: compact, side files and report, `_SUMMARY.json`, `_SUCCESS` last.

Interrupted after `_SUCCESS` went, the output is an unfinished run whose `_parts/` plus the
remaining shards hold every id: `--retry-errors` again rolls it forward (nothing regenerated).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError, JobError
from pipeline.lease import Lease
from pipeline.output import Mode, OutputDir
from pipeline.plan import Plan
from pipeline.preflight import preflight
from pipeline.progress import Progress, choose_mode
from pipeline.publish import AttemptStats, compact_parts, run_summary, write_side_files
from pipeline.report import read_batches
from pipeline.spec import JobSpec
from pipeline.stream import generate_and_commit

# Fields that say which rows and columns the output holds: a retry must keep them.
_IDENTITY = ("input", "task", "id_column", "text_column", "question_column", "context_column",
             "carry_columns")
_RUN_FLAGS = ("retry_errors", "resume", "overwrite")


def retry_errors(spec: JobSpec, *, progress: bool | None = None, debug: bool = False,
                 on_commit: Callable[[pa.Table], None] | None = None) -> dict[str, Any]:
    """Regenerates the error rows of the finished output `spec.output` and republishes it;
    returns the new summary (with a `retries` entry saying what was retried).

    Raises InputError (nothing changed) when the output is not a finished run of this job.
    """
    t_start = time.perf_counter()
    plan, out, mode = preflight(spec.model_copy(update={"retry_errors": False, "resume": True}))
    if mode == "new" or (mode == "resume" and not _run_record(out).get("retry_errors")):
        what = "no run" if mode == "new" else "an unfinished run (finish it with --resume)"
        raise InputError(f"--retry-errors: output {spec.output} holds {what}; it retries the "
                         "error rows of a finished output")
    with Lease(out, command="gemma-batch run --retry-errors") as lease:
        out.confirm_mode(mode, overwrite=False, resume=True)
        return _retry(spec, plan, out, mode, lease, t_start, progress, debug, on_commit)


def _retry(spec: JobSpec, plan: Plan, out: OutputDir, mode: Mode, lease: Lease,
           t_start: float, progress: bool | None, debug: bool,
           on_commit: Callable[[pa.Table], None] | None) -> dict[str, Any]:
    """The retry itself, holding the output's lease."""
    now = json.loads(spec.model_dump_json())
    before = out.read_json(OutputDir.SUMMARY) if out.exists(OutputDir.SUMMARY) else {}
    rolling = mode == "resume"  # an interrupted retry that already removed _SUCCESS
    _check_same_job(before.get("spec") or {}, now)
    if mode == "finished" and _run_record(out).get("spec") not in (None, now):
        out.remove([OutputDir.PARTS])  # an interrupted retry with other settings: start afresh
    published = out.shards()
    _check_schema(out, published, plan.output_schema())
    retried = out.done_ids()  # committed by an interrupted retry (and kept rows, rolling)
    all_ids, error_ids = set(retried), set()
    for name in published:
        t = out.read_table(name, columns=["id", "finish_reason"])
        ids = t.column("id").to_pylist()
        all_ids.update(ids)
        bad = pc.equal(t.column("finish_reason"), "error").to_pylist()
        error_ids.update(i for i, b in zip(ids, bad) if b)
    if len(all_ids) != plan.total_rows:
        raise InputError(f"--retry-errors: the input has {plan.total_rows} rows but output "
                         f"{spec.output} holds {len(all_ids)}; the input changed since the run: "
                         "rerun the job with --overwrite")
    todo = error_ids - retried
    if not todo and not retried:
        before["note"] = "no error rows to retry; the output is unchanged"
        return before
    attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    stats = AttemptStats(mode="retry_errors")
    t_gen = time.perf_counter()
    if todo:
        if not out.exists(OutputDir.PARTS, OutputDir.RUN):
            out.write_run_record(now, attempt)
        plan.done_ids, plan.resumed = all_ids - todo, True
        prog = Progress(len(todo), mode=choose_mode(progress))
        generate_and_commit(spec, plan, out, attempt, prog, stats, debug, on_commit,
                            lease.me.token)
        stats.rows_generated, stats.output_tokens = prog.rows, prog.tokens
        retried = out.done_ids()
        if not error_ids <= retried:
            raise JobError(f"--retry-errors: {len(error_ids - retried)} error rows were not "
                           "regenerated; the output is unchanged; rerun --retry-errors")
    stats.wall_s = time.perf_counter() - t_gen
    prior_batches = read_batches(out)
    lease.check()  # only the lease holder may unpublish and republish
    out.remove([OutputDir.SUCCESS])  # from here readers wait for the republished output
    _move_kept(out, published, retried, attempt)
    compacted = compact_parts(out, plan, spec.rows_per_output_shard, spec.batch_size)
    summary = run_summary(spec, plan, compacted, stats)
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    summary["retries"] = [*(before.get("retries") or []), {
        "attempt": attempt, "rows_retried": len(todo), "error_rows_before": len(error_ids),
        "errors_before": before.get("errors"), "errors_by_kind_before":
            before.get("errors_by_kind"), "errors_after": summary["errors"],
        "spec_changes": _changes(before.get("spec") or {}, now), "rolled_forward": rolling}]
    out.publish(compacted.names, summary, lambda: write_side_files(
        out, compacted, summary, plan.output_schema(), prior_batches), rows=compacted.shard_rows)
    return summary


def _run_record(out: OutputDir) -> dict[str, Any]:
    """`_parts/_RUN.json` as {"spec", "started", "retry_errors"}; empty when absent."""
    rel = f"{OutputDir.PARTS}/{OutputDir.RUN}"
    try:
        rec = out.read_json(rel) if out.exists(rel) else {}
    except (ValueError, OSError):
        return {}
    rec["retry_errors"] = bool((rec.get("spec") or {}).get("retry_errors"))
    return rec


def _check_same_job(before: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [k for k in _IDENTITY if k in before and before.get(k) != now.get(k)]
    if diff:
        raise InputError(f"--retry-errors: this spec differs from the output's run in "
                         f"{', '.join(diff)}; retry with the run's spec (only settings such as "
                         "max_new_tokens or max_prompt_tokens may change)")


def _check_schema(out: OutputDir, published: list[str], want: pa.Schema) -> None:
    if not published:
        return
    with out.fs.open(out._p(published[0]), "rb") as f:
        have = pq.read_schema(f)
    if [(x.name, x.type) for x in have] != [(x.name, x.type) for x in want]:
        raise InputError(f"--retry-errors: the output's columns ({', '.join(have.names)}) are "
                         f"not this spec's ({', '.join(want.names)}); retry with the run's spec")


def _move_kept(out: OutputDir, published: list[str], retried: set, attempt: str) -> None:
    """Moves each published shard's rows not regenerated into `_parts/` (whole shards by a move,
    others as a filtered copy), removing the shard after; safe to repeat after a crash."""
    done = pa.array(sorted(retried, key=str)) if retried else None
    for name in published:
        if not out.exists(name):
            continue
        t = out.read_table(name)
        keep = t if done is None else t.filter(pc.invert(pc.is_in(
            t.column("id"), value_set=done.cast(t.schema.field("id").type))))
        dest = f"{OutputDir.PARTS}/{attempt}-kept-{name}"
        if keep.num_rows == t.num_rows:
            out.move(name, dest)
            continue
        if keep.num_rows:
            out.write_table(dest, keep)
        out.remove([name])


def _changes(before: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """Spec fields that differ from the run's, as {"sampling.max_new_tokens": [old, new]}."""
    def flat(d: dict[str, Any], pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            elif f"{pre}{k}" not in _RUN_FLAGS:
                out[f"{pre}{k}"] = v
        return out

    a, b = flat(before), flat(now)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
