"""The incremental ledger's rules without Ray: what preflight narrows a run to (new, changed,
settings changed, deleted), what read tasks then read, what `record` marks done, and refusals."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pl_helpers import tiny_spec, write_corpus, write_shard

from pipeline import ledger
from pipeline.errors import InputError
from pipeline.preflight import preflight
from pipeline.read import ReadSettings, read_unit, unit_from_json, unit_to_json
from pipeline.spec import build_spec


def _plan(inp: str, out: str, **kw):
    spec = build_spec(tiny_spec(inp, out, **{"incremental": True, **kw}))
    return spec, *preflight(spec)


def _read(spec, plan) -> pa.Table:
    rs = ReadSettings.of(spec, plan)  # units through their JSON form, as read tasks get them
    tables = [read_unit(unit_from_json(unit_to_json(u)), rs) for u in plan.units]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def _publish_as_generated(out_dir: str, rows: pa.Table, generation_errors: set = frozenset()):
    """Writes what a published output holds for the ledger (id, error_kind)."""
    os.makedirs(out_dir, exist_ok=True)
    ids = rows.column("id").to_pylist()
    kinds = ["generation" if i in generation_errors else None for i in ids]
    pq.write_table(pa.table({"id": rows.column("id"), "error_kind": pa.array(kinds, pa.string())}),
                   os.path.join(out_dir, "part-00000.parquet"))


def test_new_changed_deleted_and_generation_errors(tmp_path):
    inp, base = str(tmp_path / "in"), tmp_path / "out"
    ids = write_corpus(inp, shards=2, rows=4)
    spec, plan, out, _ = _plan(inp, str(base / "run-1"), id_column="id")
    assert plan.total_rows == 8 and plan.increment.new == 8
    rows = _read(spec, plan)
    assert rows.column("id").to_pylist() == ids
    _publish_as_generated(str(base / "run-1"), rows, generation_errors={"doc-1-3"})
    plan.increment.record(out, ["part-00000.parquet"], "run-1")
    led = pq.read_table(base / "_LEDGER" / ledger.FILE)  # the default: beside the outputs
    assert sorted(led.column("id").to_pylist()) == sorted(set(ids) - {"doc-1-3"})
    assert set(led.column("output").to_pylist()) == {out.fs.unstrip_protocol(out.path)}

    # doc-0-1 changes, doc-0-3 goes, doc-1-3 (its generation failed) is tried again.
    write_shard(f"{inp}/shard-0.parquet", pa.table({
        "id": ["doc-0-0", "doc-0-1", "doc-0-2"],
        "text": ["Row 0 of shard 0.", "Row 1, edited.", "Row 2 of shard 0."], "lang": ["en"] * 3}))
    spec, plan, out, _ = _plan(inp, str(base / "run-2"), id_column="id")
    inc = plan.increment.summary_fields()["incremental"]
    assert (inc["new"], inc["changed"], inc["unchanged"], inc["deleted"]) == (1, 1, 5, 1)
    assert inc["deleted_sample"] == ["doc-0-3"] and plan.total_rows == 2
    assert [u.rows for u in plan.units] == [(1,), (3,)]  # read tasks read only those rows
    rows = _read(spec, plan)
    assert rows.column("id").to_pylist() == ["doc-0-1", "doc-1-3"]
    assert "Row 1, edited." in rows.column(rows.column_names[1]).to_pylist()
    _publish_as_generated(str(base / "run-2"), rows)
    plan.increment.record(out, ["part-00000.parquet"], "run-2")
    led = pq.read_table(base / "_LEDGER" / ledger.FILE).to_pydict()
    where = dict(zip(led["id"], led["run"]))
    assert sorted(where) == sorted(set(ids) - {"doc-0-3"})  # the deleted id left the ledger
    assert where["doc-0-1"] == "run-2" and where["doc-0-0"] == "run-1"

    # Nothing changed: nothing to read, and the summary says so.
    spec, plan, out, _ = _plan(inp, str(base / "run-3"), id_column="id")
    fields = plan.increment.summary_fields()
    assert plan.total_rows == 0 and plan.units == [] and fields["incremental"]["nothing_new"]
    assert "nothing new" in fields["note"]


def test_settings_change_redoes_every_row_and_derived_ids(tmp_path):
    inp, base = str(tmp_path / "in"), tmp_path / "out"
    write_corpus(inp, shards=1, rows=3)
    spec, plan, out, _ = _plan(inp, str(base / "a"), id_column=None)  # ids: shard:row
    rows = _read(spec, plan)
    assert rows.column("id").to_pylist() == [f"shard-0.parquet:{i}" for i in range(3)]
    _publish_as_generated(str(base / "a"), rows)
    plan.increment.record(out, ["part-00000.parquet"], "a")
    _, plan, _, _ = _plan(inp, str(base / "b"), id_column=None)
    assert plan.total_rows == 0
    _, plan, _, _ = _plan(inp, str(base / "b"), id_column=None, sampling={"max_new_tokens": 5})
    assert plan.total_rows == 3 and plan.increment.settings_changed == 3
    _, plan, _, _ = _plan(inp, str(base / "b"), id_column="id")  # other ids: all new, all gone
    assert plan.increment.new == 3 and plan.increment.deleted == 3


def test_refusals_and_ledger_locations(tmp_path):
    inp, base = str(tmp_path / "in"), tmp_path / "out"
    write_corpus(inp, shards=1, rows=2)
    with pytest.raises(InputError, match="inside the output"):
        _plan(inp, str(base / "x"), id_column="id", incremental={"ledger": str(base / "x/_L")})
    # Overwriting an output whose rows the ledger counts as done would lose them.
    spec, plan, out, _ = _plan(inp, str(base / "x"), id_column="id")
    _publish_as_generated(str(base / "x"), _read(spec, plan))
    plan.increment.record(out, ["part-00000.parquet"], "x")
    (base / "x" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(InputError, match="overwriting it would lose"):
        _plan(inp, str(base / "x"), id_column="id", overwrite=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ledger.FILE).write_bytes(b"not parquet")
    with pytest.raises(InputError, match="unreadable"):
        _plan(inp, str(base / "y"), id_column="id", incremental={"ledger": str(tmp_path / "bad")})

    assert ledger.default_ledger("gs://b/sums/{date}/") == "gs://b/sums/_LEDGER"
    assert ledger.default_ledger("gs://b/{date}/sums/") == "gs://b/_LEDGER"
    assert ledger.default_ledger("s3://b/sums/2026-01-02") == "s3://b/sums/_LEDGER"
    assert ledger.default_ledger("/data/out/run-{run}") == "/data/out/_LEDGER"
    assert ledger.default_ledger("out") == "_LEDGER"
    assert ledger.default_ledger("gs://bucket/{date}") == "gs://bucket/_LEDGER"
    with pytest.raises(InputError, match="no parent directory"):
        ledger.default_ledger("gs://bucket")  # a bucket's root: say where the ledger goes


def test_ledger_on_gcs(gcs_server):
    from pipeline.storage import Dir

    base = f"gs://test-bucket/ledger-{os.urandom(4).hex()}"
    write_corpus(f"{base}/in", shards=1, rows=3)
    spec, plan, out, _ = _plan(f"{base}/in", f"{base}/out/2026-12-01", id_column="id")
    rows = _read(spec, plan)
    Dir(f"{base}/out/2026-12-01").write_table("part-00000.parquet", pa.table({
        "id": rows.column("id"), "error_kind": pa.nulls(rows.num_rows, pa.string())}))
    plan.increment.record(out, ["part-00000.parquet"], "r1")
    assert Dir(f"{base}/out/{ledger.LEDGER_DIR}").exists(ledger.FILE)
    _, plan, _, _ = _plan(f"{base}/in", f"{base}/out/2026-12-02", id_column="id")
    assert plan.total_rows == 0 and plan.increment.unchanged == 3
