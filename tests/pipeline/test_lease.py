"""One writer per output: the lease (`_LEASE.json`) is taken atomically, refuses a second run
with one line naming the holder, is taken over once stale and released at the end; and
`_SUCCESS` is written only after the published shards are checked against the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pl_helpers import tiny_spec, write_corpus

from jobs.cli import main
from pipeline.errors import InputError, JobError
from pipeline.lease import LEASE, TIMEOUT_ENV, Holder, Lease, fence, read
from pipeline.output import OutputDir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "memory", "s3", "gs"])
def out_url(request, tmp_path) -> str:
    name = f"lease-{uuid.uuid4().hex[:8]}/out"
    if request.param == "local":
        return str(tmp_path / name)
    if request.param == "memory":
        return f"memory://{name}"
    request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return f"{request.param}://test-bucket/{name}"


def _foreign(d: OutputDir, heartbeat_age: float, timeout: float = 60.0,
             token: str = "their-token") -> Holder:
    """Writes the lease of a run elsewhere whose last heartbeat is `heartbeat_age` s old."""
    now = time.time()
    h = Holder(token, "elsewhere", 4242, "gemma-batch run (new)", now - 600,
               now - heartbeat_age, timeout)
    d.write_bytes(LEASE, h.to_json())
    return h


def test_take_refuse_takeover_release(out_url, monkeypatch, caplog):
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    out = OutputDir(out_url)
    with Lease(out, "gemma-batch run (new)") as lease:
        held = read(out)
        assert held.token == lease.me.token and held.pid == os.getpid() and held.timeout_s == 2
        assert json.loads(out.fs.cat_file(out._p(LEASE)))["owner"]["command"] == (
            "gemma-batch run (new)")
        with pytest.raises(InputError, match=rf"pid {os.getpid()} \(gemma-batch run \(new\)\)"):
            Lease(out, "second").take()  # one writer, even within a process
        assert out.mode(overwrite=False, resume=False) == "new"  # our own lease alone
        out.write_bytes("part-00000.parquet", b"x")
        out.clear_ours()  # --overwrite keeps the lease it holds
        assert out.ls() == [LEASE] and read(out).token == lease.me.token
    assert not out.exists(LEASE)  # released

    _foreign(out, heartbeat_age=1)  # live, held elsewhere
    for attempt in (lambda: out.mode(overwrite=True, resume=False),
                    lambda: Lease(out, "mine").take()):
        with pytest.raises(InputError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and "elsewhere pid 4242 (gemma-batch run (new))" in msg
        assert re.search(r"last heartbeat \d+ s ago", msg), msg
        assert "may be taken over" in msg and "60 s without one" in msg
    assert read(out).token == "their-token"  # refused: left as it was

    _foreign(out, heartbeat_age=100)  # stale: its run died before writing anything
    assert out.mode(overwrite=False, resume=True) == "new"
    with caplog.at_level("WARNING", logger="pipeline.lease"), Lease(out, "mine") as lease:
        assert read(out).token == lease.me.token
        assert "taking over the stale lease of elsewhere pid 4242" in caplog.text
        _foreign(out, heartbeat_age=0)  # taken from us meanwhile
        with pytest.raises(JobError, match="lost its lease"):
            lease.check()
    assert read(out).token == "their-token"  # not ours any more: not removed


def test_heartbeat_keeps_the_lease_live(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "0.8")
    out = OutputDir(str(tmp_path / "out"))
    with Lease(out, "run") as lease:
        first = read(out).heartbeat
        time.sleep(2.0)  # 2.5 takeover times
        now = read(out)
        assert now.token == lease.me.token and now.heartbeat > first and not now.stale()
        lease.check()


def test_workers_write_parts_only_while_their_runs_lease_is_live(tmp_path, monkeypatch):
    from pipeline import parts

    monkeypatch.setenv(TIMEOUT_ENV, "60")
    out = OutputDir(str(tmp_path / "out"))
    table = pa.table({"id": ["a", "b"]})
    record = {"batch": "b-1", "rows": 2, "prompt_tokens": 5, "output_tokens": 7, "errors": 0,
              "latency_s": 0.1}
    with Lease(out, "run") as lease:
        assert fence(out, lease.me.token) is None
        ok = parts.commit(out.given, table, record, "{}", lease.me.token).to_pylist()[0]
        assert ok["error"] is None and ok["part"] == "b-1.parquet"
        assert out.exists(OutputDir.PARTS + "/b-1.parquet")
        late = parts.commit(out.given, table, {**record, "batch": "b-2"}, "{}", "dead-run")
        assert "taken over by another run" in late.column("error")[0].as_py()
        assert late.column("part")[0].as_py() == ""
        assert not out.exists(OutputDir.PARTS + "/b-2.parquet")
    _foreign(out, heartbeat_age=100, token="dead-run")  # its driver stopped beating
    assert "went stale" in fence(out, "dead-run") and "this batch was not written" in (
        parts.commit(out.given, table, {**record, "batch": "b-3"}, "{}", "dead-run")
        .column("error")[0].as_py())
    assert not out.exists(OutputDir.PARTS + "/b-3.parquet")


def test_output_changed_before_the_lease_is_refused(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    out.write_bytes(f"{OutputDir.PARTS}/a.parquet", b"x")
    mode = out.mode(overwrite=False, resume=True)  # preflight: "resume"
    out.write_bytes(OutputDir.SUCCESS, b"")  # another run finished before we took the lease
    with Lease(out, "run"), pytest.raises(InputError, match="changed while this run started"):
        out.confirm_mode(mode, overwrite=False, resume=True)
    assert out.ls() == [OutputDir.SUCCESS, OutputDir.PARTS]  # left as it was, lease released


@pytest.mark.parametrize("where", ["local", "memory"])
def test_racing_takers_one_wins(where, tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    url = str(tmp_path / "out") if where == "local" else f"memory://race-{uuid.uuid4().hex}"
    start, won, refused = threading.Barrier(4), [], []

    def take() -> None:
        lease = Lease(OutputDir(url), "racer")
        start.wait()
        try:
            lease.take()
            won.append(lease)
        except InputError:
            refused.append(lease)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    assert read(OutputDir(url)).token == won[0].me.token
    won[0].release()


def test_publish_checks_shards_before_success(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    t = pa.table({"id": ["a", "b", "c"]})

    def stage(*names: str) -> None:
        for i, name in enumerate(names):
            out.stage(name, t.slice(0, 3 - i))  # 3 rows, then 2

    bad = [  # (staged, listed, rows_out, rows per shard), each a broken publish
        (["part-00000.parquet"], ["part-00000.parquet", "part-00001.parquet"], 3, None),
        (["part-00000.parquet", "part-00001.parquet"], ["part-00000.parquet",
                                                         "part-00001.parquet"], 6, None),
        (["part-00000.parquet", "part-00001.parquet"], ["part-00000.parquet",
                                                         "part-00001.parquet"], 5,
         {"part-00001.parquet": 3}),
        (["part-00000.parquet"], ["part-00000.parquet"], 3, None),  # + a stray shard
    ]
    expect = ["part-00001.parquet is missing", "shards hold 5 rows but the summary states 6",
              "part-00001.parquet holds 2 rows, not 3", "part-00007.parquet is not one of"]
    side: list = []
    for (staged, listed, rows_out, rows), msg in zip(bad, expect):
        out.clear_staging()
        stage(*staged)
        if "00007" in msg:
            out.write_table("part-00007.parquet", t)  # e.g. left by another run
        with pytest.raises(JobError, match=msg) as e:
            out.publish(listed, {"rows_out": rows_out}, lambda: side.append(1), rows=rows)
        assert "\n" not in str(e.value) and "rerun with --resume" in str(e.value)
        assert not out.exists(OutputDir.SUCCESS) and not out.exists(OutputDir.SUMMARY)
        assert not side  # side files come after the check
    out.clear_staging()
    stage("part-00000.parquet", "part-00001.parquet")
    out.publish(["part-00000.parquet", "part-00001.parquet"], {"rows_out": 5},
                rows={"part-00000.parquet": 3, "part-00001.parquet": 2})
    assert out.exists(OutputDir.SUCCESS) and out.read_json(OutputDir.SUMMARY)["rows_out"] == 5


# -- two runs on one output (Ray) ---------------------------------------------------------------

_HELD_RUN = """
import json, sys, time
from pathlib import Path
from pipeline.run import run_job
from pipeline.spec import build_spec

