"""Small helpers shared by the pipeline tests: write shards anywhere fsspec reaches."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import get_fs, join

CONTRACT = ["id", "task", "output", "finish_reason", "error", "prompt_tokens", "output_tokens",
            "model"]


def write_shard(url: str, table: pa.Table, **kw: Any) -> None:
    fs, path = get_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def write_corpus(base: str, shards: int = 3, rows: int = 4, prefix: str = "doc") -> list[str]:
    """`shards` Parquet files of `rows` rows each under `base`; returns all ids."""
    ids = []
    for s in range(shards):
        sid = [f"{prefix}-{s}-{i}" for i in range(rows)]
        ids += sid
        write_shard(join(base, f"shard-{s}.parquet"), pa.table({
            "id": sid,
            "text": [f"Row {i} of shard {s}." for i in range(rows)],
            "lang": ["en"] * rows,
        }))
    return ids


def read_output(url: str) -> pa.Table:
    fs, path = get_fs(url)
    return pq.read_table(path, filesystem=fs)


def tiny_spec(inp: Any, out: str, **kw: Any) -> dict:
    spec = {"input": inp, "output": out, "model": "tiny-gemma3", "task": "raw",
            "batch_size": 4, "sampling": {"max_new_tokens": 4}}
    spec.update(kw)
    return spec
