"""Preflight: check a job's input and output before anything is generated or written.

Reads only Parquet footers and the id column. Every refusal is an `InputError` with one line
naming the shard and column (exit code 2); nothing is written.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import ray_env
from pipeline.errors import InputError, JobError
from pipeline.output import RESERVED, Mode, OutputDir
from pipeline.plan import Plan, ReadUnit
from pipeline.spec import JobSpec
from pipeline.storage import Shard, get_fs, list_shards

UNIT_ROWS = 2048  # rows per read task, at most (whole row groups)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def _open_parquet(fs, path: str, url: str):
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"shard {url}: file disappeared while checking it") from None
    except OSError as e:
        raise JobError(f"shard {url}: cannot open ({e}); check storage access") from None
    try:
        return f, pq.ParquetFile(f)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as e:
        f.close()
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError(
            f"shard {url}: not a readable Parquet file ({reason}); remove or replace it"
        ) from None


def check_model_source(source: str) -> None:
    """Refuses a model source that cannot load (no weights are read: see model.checkpoints)."""
    from model.checkpoints import CheckpointError, check

    try:
        check(source)
    except CheckpointError as e:
        raise InputError(str(e).splitlines()[0]) from None


def check_long_document(spec: JobSpec) -> None:
    """Refuses long_document: stream for a model whose state grows with the sequence."""
    if spec.long_document != "stream":
        return
    from model.checkpoints import CheckpointError, config_of
    from model.family import family_of

    try:
        fixed = family_of(config_of(spec.model)).FIXED_STATE
    except CheckpointError as e:
        raise InputError(str(e).splitlines()[0]) from None
    if not fixed:
        raise InputError(f"long_document: stream needs a model with a fixed-size state "
                         f"(RecurrentGemma); {spec.model} keeps a cache that grows with the "
                         "document: use map-reduce (summarize), truncate or error")


def check_placement(spec: JobSpec) -> None:
    """Refuses a mesh that does not cover an actor's devices, and a model that the devices of
    one actor cannot hold (from the config alone: no weights are read)."""
    from model.checkpoints import CheckpointError, config_of
    from model.sharding import chips_needed

    n = ray_env.devices_per_actor(spec)
    if n is None:  # CPU actors: the devices their process sees, checked when the model loads
        return
    r = spec.resources
    what, knob = ("GPUs", "gpus_per_actor") if r.accelerator == "gpu" else ("TPU chips",
                                                                           "tpu_chips")
    m = spec.mesh
    if m is not None and m.data * m.model != n:
        raise InputError(
            f"mesh {m.data}x{m.model} spans {m.data * m.model} devices but each actor holds {n} "
            f"{what}; make data x model = {n}, or leave mesh out to have it chosen")
    device_bytes = ray_env.device_memory_bytes(spec)
    try:
        cfg = config_of(spec.model) if device_bytes else None
    except CheckpointError as e:
        raise InputError(str(e).splitlines()[0]) from None
    if cfg is None:
        return
    dtype = spec.dtype or "bfloat16"  # the default off CPU
    param_bytes = cfg.num_params() * (4 if dtype in ("float32", "fp32") else 2)
    need = chips_needed(param_bytes, device_bytes)
    size = (f"model {spec.model} ({param_bytes / 1e9:.1f} GB of {dtype} parameters) needs "
            f"{need} {what} of {device_bytes / 2**30:.0f} GiB ({r.accelerator_type})")
    if need > n:
        raise InputError(f"{size}, but each actor holds {n}; set resources.{knob} to at least "
                         f"{need}")
    if m is not None and m.model < need:
        raise InputError(f"{size}, but mesh {m.data}x{m.model} splits it over {m.model}; use a "
                         f"model axis of at least {need}, or leave mesh out")


def preflight(spec: JobSpec) -> tuple[Plan, OutputDir, Mode]:
    """Checks model source, device placement, output state and every input shard; returns the
    plan."""
    check_model_source(spec.model)
    check_placement(spec)
    check_long_document(spec)
    from pipeline.formats import compile_job_format

    fmt = compile_job_format(spec)  # a format too large or invalid is refused here
    out = OutputDir(spec.output)
    mode = out.mode(overwrite=spec.overwrite, resume=spec.resume)
    if mode != "finished":
        out.probe_writable()  # an output that cannot be written is refused before any compute
    shards = list_shards(spec.input)
    out_prefix = out.fs.unstrip_protocol(out.path).rstrip("/") + "/"
    inside = [sh.url for sh in shards if sh.url.startswith(out_prefix)]
    if inside:
        raise InputError(
            f"input file {inside[0]} lies inside the output directory {spec.output}; "
            "write the output somewhere else"
        )
    needed = spec.input_columns()
    idc = spec.id_column
    id_resolved = "id_column" in spec.model_fields_set
    units: list[ReadUnit] = []
    schemas: list[pa.Schema] = []
    id_types: set[str] = set()
    id_chunks: list[tuple[Shard, pa.ChunkedArray]] = []
    total = 0
    for shard in shards:
        fs, path = get_fs(shard.url)
        f, pf = _open_parquet(fs, path, shard.url)
        try:
            schema = pf.schema_arrow
            n = pf.metadata.num_rows
            if n == 0:
                continue  # an empty shard contributes nothing, whatever its columns
            if not id_resolved:  # unset: the first shard's `id` column, if it has one
                idc, id_resolved = spec.id_column_for(schema.names), True
            for col in needed:
                if col not in schema.names:
                    raise InputError(
                        f"shard {shard.url}: column {col!r} not found (columns: "
                        f"{', '.join(schema.names[:12])}); set the right column name"
                    )
                if not _is_text(schema.field(col).type):
                    raise InputError(
                        f"shard {shard.url}: column {col!r} has type {schema.field(col).type}, "
                        "not string; point the job at a text column"
                    )
            if idc is not None:
                if idc not in schema.names:
                    raise InputError(
                        f"shard {shard.url}: id column {idc!r} not found (columns: "
                        f"{', '.join(schema.names[:12])}); name the id column, or set "
                        "id_column: null (--id-column '') to derive ids"
                    )
                t = schema.field(idc).type
                if pa.types.is_integer(t):
                    id_types.add("int")
                elif _is_text(t) and not pa.types.is_null(t):
                    id_types.add("string")
                else:
                    raise InputError(
                        f"shard {shard.url}: id column {idc!r} has type {t}; ids must be "
                        "integers or strings"
                    )
                try:
                    ids = pf.read(columns=[idc]).column(idc)
                except (pa.ArrowException, OSError) as e:
                    raise InputError(
                        f"shard {shard.url}: cannot read id column {idc!r} ({str(e)[:120]}); "
                        "the file may be truncated"
                    ) from None
                if ids.null_count:
                    rows = [i for i, v in enumerate(ids.to_pylist()) if v is None][:3]
                    raise InputError(
                        f"shard {shard.url}: id column {idc!r} has {ids.null_count} null "
                        f"values (rows {', '.join(map(str, rows))}); every row needs an id"
                    )
                id_chunks.append((shard, ids))
            schemas.append(schema)
            units.extend(_read_units(shard, pf.metadata))
            total += n
        finally:
            f.close()
    # From here on the spec says what the job does: reads, the run record, --resume and the
    # summary all see the resolved id column (an unset one is now `id` or null).
    spec.id_column = idc
    if len(id_types) > 1:
        raise InputError(
            f"id column {idc!r} is integer in some shards and string in others; use one type"
        )
    if id_chunks:
        _check_unique(idc, id_chunks)
    id_type = pa.int64() if id_types == {"int"} else pa.string()
    carry, carry_schema = _carry(spec, schemas, idc, {f.name for f in fmt.fields()})
    read_cols = ([idc] if idc else []) + needed + [c for c in carry if c not in needed and c != idc]
    from pipeline.row_params import param_columns

    params = param_columns(spec.sampling_columns,
                           sorted({n for sch in schemas for n in sch.names}))
    read_cols += [c for c in params.values() if c not in read_cols]
    plan = Plan(shards, units, total, id_type, idc is None, read_cols, carry, carry_schema,
                id_column=idc, param_columns=params, output_format=fmt)
    if spec.incremental is not None:  # only rows no earlier run produced (pipeline/ledger.py)
        from pipeline.ledger import plan_increment

        plan_increment(spec, plan, out, mode)
    if mode == "resume":
        out.check_resume(spec.output_shaping())
        plan.done_ids = out.done_ids()
        plan.resumed = True
    return plan, out, mode


def _read_units(shard: Shard, md: pq.FileMetaData) -> list[ReadUnit]:
    """Whole row groups of one shard, grouped into units of at most UNIT_ROWS rows."""
    units: list[ReadUnit] = []
    first = rows = 0
    group: list[int] = []
    for rg in range(md.num_row_groups):
        r = md.row_group(rg).num_rows
        if group and rows + r > UNIT_ROWS:
            units.append(ReadUnit(shard.url, shard.name, tuple(group), first, rows))
            first += rows
            group, rows = [], 0
        group.append(rg)
        rows += r
    if group:
        units.append(ReadUnit(shard.url, shard.name, tuple(group), first, rows))
    return units


def _check_unique(idc: str, chunks: list[tuple[Shard, pa.ChunkedArray]]) -> None:
    counts: Counter = Counter()
    where: dict[Any, str] = {}
    for shard, ids in chunks:
        for v in ids.to_pylist():
            counts[v] += 1
            where.setdefault(v, shard.name)
    dups = [v for v, c in counts.items() if c > 1]
    if dups:
        ex = ", ".join(f"{v!r} ({counts[v]}x, first in {where[v]})" for v in dups[:3])
        raise InputError(
            f"id column {idc!r} has {len(dups)} duplicated values, e.g. {ex}; ids must be unique"
        )


def _carry(spec: JobSpec, schemas: list[pa.Schema], idc: str | None,
           format_columns: set[str]) -> tuple[dict[str, str], pa.Schema]:
    """Input columns copied to the output, renamed (`input_<name>`) when they collide with
    output columns (the contract's and the output format's)."""
    if not schemas:
        return {}, pa.schema([])
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input shards have conflicting column types: {str(e)[:160]}") from None
    skip = {spec.text_column, idc}
    if spec.carry_columns is None:
        names = [n for n in unified.names if n not in skip]
    else:
        missing = [c for c in spec.carry_columns if c not in unified.names]
        if missing:
            raise InputError(
                f"carry_columns names {missing[0]!r}, which no input shard has; fix carry_columns"
            )
        names = [c for c in spec.carry_columns if c != idc]
    carry: dict[str, str] = {}
    fields = []
    for n in names:
        out_name = n
        while out_name in RESERVED or out_name in format_columns or out_name in carry.values():
            out_name = f"input_{out_name}"
        carry[n] = out_name
        t = unified.field(n).type
        fields.append(pa.field(out_name, pa.string() if pa.types.is_null(t) else t))
    return carry, pa.schema(fields)