go = Path(sys.argv[2])
def wait_for_go(table):  # hold the run (and its lease) after its first committed batch
    deadline = time.time() + 300
    while not go.exists() and time.time() < deadline:
        time.sleep(0.1)
s = run_job(build_spec(json.loads(sys.argv[1])), progress=False, on_commit=wait_for_go)
print("rows", s["rows_out"])
"""


def _env(ray_address: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_address, **extra,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file but the lease (its heartbeat goes on) and temp files, with size and mtime."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file() and p.name != LEASE
            and not p.name.startswith(".tmp-")}


def _untouched(out: Path, before: dict[str, tuple[int, int]]) -> None:
    """Nothing in `before` was changed or removed, and nothing was added outside `_parts/`
    (where the holder's actors may still be writing parts)."""
    after = _files(out)
    assert {k: after.get(k) for k in before} == before
    assert {k for k in after if not k.startswith("_parts/")} == {
        k for k in before if not k.startswith("_parts/")}


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
            "tiny-gemma3", "--task", "raw", "--id-column", "id", "--batch-size", "2",
            "--max-new-tokens", "4", "--no-progress", *extra]


def test_second_run_on_a_held_output_is_refused(ray_cluster, tmp_path, capsys):
    ids = write_corpus(str(tmp_path / "in"), shards=2, rows=4)
    out, go = tmp_path / "out", tmp_path / "go"
    spec = tiny_spec(str(tmp_path / "in"), str(out), id_column="id", batch_size=2)
    first = subprocess.Popen([sys.executable, "-c", _HELD_RUN, json.dumps(spec), str(go)],
                             env=_env(ray_cluster), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not any((out / "_parts").glob("*.parquet")):  # the first run is mid-way
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline, "the first run committed nothing in 240 s"
            time.sleep(0.2)
        before = _files(out)
        for extra in ([], ["--overwrite"], ["--resume"]):
            line = _refused(capsys, _argv(tmp_path, *extra))
            assert "is being written by another run" in line, line
            assert f"pid {first.pid} (gemma-batch run (new))" in line, line
            assert "may be taken over" in line, line
        _untouched(out, before)  # the refused runs wrote nothing
        assert read(OutputDir(str(out))).pid == first.pid
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert f"rows {len(ids)}" in stdout
    got = pq.read_table(out).column("id").to_pylist()
    assert Counter(got) == Counter(ids)  # every id exactly once
    assert (out / "_SUCCESS").exists() and not (out / LEASE).exists()


def test_killed_run_lease_is_taken_over_when_stale(ray_cluster, tmp_path, capsys, monkeypatch,
                                                   caplog):
    timeout = "4"
    monkeypatch.setenv(TIMEOUT_ENV, timeout)
    ids = write_corpus(str(tmp_path / "in"), shards=3, rows=6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *_argv(tmp_path)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(ray_cluster, **{
            TIMEOUT_ENV: timeout, "_GEMMA_BATCH_TEST_KILL_DRIVER_AFTER_PARTS": "2"}))
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == -9, stderr[-2000:]  # SIGKILLed holding the lease
    before = _files(out)
    holder = read(OutputDir(str(out)))
    assert holder is not None and holder.pid == proc.pid and holder.timeout_s == 4

    line = _refused(capsys, _argv(tmp_path, "--resume"))  # at once: still live
    assert f"pid {proc.pid} (gemma-batch run (new))" in line and "may be taken over" in line
    _untouched(out, before)

    time.sleep(max(0.0, holder.heartbeat + holder.timeout_s + 0.5 - time.time()))
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        assert main(_argv(tmp_path, "--resume")) == 0, capsys.readouterr().err
    assert f"taking over the stale lease of {holder.host} pid {proc.pid}" in caplog.text
    got = pq.read_table(out).column("id").to_pylist()
    assert Counter(got) == Counter(ids)  # each id exactly once
    assert (out / "_SUCCESS").exists() and not (out / LEASE).exists()
    assert not (out / "_parts").exists()
