"""The first run as a new user makes it: an input column named `id` is the id without any flag,
`id_column: null` (or --id-column '') derives ids, and the spec ships with that choice intact."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from pl_helpers import read_output, tiny_spec, write_corpus, write_shard

from jobs.flags import add_job_flags, spec_from_args
from pipeline.preflight import preflight
from pipeline.run import run_job
from pipeline.spec import build_spec


def _flags(*argv: str):
    p = argparse.ArgumentParser()
    add_job_flags(p)
    return spec_from_args(p.parse_args(list(argv)))


def test_id_column_default_is_the_inputs_id(tmp_path):
    ids = write_corpus(str(tmp_path / "in"), shards=2, rows=2)
    plan, _, _ = preflight(build_spec(tiny_spec(str(tmp_path / "in"), str(tmp_path / "o1"))))
    assert plan.id_column == "id" and not plan.derived_ids and plan.id_type == pa.string()
    assert "id" not in plan.carry and "input_id" not in plan.carry.values()
    assert plan.carry == {"lang": "lang"} and plan.total_rows == len(ids)

    spec = build_spec(tiny_spec(str(tmp_path / "in"), str(tmp_path / "o2"), id_column=None))
    plan, _, _ = preflight(spec)
    assert plan.id_column is None and plan.derived_ids and plan.carry["id"] == "input_id"

    # The CLI: no flag = the `id` column; --id-column '' = derived ids.
    base = ("--input", str(tmp_path / "in"), "--output", str(tmp_path / "o3"))
    assert preflight(_flags(*base))[0].id_column == "id"
    assert preflight(_flags(*base, "--id-column", ""))[0].derived_ids


def test_no_id_column_derives_ids_and_named_column_wins(tmp_path):
    write_shard(str(tmp_path / "in" / "a.parquet"),
                pa.table({"key": [7, 8], "text": ["a", "b"]}))
    plan, _, _ = preflight(build_spec(tiny_spec(str(tmp_path / "in"), str(tmp_path / "o"))))
    assert plan.derived_ids and plan.carry == {"key": "key"}
    plan, _, _ = preflight(build_spec(tiny_spec(str(tmp_path / "in"), str(tmp_path / "o"),
                                                id_column="key")))
    assert plan.id_column == "key" and plan.id_type == pa.int64()


def test_explicit_null_survives_the_trip_to_a_cluster(tmp_path):
    """submit and schedule ship `spec.to_file()`: an explicit null stays null, unset stays unset."""
    null = build_spec(tiny_spec("in/", "out/", id_column=None))
    assert build_spec(null.to_file()).model_fields_set >= {"id_column"}
    assert "id_column" not in build_spec(build_spec(tiny_spec("in/", "out/")).to_file()
                                         ).model_fields_set


def test_id_column_id_is_kept_end_to_end(ray_cluster, tmp_path):
    ids = write_corpus(str(tmp_path / "in"), shards=2, rows=3)
    out = str(tmp_path / "out")
    summary = run_job(build_spec(tiny_spec(str(tmp_path / "in"), out)), progress=False)
    table = read_output(f"{out}/part-00000.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert "input_id" not in table.column_names and summary["rows_out"] == len(ids)


_FILTER_PROBE = r"""
import os, sys
from pipeline.quiet import NativeLogFilter
f = NativeLogFilter()
assert f.start() and sys.stderr.isatty() == os.isatty(sys.__stderr__.fileno())
os.write(2, b"[2026-12-02 14:25:03,521 E 18823 18823] core_worker.cc:2465: Actor with class\n")
os.write(2, b"native text\n[2026-12-02 14:25:03,600 W 1 2] raylet_client.cc:10: w\n")
os.write(2, b"[2026-12-02 14:25:03,700 F 1 2] logging.cc:1: fatal stays\n")
print("python line", file=sys.stderr)
os.write(2, b"\rbar 50%")
f.stop()
print("after", file=sys.stderr)
"""


def test_native_filter_drops_only_rays_native_lines():
    r = subprocess.run([sys.executable, "-c", _FILTER_PROBE], capture_output=True, text=True,
                       check=False,
                       timeout=60, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert "core_worker" not in r.stderr and "raylet_client" not in r.stderr, r.stderr
    for kept in ("native text", "fatal stays", "python line", "bar 50%", "after"):
        assert kept in r.stderr, r.stderr


def test_plain_run_prints_no_ray_internal_lines(tmp_path):
    """`gemma-batch run` as a user types it, on its own local Ray: stderr holds our progress and
    result lines only; Ray's core-worker line is in its session log instead."""
    write_corpus(str(tmp_path / "in"), shards=1, rows=2)
    ray_tmp = Path("/tmp") / f"gbq{os.getpid()}"  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", JAX_PLATFORMS="cpu")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "run", "--input", str(tmp_path / "in"),
             "--output", str(tmp_path / "out"), "--model", "tiny-gemma3", "--task", "raw",
             "--max-new-tokens", "2", "--batch-size", "2"],
            env=env, capture_output=True, text=True, timeout=540, cwd=Path(__file__).parents[2],
            check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        ours = ("gemma-batch: ", "done: ")
        strays = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(ours)]
        assert not strays, r.stderr[-3000:]
        assert "core_worker" not in r.stderr and "ray-project" not in r.stderr
        logs = [p.read_text(errors="replace")
                for p in ray_tmp.glob("ray/session_*/logs/python-core-driver-*.log")]
        assert any("constructor arguments in the object store" in t for t in logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
