"""The job commands that need no cluster: schedule --dry-run (against croniter itself), spec
--schema (validates the shipped examples) and init (its file validates)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from croniter import croniter

from jobs.cli import main
from jobs.schedule import next_fire, ticks
from jobs.spec_cli import schema

EXAMPLES = sorted((Path(__file__).parents[2] / "jobs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("expr,tz", [("0 2 * * *", None), ("*/15 9-17 * * 1-5", "Europe/Berlin"),
                                     ("30 1 * * 0", "America/New_York"), ("0 0 1 * *", "UTC")])
def test_dry_run_ticks_are_croniters(expr, tz):
    start = dt.datetime(2026, 3, 27, 23, 50, tzinfo=dt.timezone.utc)  # spans a DST change
    zone = ZoneInfo(tz) if tz else dt.timezone.utc
    it = croniter(expr, start.astimezone(zone))
    assert ticks(expr, 12, start, zone) == [it.get_next(dt.datetime) for _ in range(12)]
    # The scheduler fires at the same instants (in UTC).
    assert next_fire(expr, start, zone) == ticks(expr, 1, start, zone)[0]


def test_dry_run_cli_prints_n_ticks(capsys):
    before = dt.datetime.now(dt.timezone.utc)
    assert main(["schedule", "--cron", "0 2 * * *", "--tz", "Asia/Tokyo", "--dry-run", "4"]) == 0
    after = dt.datetime.now(dt.timezone.utc)
    printed = [dt.datetime.fromisoformat(x) for x in capsys.readouterr().out.split()]
    zone = ZoneInfo("Asia/Tokyo")

    def expected(t: dt.datetime) -> list[dt.datetime]:
        it = croniter("0 2 * * *", t.astimezone(zone))
        return [it.get_next(dt.datetime) for _ in range(4)]

    assert printed in (expected(before), expected(after))  # a tick may pass during the call
    assert all(p.utcoffset() == dt.timedelta(hours=9) for p in printed)
    assert main(["schedule", "--cron", "0 2 * * *", "--dry-run", "1", "--tz", "No/Where"]) == 2


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_schema_validates_shipped_examples(example, capsys):
    assert main(["spec", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schema()
    jsonschema.validate(yaml.safe_load(example.read_text()), printed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"input": "x", "output": "y", "batch_size": "many"}, printed)


def test_init_writes_a_spec_that_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    body = yaml.safe_load((tmp_path / "job.yaml").read_text())
    jsonschema.validate(body, schema())
    assert "# " in (tmp_path / "job.yaml").read_text()  # commented
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}),
                   tmp_path / "data" / "part-0.parquet")
    capsys.readouterr()
    assert main(["validate", "job.yaml"]) == 0, capsys.readouterr().err
    assert "id column 'id'" in capsys.readouterr().out
    assert main(["init", "job.yaml"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
