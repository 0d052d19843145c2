"""A finished batch, worker side: its output rows (the output schema), its part file under
`_parts/` and the small record the driver gets instead of the rows.

A part's name comes from its rows' ids, so a retried batch (same rows) overwrites its own
earlier attempt instead of adding a second copy; each write is atomic (temp file, then moved).
The driver sees only `RECORD_SCHEMA` rows: part name, counts, latency, placement; never output
text.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import pyarrow as pa

from pipeline import lease
from pipeline.output import OutputDir

# What the driver receives per finished batch (one row): no output text.
RECORD_SCHEMA = pa.schema([
    ("part", pa.string()),  # the part's name under _parts/ ("" when not written)
    ("rows", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("errors", pa.int64()),
    ("latency_s", pa.float64()),  # first row in to last row out, in the actor
    ("placement", pa.string()),  # the actor's mesh and parameter bytes (JSON)
    ("batch", pa.string()),  # the batch's record for `_BATCHES.jsonl` (JSON)
    ("error", pa.string()),  # why the part could not be written (null: it was)
])


# Fault injection for tests only: the first worker to write a part (the one that creates the
# file this variable names) dies half way through writing it.
_DIE_IN_WRITE_ENV = "_GEMMA_BATCH_TEST_DIE_IN_PART_WRITE"
RECORD_COLUMN = "__record"  # rows returned to the driver (memory:// outputs only)


def part_name(ids: Sequence[Any]) -> str:
    """`b-<digest of the ids>.parquet`: the same rows always get the same name."""
    h = hashlib.blake2b(digest_size=12)
    for i in ids:
        b = str(i).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "little") + b)
    return f"b-{h.hexdigest()}.parquet"


def output_table(schema: pa.Schema, batch: pa.Table, out: dict[str, list], task: str,
                 model: str) -> pa.Table:
    """The batch's output rows: `out` holds the generated columns (output, finish_reason,
    error, error_kind, prompt_tokens, output_tokens, truncated), the rest comes from the
    batch (id, carried columns) or the job (task, model)."""
    n = batch.num_rows
    arrays = []
    for field in schema:
        name = field.name
        if name == "id":
            arrays.append(batch.column("id").cast(field.type))
        elif name == "task":
            arrays.append(pa.array([task] * n, pa.string()))
        elif name == "model":
            arrays.append(pa.array([model] * n, pa.string()))
        elif name in out:
            arrays.append(pa.array(out[name], field.type))
        elif name in batch.column_names:
            arrays.append(batch.column(name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def batch_record(table: pa.Table, name: str, actor: str, end: float, latency: float,
                 work: dict[str, Any]) -> dict[str, Any]:
    """The batch's line in `_BATCHES.jsonl`: id, actor, end time (Unix s), latency (s), rows,
    tokens, errors and the engine work (prefill tokens, compile seconds) since the actor's
    previous record."""
    cols = table.select(["prompt_tokens", "output_tokens", "finish_reason"]).to_pydict()
    return {"batch": name.removesuffix(".parquet"), "actor": actor, "end": end,
            "latency_s": round(latency, 4), "rows": table.num_rows,
            "prompt_tokens": sum(x or 0 for x in cols["prompt_tokens"]),
            "output_tokens": sum(x or 0 for x in cols["output_tokens"]),
            "errors": sum(f == "error" for f in cols["finish_reason"]), **work}


def commit(output: str | None, table: pa.Table, record: dict[str, Any],
           placement: str, lease_token: str | None = None) -> pa.Table:
    """Writes the batch's part (atomic) and returns its one-row `RECORD_SCHEMA` record for
    the driver. `output` None (a memory:// output lives in the driver's process only): nothing
    is written and the rows go back with the record in a `RECORD_COLUMN` column, for the
    driver to commit."""
    name = record["batch"] + ".parquet"
    if output is None:
        return table.append_column(RECORD_COLUMN, pa.array(
            [json.dumps({"record": record, "placement": placement})] * table.num_rows))
    out = OutputDir(output)
    if os.environ.get(_DIE_IN_WRITE_ENV):
        _die_in_write(out, name)
    # An error is told to the driver in the record, which fails the job with it (the rows
    # already committed stay for --resume).
    error = None
    try:
        if (fenced := lease.fence(out, lease_token)) is None:
            out.commit_part(name, table, [record])
        else:  # not a storage error: this run no longer owns the output
            error = f"{fenced}; this batch was not written"
    except Exception as e:  # noqa: BLE001 - every filesystem raises its own types
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        error = f"storage error writing {output}/{out.PARTS}/{name}: {type(e).__name__}: {cause}"
    if error:
        name = ""
    return pa.Table.from_pylist([{
        "part": name, "rows": record["rows"], "prompt_tokens": record["prompt_tokens"],
        "output_tokens": record["output_tokens"], "errors": record["errors"],
        "latency_s": record["latency_s"], "placement": placement,
        "batch": json.dumps(record), "error": error}], schema=RECORD_SCHEMA)


def _die_in_write(out: OutputDir, name: str) -> None:
    try:
        fd = os.open(os.environ[_DIE_IN_WRITE_ENV], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    out.fs.makedirs(out._p(out.PARTS), exist_ok=True)
    with out.fs.open(out._p(out.PARTS, f".tmp-{name}"), "wb") as f:
        f.write(b"PAR1 half a part")  # what a write cut short leaves
    os._exit(1)
