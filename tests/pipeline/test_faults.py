"""Fault injection: a generator actor killed mid-run, and the driver killed mid-run + --resume.

Both kills are deterministic: right after the first committed part (run_job's on_commit) and
right after the third (the driver's after-N-parts hook), never a timer racing the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.run import run_job
from pipeline.spec import build_spec

from pl_helpers import tiny_spec, write_corpus

REPO = Path(__file__).resolve().parents[2]


def _committed(out: Path) -> list:
    ids: list = []
    for p in sorted((out / "_parts").glob("*.parquet")):
        try:
            ids += pq.read_table(p, columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException):
            pass  # being written
    return ids


def _predictor_actors() -> dict:
    import ray._private.state

    return {aid: a for aid, a in ray._private.state.actors().items()
            if "Predictor" in a["ActorClassName"]}


def test_actor_killed_mid_run(ray_cluster, tmp_path):
    import ray

    ids = write_corpus(str(tmp_path / "in"), shards=2, rows=20)
    out = tmp_path / "out"
    before = set(_predictor_actors())
    killed: dict = {}
    commits: list[int] = []  # rows of each committed part, in commit order

    def kill_after_first_commit(table: pa.Table) -> None:
        commits.append(sum(table.column("rows").to_pylist()))  # the actors' batch records
        if killed:
            return
        alive = [k for k, a in _predictor_actors().items()
                 if k not in before and a["State"] == "ALIVE"]
        handle = ray._private.worker.global_worker.core_worker.get_actor_handle(
            ray.ActorID.from_hex(alive[0]))
        killed.update(id=alive[0], alive=len(alive), at_commit=len(commits),
                      rows_done=sum(commits))
        ray.kill(handle, no_restart=False)

    # 20 parts of 2 rows x 32 tokens; the actor dies right after the first is committed.
    spec = tiny_spec(str(tmp_path / "in"), str(out), id_column="id", batch_size=2,
                     sampling={"max_new_tokens": 32})
    summary = run_job(build_spec(spec), progress=False, on_commit=kill_after_first_commit)

    assert killed["at_commit"] == 1 and killed["rows_done"] == 2, killed
    assert len(commits) > 1 and sum(commits) == len(ids)  # the job went on after the kill
    assert _predictor_actors()[killed["id"]]["NumRestarts"] >= 1  # restarted, batch retried
    got = pq.read_table(out).column("id").to_pylist()
    assert Counter(got) == Counter(ids)  # nothing lost, nothing duplicated
    assert summary["rows_out"] == len(ids) and summary["errors"] == 0


def test_driver_killed_then_resume(ray_cluster, tmp_path):
    ids = write_corpus(str(tmp_path / "in"), shards=3, rows=6)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.cli", "run", "--input", str(tmp_path / "in"),
            "--output", str(out), "--model", "tiny-gemma3", "--task", "raw", "--id-column",
            "id", "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster,
           "_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS": "3",
           "GEMMA_BATCH_LEASE_TIMEOUT_S": "2",  # its lease may be taken over 2 s after the kill
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before_run = set(_predictor_actors())
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed mid-run
    # Its actors (which write the parts) may finish a batch in flight until Ray ends them.
    deadline = time.monotonic() + 60
    while any(a["State"] != "DEAD" for k, a in _predictor_actors().items()
              if k not in before_run) and time.monotonic() < deadline:
        time.sleep(0.2)
    # A worker process may outlive its actor's DEAD state by a moment; it writes no part once
    # the killed run's lease is stale (workers fence on it): wait for that, then for the parts
    # to stay as they are.
    time.sleep(2.5)
    committed, deadline = _committed(out), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if sorted(now := _committed(out)) == sorted(committed):
            break
        committed = now
    assert not (out / "_SUCCESS").exists() and not list(out.glob("part-*.parquet"))
    assert 0 < len(committed) < len(ids) and len(set(committed)) == len(committed)
    before = {r["id"]: r["output"] for p in (out / "_parts").glob("*.parquet")
              for r in pq.read_table(p).to_pylist()}

    # Without --resume the unfinished output is refused (and left as it was) ...
    spec = tiny_spec(str(tmp_path / "in"), str(out), id_column="id", batch_size=2)
    with pytest.raises(InputError, match=r"holds an unfinished run; pass --resume to continue "
                                         r"it or --overwrite to start over"):
        run_job(build_spec(spec), progress=False)
    assert sorted(_committed(out)) == sorted(committed)
    # ... with it only the rest is generated.
    summary = run_job(build_spec({**spec, "resume": True}), progress=False)
    assert summary["rows_resumed"] == len(committed)
    assert summary["rows_generated_this_run"] == len(ids) - len(committed)
    final = pq.read_table(out).to_pylist()
    assert Counter(r["id"] for r in final) == Counter(ids)  # each id exactly once
    assert all(r["output"] == before[r["id"]] for r in final if r["id"] in before)
    assert (out / "_SUCCESS").exists() and not (out / "_parts").exists()


def test_model_that_fails_to_load_in_the_actor(ray_cluster, tmp_path, capsys):
    from jobs.cli import main

    write_corpus(str(tmp_path / "in"), shards=1, rows=2)
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # passes preflight, fails in the actor
    spec = tmp_path / "spec.yaml"
    spec.write_text("resources: {max_restarts: 0}\n")
    code = main(["run", str(spec), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--model", str(bad), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "CheckpointError" in err[0] and "model_type" in err[0]
    assert "nothing was written" in err[0]
    assert not (tmp_path / "out").exists()
