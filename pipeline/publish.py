"""Publish: committed parts -> output shards deduplicated by id (staged, then moved in place),
the side files (`_ERRORS.parquet`, `_BATCHES.jsonl`, `_REPORT.html`) and the run summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import JobError
from pipeline.output import OutputDir
from pipeline.plan import Plan
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)
ERROR_COLUMNS = ("id", "error_kind", "error", "prompt_tokens")  # of `_ERRORS.parquet`


@dataclasses.dataclass
class Compacted:
    """What the staged shards hold."""

    names: list[str] = dataclasses.field(default_factory=list)
    rows: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    finish: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the parts' records
    error_rows: list[pa.Table] = dataclasses.field(default_factory=list)  # ERROR_COLUMNS
    shard_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # rows per shard


@dataclasses.dataclass
class AttemptStats:
    """What this attempt generated (a resumed run counts only its own rows)."""

    mode: str
    rows_generated: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)  # per batch, s in generate
    placements: set[str] = dataclasses.field(default_factory=set)  # actors' mesh info (JSON)


def compact_parts(out: OutputDir, plan: Plan, rows_per_shard: int,
                  batch_size: int = 32) -> Compacted:
    """Stages the committed parts as shards of about `rows_per_shard` rows, each id once.

    Each shard is written by a Ray task (in this process without Ray, or for a memory://
    output) from consecutive parts of about `batch_size` rows; the driver gets only counts,
    error rows, batch records and the ids (checked to be unique across shards).
    Raises JobError (nothing published) when the parts do not hold every input row.
    """
    out.clear_staging()
    schema = plan.output_schema()
    names = sorted(n for n in out.ls(out.PARTS) if n.endswith(".parquet"))
    per = max(1, rows_per_shard // max(1, batch_size))
    groups = [names[i:i + per] for i in range(0, len(names), per)] or [[]]
    shard_names = [f"part-{k:05d}.parquet" for k in range(len(groups))]
    results = _run_groups(out, [(g, n, None) for g, n in zip(groups, shard_names)], schema)
    # Ids are unique in the input and a retried batch rewrites its own part, so shards never
    # share an id; should they, a later shard drops the ids an earlier one holds.
    seen = pa.chunked_array([], plan.id_type)
    redo = []
    for k, r in enumerate(results):
        ids = r["ids"]
        if len(seen) and len(ids):
            dup = ids.filter(pc.is_in(ids, value_set=seen.combine_chunks()))
            if len(dup):
                redo.append((k, dup))
        seen = pa.chunked_array([*seen.chunks, *(ids.chunks if isinstance(ids, pa.ChunkedArray)
                                                 else [ids])], plan.id_type)
    if redo:
        log.warning("%d shards hold ids of earlier shards; dropping the copies", len(redo))
        again = _run_groups(out, [(groups[k], shard_names[k], dup) for k, dup in redo], schema)
        for (k, _), r in zip(redo, again):
            results[k] = r
    done = Compacted(names=shard_names)
    for name, r in zip(shard_names, results):
        done.shard_rows[name] = r["rows"]
        done.batches.extend(r["batches"])
        for key, n in r["errors"].items():
            done.errors[key] = done.errors.get(key, 0) + n
        for key, n in r["finish"].items():
            done.finish[key] = done.finish.get(key, 0) + n
        done.prompt_tokens += r["prompt_tokens"]
        done.output_tokens += r["output_tokens"]
        done.rows += r["rows"]
        if r["error_rows"].num_rows:
            done.error_rows.append(r["error_rows"])
    if done.rows != plan.total_rows:
        raise JobError(
            f"output has {done.rows} rows for {plan.total_rows} input rows; nothing was "
            "published; rerun with --resume to finish the missing rows")
    return done


def _run_groups(out: OutputDir, jobs: list[tuple[list[str], str, Any]],
                schema: pa.Schema) -> list[dict[str, Any]]:
    """`compact_group` per (parts, shard name, ids to drop): as Ray tasks when Ray runs and the
    output is reachable from its workers, else here."""
    import ray

    if not ray.is_initialized() or out.url.startswith("memory://"):
        return [compact_group(out.url, g, name, schema, drop) for g, name, drop in jobs]
    from pipeline.ray_env import READ_TASK_CPUS

    task = ray.remote(num_cpus=READ_TASK_CPUS, max_retries=3)(compact_group)
    where = out.fs.unstrip_protocol(out.path)
    return ray.get([task.remote(where, g, name, schema, drop) for g, name, drop in jobs])


def compact_group(url: str, parts: list[str], name: str, schema: pa.Schema,
                  drop: Any = None) -> dict[str, Any]:
    """Reads the parts (skipping unreadable leftovers), keeps each id once (and none in
    `drop`), stages them as shard `name` under `_staging/` (atomic) and returns what it holds:
    rows, counts by error kind and finish reason, tokens, error rows, batch records, ids."""
    out = OutputDir(url)
    tables, batches = [], []
    for part in parts:
        try:
            t = out.read_table(f"{out.PARTS}/{part}")
        except (pa.ArrowException, OSError, KeyError):
            continue
        batches.extend(out.part_batches(t))
        tables.append(t.select(schema.names).cast(schema).replace_schema_metadata(None))
    t = pa.concat_tables(tables) if tables else schema.empty_table()
    ids = t.column("id").combine_chunks() if t.num_rows else pa.array([], schema.field("id").type)
    seen: set = set()
    mask = []  # each id's first row
    for v in ids.to_pylist():
        mask.append(v not in seen)
        seen.add(v)
    if drop is not None and len(drop):
        mask = [m and not d for m, d in zip(mask, pc.is_in(ids, value_set=drop).to_pylist())]
    t = t.filter(pa.array(mask, pa.bool_())) if len(mask) else t
    out.stage(name, t)
    errs = t.filter(pc.equal(t.column("finish_reason"), "error"))
    return {"rows": t.num_rows, "errors": _counts(t.column("error_kind")),
            "finish": _counts(t.column("finish_reason")),
            "prompt_tokens": pc.sum(t.column("prompt_tokens")).as_py() or 0,
            "output_tokens": pc.sum(t.column("output_tokens")).as_py() or 0,
            "error_rows": errs.select(list(ERROR_COLUMNS)), "batches": batches,
            "ids": t.column("id").combine_chunks()}


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts: dict[str, int] = {}
    _add_counts(counts, column)
    return counts


def run_summary(spec: JobSpec, plan: Plan, c: Compacted, a: AttemptStats) -> dict[str, Any]:
    """The `_SUMMARY.json` of a run: rows, errors, tokens, speed, model, spec and versions."""
    lat, wall, gen_tokens = a.latencies, a.wall_s, a.output_tokens
    return {
        "rows_in": plan.total_rows,
        "rows_out": c.rows,
        "rows_generated_this_run": a.rows_generated,
        "rows_resumed": len(plan.done_ids),
        "errors": sum(c.errors.values()),
        "errors_by_kind": c.errors,
        "finish_reasons": c.finish,
        "prompt_tokens": c.prompt_tokens,
        "output_tokens": c.output_tokens,
        "generation_wall_s": round(wall, 3),
        "tokens_per_s": round(gen_tokens / wall, 3) if wall > 0 and gen_tokens else 0.0,
        # Per actor, generate calls only (no startup, model load or queueing).
        "generate_tokens_per_s": round(gen_tokens / sum(lat), 3) if lat and sum(lat) > 0 else 0.0,
        "batches": len(lat),
        "batch_latency_p50_s": _round(_percentile(lat, 0.5)),
        "batch_latency_p95_s": _round(_percentile(lat, 0.95)),
        "prefill": _prefill(c.batches),
        "decode": _decode(c.batches),
        # Rows longer than the usable context, by outcome (map_reduce, truncated, streamed,
        # too_long error rows, map_reduce_failed); {} when every row fit.
        "long_documents": _long_documents(c.batches),
        # Seconds the actors spent compiling programs inside their generate calls.
        "compile_s": round(sum(b.get("compile_s", 0.0) for b in c.batches), 3),
        "model": spec.model,
        # The output format's automaton: states, token classes, device table bytes.
        **({"output_format": plan.output_format.info}
           if plan.output_format is not None and plan.output_format.info else {}),
        **_placement(a.placements),
        "output_files": c.names,
        "errors_file": OutputDir.ERRORS,
        "batches_file": OutputDir.BATCHES,
        "report": OutputDir.REPORT,
        "mode": a.mode,
        "spec": json.loads(spec.model_dump_json()),
        "versions": _versions(),
        **(plan.increment.summary_fields() if plan.increment is not None else {}),
    }


def _prefill(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The engines' prefill work over the run's batches: token slots computed (padded), real
    tokens fed, their ratio, and prompt tokens a shared prefix saved (computed once instead)."""
    real = sum(b.get("prefill_real_tokens", 0) for b in batches)
    padded = sum(b.get("prefill_padded_tokens", 0) for b in batches)
    return {"real_tokens": real, "padded_tokens": padded,
            "padding_ratio": round(padded / real, 4) if real else None,
            "prefix_reused_tokens": sum(b.get("prefix_reused_tokens", 0) for b in batches)}


