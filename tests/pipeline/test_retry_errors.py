"""`run --retry-errors`: only a finished output's error rows are generated again (counted as they
are committed), each id stays exactly once, the summary says what was retried, and a retry cut
short leaves the published output as it was and is finished by the next retry."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pl_helpers import read_output, tiny_spec, write_shard

from jobs.cli import main
from pipeline.errors import JobError
from pipeline.run import run_job
from pipeline.spec import build_spec

IDS = [f"d{i}" for i in range(11)]
NULL_ROW, LONG_ROW = "d9", "d10"


def _corpus(tmp_path) -> str:
    texts = [f"Row {i} is a short document." for i in range(9)] + [None, "word " * 300]
    write_shard(str(tmp_path / "in" / "s0.parquet"), pa.table({"id": IDS, "text": texts}))
    return str(tmp_path / "in")


def _outputs(out) -> dict[str, tuple]:
    t = read_output(str(out)).to_pylist()
    assert sorted(r["id"] for r in t) == sorted(IDS)  # each id exactly once
    return {r["id"]: (r["output"], r["finish_reason"], r["error_kind"]) for r in t}


def _run(spec: dict) -> tuple[dict, list]:
    generated: list = []
    parts = f"{spec['output']}/_parts"

    def seen(records: pa.Table) -> None:  # the driver gets records; the ids are in the parts
        assert "output" not in records.column_names
        for name in records.column("part").to_pylist():
            generated.extend(pq.read_table(f"{parts}/{name}", columns=["id"]).column("id")
                             .to_pylist())

    summary = run_job(build_spec(spec), progress=False, on_commit=seen)
    return summary, generated


def test_retry_errors_regenerates_only_the_error_rows(ray_cluster, tmp_path):
    inp, out = _corpus(tmp_path), tmp_path / "out"
    first, generated = _run(tiny_spec(inp, str(out), id_column="id", max_prompt_tokens=64))
    assert first["errors_by_kind"] == {"empty": 1, "too_long": 1} and len(generated) == 11
    before = _outputs(out)

    # A larger max_prompt_tokens fixes the long row; the null row stays an error.
    retry = tiny_spec(inp, str(out), id_column="id", retry_errors=True)
    summary, generated = _run(retry)
    assert sorted(generated) == sorted([NULL_ROW, LONG_ROW])  # the engine saw only these
    assert summary["rows_generated_this_run"] == 2
    assert summary["rows_out"] == 11 and summary["errors_by_kind"] == {"empty": 1}
    after = _outputs(out)
    assert {k: v for k, v in after.items() if k not in (NULL_ROW, LONG_ROW)} == {
        k: v for k, v in before.items() if k not in (NULL_ROW, LONG_ROW)}
    assert after[LONG_ROW][1] in ("stop", "length") and after[NULL_ROW][2] == "empty"
    written = json.loads((out / "_SUMMARY.json").read_text())
    assert written["errors"] == 1 and written["mode"] == "retry_errors"
    (last,) = written["retries"]
    assert last["rows_retried"] == 2 and last["errors_before"] == 2
    assert last["errors_after"] == 1 and last["spec_changes"] == {"max_prompt_tokens": [64, None]}
    assert read_output(str(out / "_ERRORS.parquet")).column("id").to_pylist() == [NULL_ROW]
    batches = [json.loads(x) for x in (out / "_BATCHES.jsonl").read_text().splitlines()]
    assert sum(b["rows"] for b in batches) == 11 + 2  # the run's batches, then the retry's
    assert (out / "_SUCCESS").exists() and (out / "_REPORT.html").exists()
    assert not (out / "_parts").exists()

    # A retry cut short after committing its rows: the published output is untouched ...
    def cut(_t: pa.Table) -> None:
        raise RuntimeError("cut short")

    with pytest.raises(JobError):
        run_job(build_spec(retry), progress=False, on_commit=cut)
    assert (out / "_SUCCESS").exists() and _outputs(out) == after
    assert json.loads((out / "_SUMMARY.json").read_text()) == written
    # ... and the next retry publishes what it committed without generating anything again.
    summary, generated = _run(retry)
    assert generated == [] and summary["rows_generated_this_run"] == 0
    assert _outputs(out)[NULL_ROW][2] == "empty" and len(summary["retries"]) == 2
    assert summary["errors_by_kind"] == {"empty": 1} and not (out / "_parts").exists()


def test_retry_errors_refusals(tmp_path, capsys):
    inp = _corpus(tmp_path)
    base = ["run", "--input", inp, "--id-column", "id", "--model", "tiny-gemma3"]
    assert main([*base, "--output", str(tmp_path / "none"), "--retry-errors"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "x"), "--retry-errors", "--overwrite"]) == 2
    assert "retry_errors works on a finished output" in capsys.readouterr().err
