"""End to end on a local Ray cluster: gs:// (fake-gcs-server), s3:// (moto) and local paths."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.spec import build_spec
from pipeline.run import run_job
from pipeline.storage import get_fs, join, storage_options

from pl_helpers import CONTRACT, read_output, tiny_spec, write_corpus


@pytest.mark.parametrize("scheme", ["gs", "s3", "local"])
def test_round_trip_three_shards(scheme, ray_cluster, tmp_path):
    base = {"gs": "gs://test-bucket/rt", "s3": "s3://test-bucket/rt",
            "local": str(tmp_path)}[scheme]
    ids = write_corpus(join(base, "in"), shards=3, rows=4)
    out = join(base, "out")
    # s3 runs two actors: on this 2-CPU cluster that is what used to starve the read tasks.
    pool = {"num_actors": 2} if scheme == "s3" else {}
    summary = run_job(build_spec(tiny_spec(join(base, "in"), out, id_column="id",
                                           resources=pool)), progress=False)

    assert summary["rows_in"] == summary["rows_out"] == 12
    table = read_output(out)  # pyarrow
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    for col in CONTRACT + ["lang"]:
        assert col in table.column_names
    df = pd.read_parquet(out, storage_options=storage_options(out) or None)  # pandas
    assert sorted(df["id"]) == sorted(ids)
    assert set(df["finish_reason"]) <= {"stop", "length"}
    assert (df["model"] == "tiny-gemma3").all() and (df["task"] == "raw").all()
    assert (df["output_tokens"] <= 4).all() and (df["prompt_tokens"] > 0).all()
    # The actors' prefill work: every prompt token but the last (fed by the first decode step)
    # was either computed or copied from a shared prefix; padding is counted apart.
    work = summary["prefill"]
    assert work["padded_tokens"] >= work["real_tokens"] > 0
    assert work["padding_ratio"] == round(work["padded_tokens"] / work["real_tokens"], 4)
    assert (work["real_tokens"] + work["prefix_reused_tokens"]
            >= int((df["prompt_tokens"] - 1).sum()))

    fs, path = get_fs(out)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert names == ["_BATCHES.jsonl", "_ERRORS.parquet", "_REPORT.html", "_SUCCESS",
                     "_SUMMARY.json", "part-00000.parquet"]
    errors = read_output(join(out, "_ERRORS.parquet"))  # no error rows: empty but valid
    assert errors.num_rows == 0
    assert errors.schema.names == ["id", "error_kind", "error", "prompt_tokens"]
    with fs.open(join(path, "_SUMMARY.json"), "rb") as f:
        written = json.loads(f.read())
    assert written["rows_out"] == 12 and written["errors"] == 0
    assert written["output_tokens"] == int(df["output_tokens"].sum())
    assert "testing" not in json.dumps(written)  # no credentials in outputs


def test_memory_filesystem_and_derived_ids(ray_cluster):
    """memory:// lives in the driver process only: read there, still one row per input row."""
    ids = write_corpus("memory://rt/in", shards=2, rows=3)
    # The corpus has an `id` column; id_column: null asks for derived ids all the same.
    summary = run_job(build_spec(tiny_spec("memory://rt/in", "memory://rt/out", id_column=None)),
                      progress=False)
    table = read_output("memory://rt/out")
    got = sorted(table.column("id").to_pylist())
    # Derived ids: stable "<shard>:<row>".
    assert got == sorted(f"shard-{s}.parquet:{i}" for s in range(2) for i in range(3))
    assert summary["rows_out"] == len(ids) == 6
    assert table.column("lang").to_pylist() == ["en"] * 6 and "text" not in table.column_names