def _long_documents(batches: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in batches:
        for k, v in (b.get("long_documents") or {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    return counts


def _decode(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The engines' decode work: steps, slot occupancy (busy / usable slot-steps), and the
    occupancy over the steps that ran while rows waited for a slot (1.0: no slot idled)."""
    tot = {k: sum(b.get(k, 0) for b in batches) for k in (
        "decode_steps", "busy_slot_steps", "waiting_steps", "waiting_busy_slot_steps",
        "waiting_slot_steps")}
    usable = tot["waiting_slot_steps"]
    return {"steps": tot["decode_steps"], "busy_slot_steps": tot["busy_slot_steps"],
            "steps_while_rows_waited": tot["waiting_steps"],
            "occupancy_while_rows_waited": (round(tot["waiting_busy_slot_steps"] / usable, 4)
                                            if usable else None)}


def _placement(placements: set[str]) -> dict[str, Any]:
    """The mesh and per-device parameter bytes the actors used (a list when they differ)."""
    found = [json.loads(p) for p in sorted(placements)]
    if not found:
        return {"mesh": None, "param_bytes_per_device": None}
    if len(found) == 1:
        return found[0]
    return {"mesh": [f["mesh"] for f in found],
            "param_bytes_per_device": [f["param_bytes_per_device"] for f in found]}


def _add_counts(into: dict[str, int], col: pa.ChunkedArray) -> None:
    vc = pc.value_counts(col)
    for k, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        if k is not None:
            into[k] = into.get(k, 0) + n


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
    return v[k]


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("gemma-batch", "ray", "jax", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def write_side_files(out: OutputDir, c: Compacted, summary: dict[str, Any],
                     schema: pa.Schema, prior_batches: list[dict[str, Any]] = ()) -> None:
    """Writes `_ERRORS.parquet` (empty but valid when no row failed), `_BATCHES.jsonl` (earlier
    records first, each batch once) and `_REPORT.html`; a report that cannot be drawn is noted in
    `summary` (and logged), never failing a finished job."""
    from pipeline.report import render_report

    err_schema = pa.schema([schema.field(n) for n in ERROR_COLUMNS])
    errors = (pa.concat_tables(c.error_rows).cast(err_schema) if c.error_rows
              else err_schema.empty_table())
    out.write_table(OutputDir.ERRORS, errors)
    seen: set = set()
    batches = []
    for r in [*prior_batches, *c.batches]:
        if r.get("batch") not in seen:
            seen.add(r.get("batch"))
            batches.append(r)
    out.write_bytes(OutputDir.BATCHES, "".join(json.dumps(r) + "\n" for r in batches).encode())
    try:
        out.write_bytes(OutputDir.REPORT, render_report(out, summary, batches, errors))
    except Exception as e:  # noqa: BLE001 - the outputs are done; the report can be redrawn
        log.warning("_REPORT.html not written (%s: %s); run `gemma-batch report %s`",
                    type(e).__name__, e, out.given)
        summary["report"] = None
