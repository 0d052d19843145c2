"""Read tasks: one planned unit (row groups of a shard) -> rows shaped for the generator:
ids (given or derived), prompt text columns, carried columns, minus ids already committed (and,
in an incremental run, only the unit's rows the ledger does not hold)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import row_params
from pipeline.predictor import CONTEXT, QUESTION, TEXT
from pipeline.plan import Plan, ReadUnit
from pipeline.spec import JobSpec
from pipeline.storage import get_fs


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
    param_columns: tuple[tuple[str, str], ...] = ()  # (setting, input column)

    @classmethod
    def of(cls, spec: JobSpec, plan: Plan) -> "ReadSettings":
        done = (pa.array(sorted(plan.done_ids, key=str), plan.id_type)
                if plan.done_ids else None)
        return cls(spec.id_column, plan.id_type, spec.text_column, spec.question_column,
                   spec.context_column, plan.carry, plan.carry_schema, tuple(plan.read_columns),
                   done, tuple(plan.param_columns.items()))


def read_unit(unit: ReadUnit, rs: ReadSettings) -> pa.Table:
    """Reads one unit's row groups and shapes them for the predictor (ids, text, carried)."""
    fs, path = get_fs(unit.url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        present = [c for c in rs.read_columns if c in pf.schema_arrow.names]
        t = pf.read_row_groups(list(unit.row_groups), columns=present)
    offsets: range | tuple[int, ...] = range(t.num_rows)
    if unit.rows is not None:  # an incremental run reads only its new or changed rows
        offsets = unit.rows
        t = t.take(pa.array(unit.rows, pa.int64()))
    n = t.num_rows
    if rs.id_column is None:
        ids = pa.array([f"{unit.name}:{unit.first_row + i}" for i in offsets], pa.string())
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
    for name, src in rs.param_columns:  # per-row settings, checked by the actor
        cols[row_params.PREFIX + name] = (row_params.encode(t.column(src).to_pylist())
                                          if src in t.column_names else pa.nulls(n, pa.string()))
    out = pa.table(cols)
    if rs.done_ids is not None and len(rs.done_ids):
        out = out.filter(pc.invert(pc.is_in(out.column("id"), value_set=rs.done_ids)))
    return out


def _as_text(t: pa.Table, col: str, n: int) -> pa.ChunkedArray | pa.Array:
    if col not in t.column_names:
        return pa.nulls(n, pa.string())
    return t.column(col).cast(pa.string())


def read_batch(batch: pa.Table, rs: ReadSettings) -> pa.Table:
    """Ray Data task: a batch of serialized units -> their rows."""
    units = [unit_from_json(u) for u in batch.column("unit").to_pylist()]
    tables = [read_unit(u, rs) for u in units]
    return pa.concat_tables(tables) if tables else pa.table({})


def unit_to_json(u: ReadUnit) -> str:
    return json.dumps(dataclasses.asdict(u))


def unit_from_json(s: str) -> ReadUnit:
    d = json.loads(s)
    d["row_groups"] = tuple(d["row_groups"])
    if d.get("rows") is not None:
        d["rows"] = tuple(d["rows"])
    return ReadUnit(**d)
