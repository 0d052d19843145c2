"""The streaming pipeline: workers write the parts (the driver gets only small records), per-row
sampling settings, closed batches as an option, and a worker killed in the middle of writing a
part leaves no partial or duplicate rows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pl_helpers import read_output, tiny_spec, write_shard

from pipeline.run import run_job
from pipeline.spec import build_spec

REPO = Path(__file__).resolve().parents[2]


def _corpus(base: Path, n: int = 12) -> list[str]:
    ids = [f"r{i}" for i in range(n)]
    budgets = [1, 9, None, -3, 6, 2, 12, 3, 5, 7, 8, 4][:n]
    temps = [0.0] * n
    temps[5] = 99.0  # out of range: that row alone is an error
    write_shard(str(base / "in.parquet"), pa.table({
        "id": ids, "text": [f"Row {i} says hello." for i in range(n)],
        "budget": pa.array(budgets, pa.int64()), "temperature": temps}))
    return ids


def test_workers_write_parts_and_rows_take_their_own_settings(ray_cluster, tmp_path):
    ids = _corpus(tmp_path)
    out = tmp_path / "out"
    seen: list[pa.Table] = []
    spec = tiny_spec(str(tmp_path / "in.parquet"), str(out), id_column="id", batch_size=4,
                     sampling_columns={"max_new_tokens": "budget", "temperature": "temperature"},
                     sampling={"max_new_tokens": 5})
    summary = run_job(build_spec(spec), progress=False, on_commit=seen.append)

    # The driver got one small record per batch, never an output column.
    assert seen and all("output" not in t.column_names and "text" not in t.column_names
                        for t in seen)
    assert sum(sum(t.column("rows").to_pylist()) for t in seen) == len(ids)
    table = read_output(str(out)).to_pylist()
    assert Counter(r["id"] for r in table) == Counter(ids) and summary["rows_out"] == len(ids)
    rows = {r["id"]: r for r in table}
    budgets = {r["id"]: r["budget"] for r in rows.values()}
    for rid, r in rows.items():
        if rid in ("r3", "r5"):
            continue
        want = budgets[rid] if budgets[rid] is not None else 5  # null: the job's setting
        assert r["finish_reason"] in ("stop", "length") and r["output_tokens"] <= want, r
        assert (r["finish_reason"] == "length") == (r["output_tokens"] == want), r
    assert rows["r3"]["error_kind"] == "params" and "max_new_tokens" in rows["r3"]["error"]
    assert rows["r5"]["error_kind"] == "params" and "temperature" in rows["r5"]["error"]
    assert summary["errors_by_kind"] == {"params": 2}
    # The carried input columns are still there; the per-row setting columns too.
    assert rows["r1"]["budget"] == 9


def test_closed_batches_give_the_same_rows(ray_cluster, tmp_path):
    _corpus(tmp_path)
    spec = dict(id_column="id", batch_size=4, sampling={"max_new_tokens": 5},
                sampling_columns={"max_new_tokens": "budget"})
    got = {}
    for mode in ("stream", "closed"):
        run_job(build_spec(tiny_spec(str(tmp_path / "in.parquet"), str(tmp_path / mode),
                                     batching=mode, **spec)), progress=False)
        got[mode] = {r["id"]: (r["output"], r["finish_reason"], r["error_kind"])
                     for r in read_output(str(tmp_path / mode)).to_pylist()}
    assert got["stream"] == got["closed"]


def test_worker_killed_while_writing_a_part(tmp_path):
    """The first part write dies half way (the worker process exits): Ray restarts the actor
    and retries the batch, whose part replaces nothing partial; each id once."""
    ids = [f"k{i}" for i in range(16)]
    write_shard(str(tmp_path / "in.parquet"),
                pa.table({"id": ids, "text": [f"Doc {i}." for i in range(16)]}))
    out = tmp_path / "out"
    marker = tmp_path / "died"
    argv = [sys.executable, "-m", "jobs.cli", "run", "--input", str(tmp_path / "in.parquet"),
            "--output", str(out), "--model", "tiny-gemma3", "--task", "raw", "--id-column",
            "id", "--batch-size", "4", "--max-new-tokens", "3", "--no-progress"]
    env = {**os.environ, "_GEMMA_BATCH_TEST_DIE_IN_PART_WRITE": str(marker),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)  # its own Ray: the workers inherit the variable
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # a worker did die in the middle of a write
    got = pq.read_table(out).column("id").to_pylist()
    assert Counter(got) == Counter(ids)  # nothing lost, nothing duplicated
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]  # no half file left
    assert (out / "_SUCCESS").exists() and not (out / "_parts").exists()
