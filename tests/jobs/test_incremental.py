"""Incremental scheduled runs, driven through the scheduler's local mode on a clock that jumps
to each tick: each run generates exactly the rows that are new or changed since the last
successful run (a killed run marks nothing done), and a run with nothing new publishes an empty,
valid output without starting actors."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.schedule import run_schedule
from pipeline.spec import build_spec

CRON = "0 2 * * *"  # nightly; the clock below jumps there
_JAX_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gemma-batch-test-jax-cache")


class JumpingClock:
    """A UTC clock whose sleep() moves time on instead of waiting."""

    def __init__(self, start: dt.datetime):
        self.t = start

    def now(self) -> dt.datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


def _shard(path: Path, rows: dict[str, str]) -> None:
    pq.write_table(pa.table({"id": list(rows), "text": list(rows.values())}), path)


def _output(run_dir: Path) -> tuple[pa.Table, dict]:
    parts = sorted(run_dir.glob("part-*.parquet"))
    assert parts and (run_dir / "_SUCCESS").exists(), sorted(p.name for p in run_dir.iterdir())
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table, json.loads((run_dir / "_SUMMARY.json").read_text())


def test_three_incremental_runs_generate_only_new_and_changed_rows(ray_cluster, tmp_path,
                                                                  monkeypatch):
    # The local runs (`gemma-batch run` subprocesses) join the session's Ray cluster.
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("GEMMA_BATCH_JAX_CACHE", _JAX_CACHE)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    a = {f"a{i}": f"Alpha document number {i}." for i in range(4)}
    b = {f"b{i}": f"Beta document number {i}." for i in range(4)}
    _shard(inp / "shard-a.parquet", a)
    _shard(inp / "shard-b.parquet", b)
    spec = build_spec({
        "input": str(inp), "output": str(out / "run-{run}"), "model": "tiny-gemma3",
        "task": "raw", "id_column": "id", "batch_size": 4, "sampling": {"max_new_tokens": 2},
        "incremental": True})
    clock = JumpingClock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc))
    said: list[str] = []

    def tick() -> int:  # one scheduled run; the state file carries the count across calls
        return run_schedule(spec, CRON, local=True, max_runs=1, state_path=tmp_path / "s.json",
                            say=said.append, now=clock.now, sleep=clock.sleep, poll_s=0.2)

    def generated(run: int, expected: set[str]) -> dict:
        table, summary = _output(out / f"run-{run}")
        ids = Counter(table.column("id").to_pylist())
        assert ids == Counter(expected), (run, ids)  # exactly those rows, each id once
        assert summary["rows_generated_this_run"] == len(expected)  # rows the engine ran
        assert summary["incremental"]["rows_to_generate"] == len(expected)
        return summary

    assert tick() == 0
    generated(1, set(a) | set(b))
    ledger = out / "_LEDGER" / "ledger.parquet"  # beside the outputs: the template's parent
    assert sorted(pq.read_table(ledger).column("id").to_pylist()) == sorted([*a, *b])

    # Between runs the input gains 5 rows and 2 rows change.
    c = {f"c{i}": f"Gamma document number {i}." for i in range(5)}
    _shard(inp / "shard-c.parquet", c)
    a["a1"], b["b2"] = "Alpha one, rewritten.", "Beta two, rewritten."
    _shard(inp / "shard-a.parquet", a)
    _shard(inp / "shard-b.parquet", b)
    assert tick() == 0
    inc = generated(2, {*c, "a1", "b2"})["incremental"]
    assert (inc["new"], inc["changed"], inc["unchanged"], inc["deleted"]) == (5, 2, 6, 0)
    assert any("run 2" in s and "7 rows new or changed" in s for s in said), said

    # Again 5 new rows and 2 changed, and one row deleted; this run is killed after its first
    # committed part, so the ledger must not move and the next run does the same rows.
    d = {f"d{i}": f"Delta document number {i}." for i in range(5)}
    _shard(inp / "shard-d.parquet", d)
    a["a2"], c["c0"] = "Alpha two, rewritten.", "Gamma zero, rewritten."
    del b["b0"]
    for name, rows in (("a", a), ("b", b), ("c", c)):
        _shard(inp / f"shard-{name}.parquet", rows)
    before = ledger.read_bytes()
    monkeypatch.setenv("_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS", "1")
    assert tick() == 1
    monkeypatch.delenv("_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS")
    assert not (out / "run-3" / "_SUCCESS").exists() and ledger.read_bytes() == before
    assert tick() == 0
    inc = generated(4, {*d, "a2", "c0"})["incremental"]
    assert (inc["new"], inc["changed"], inc["deleted"], inc["deleted_sample"]) == (5, 2, 1, ["b0"])
    assert "b0" not in pq.read_table(ledger).column("id").to_pylist()

    # Nothing new: an empty output with the output schema, a summary saying so, no actors.
    assert tick() == 0
    table, summary = _output(out / "run-5")
    assert table.num_rows == 0
    assert table.schema.equals(_output(out / "run-4")[0].schema, check_metadata=False)
    assert summary["incremental"]["nothing_new"] and summary["rows_generated_this_run"] == 0
    assert summary["batches"] == 0 and summary["mesh"] is None  # no actor ever ran
    assert "nothing new" in summary["note"]
    state = json.loads((tmp_path / "s.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["SUCCEEDED"] * 2 + ["FAILED"] + \
        ["SUCCEEDED"] * 2
    fires = [dt.datetime.fromisoformat(r["fire"]) for r in state["runs"]]
    assert all(f.hour == 2 and f.minute == 0 for f in fires) and fires == sorted(set(fires))


def test_incremental_flags_spec_field_and_template_rules(tmp_path):
    from jobs.cli import build_parser
    from jobs.flags import spec_from_args
    from jobs.schedule import check_template, run_ledger
    from pipeline.spec import SpecError

    parser = build_parser()
    base = ["schedule", "--input", "gs://b/in/", "--output", "gs://b/sums/{date}/", "--cron",
            "0 2 * * *"]
    spec = spec_from_args(parser.parse_args(base + ["--incremental"]))
    assert spec.incremental is not None and spec.incremental.ledger is None
    assert run_ledger(spec) == "gs://b/sums/_LEDGER"  # beside the outputs
    spec = spec_from_args(parser.parse_args(base + ["--ledger", "gs://b/ledgers/sums"]))
    assert run_ledger(spec) == "gs://b/ledgers/sums"  # --ledger alone turns it on
    assert spec_from_args(parser.parse_args(base)).incremental is None
    file = tmp_path / "job.yaml"
    file.write_text("input: gs://b/in/\noutput: gs://b/sums/{run}/\nincremental: true\n")
    spec = spec_from_args(parser.parse_args(["run", str(file), "--ledger", "gs://b/L"]))
    assert spec.incremental.ledger == "gs://b/L"
    file.write_text("input: gs://b/in/\noutput: gs://b/s/{run}/\nincremental: {ledger: gs://b/K}\n")
    assert spec_from_args(parser.parse_args(["run", str(file), "--incremental"])).incremental \
        .ledger == "gs://b/K"  # the switch keeps the file's ledger
    # Incremental runs each keep their own rows: a fixed output is refused, even with overwrite.
    fixed = build_spec({"input": "gs://b/in/", "output": "gs://b/sums/", "overwrite": True,
                        "incremental": True})
    with pytest.raises(SpecError, match="same for every incremental run"):
        check_template(fixed)
    with pytest.raises(SpecError, match="retry_errors does not apply to incremental"):
        build_spec({"input": "gs://b/in/", "output": "gs://b/s/x/", "retry_errors": True,
                    "incremental": True})


def test_validate_says_what_an_incremental_run_would_generate(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "in").mkdir()
    _shard(tmp_path / "in" / "s.parquet", {"x1": "one", "x2": "two", "x3": "three"})
    argv = ["validate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o" / "1"),
            "--model", "tiny-gemma3", "--task", "raw", "--incremental"]
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "incremental: 3 rows to generate (3 new, 0 changed), 0 unchanged, 0 deleted" in line
    assert main(argv + ["--json"]) == 0
    inc = json.loads(capsys.readouterr().out)["incremental"]
    assert inc["new"] == 3 and inc["ledger"] == str(tmp_path / "o" / "_LEDGER")
