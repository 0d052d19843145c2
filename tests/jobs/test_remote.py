"""submit / status / logs / schedule against a real Ray head with token auth, on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.schedule import check_template, next_fire, render_output
from pipeline.spec import JobSpec, SpecError

TOKEN = "gemma-batch-test-token-" + os.urandom(8).hex()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate Ray head (own temp dir, so nothing else attaches to it) with token auth."""
    tmp = tmp_path_factory.mktemp("rayhead")
    # Ray's socket paths must stay short.
    temp_dir = Path("/tmp") / f"gbh{os.getpid()}"
    port, dash = _port(), _port()
    # Every port explicit, so this head never collides with another Ray on the machine.
    ports = [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
             f"--metrics-export-port={_port()}", f"--runtime-env-agent-port={_port()}",
             f"--node-manager-port={_port()}", f"--object-manager-port={_port()}",
             "--min-worker-port=0", "--max-worker-port=0"]
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *ports],
        env=_env(), stdout=open(tmp / "head.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        try:
            req = urllib.request.Request(f"{url}/api/version",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(req, timeout=5).read()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("Ray head did not start:\n" + (tmp / "head.log").read_text()[-3000:])
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-f", str(temp_dir)], check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = [{"id": f"doc-{i}", "text": f"Document number {i} talks about topic {i % 3}."}
            for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), d / "part-0.parquet")
    return d


def _cli(*args: str, token: str | None = TOKEN, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=_env(token),
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_status_logs(ray_head, corpus, tmp_path):
    out = tmp_path / "out"
    r = _cli("submit", "--input", str(corpus), "--output", str(out), "--model", "tiny-gemma3",
             "--id-column", "id", "--max-new-tokens", "4", "--batch-size", "3",
             "--address", ray_head, "--job-id", "test-job-1", "--wait", "--timeout", "240")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[0] == "test-job-1"
    assert (out / "_SUCCESS").exists()
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == [f"doc-{i}" for i in range(6)]

    st = _cli("status", "test-job-1", "--address", ray_head, "--json")
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["model"] == "tiny-gemma3"
    assert "gemma-batch run job.yaml" in info["entrypoint"]

    logs = _cli("logs", "test-job-1", "--address", ray_head)
    assert logs.returncode == 0 and "done: 6 rows" in logs.stdout


def test_wrong_token_is_one_clear_line(ray_head, corpus, tmp_path):
    r = _cli("submit", "--input", str(corpus), "--output", str(tmp_path / "o"), "--model",
             "tiny-gemma3", "--address", ray_head, token="not-the-token", timeout=120)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "token" in err[0].lower(), r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_job_and_unreachable_cluster(ray_head):
    r = _cli("status", "no-such-job", "--address", ray_head, timeout=120)
    assert r.returncode == 1 and "no such job" in r.stderr
    r = _cli("status", "x", "--address", f"http://127.0.0.1:{_port()}", timeout=120)
    assert r.returncode == 1 and "cannot reach" in r.stderr
    r = _cli("status", "x", "--address", "127.0.0.1:6379", timeout=120)
    assert r.returncode == 1 and "not a Jobs API URL" in r.stderr


def test_schedule_submits_each_tick_to_the_cluster(ray_head, corpus, tmp_path):
    out = tmp_path / "runs" / "run-{run}"
    r = _cli("schedule", "--input", str(corpus), "--output", str(out), "--model", "tiny-gemma3",
             "--id-column", "id", "--max-new-tokens", "2", "--address", ray_head,
             "--cron", "* * * * * */2", "--max-runs", "2", "--state", str(tmp_path / "s.json"),
             timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    for n in (1, 2):
        assert (tmp_path / "runs" / f"run-{n}" / "_SUCCESS").exists()
    state = json.loads((tmp_path / "s.json").read_text())
    assert [x["status"] for x in state["runs"]] == ["SUCCEEDED", "SUCCEEDED"]


def test_schedule_refuses_same_output_every_run_and_bad_cron(tmp_path):
    spec = JobSpec(input=str(tmp_path), output=str(tmp_path / "fixed"))
    with pytest.raises(SpecError, match="same for every scheduled run"):
        check_template(spec)
    check_template(spec.model_copy(update={"output": str(tmp_path / "{date}")}))
    with pytest.raises(SpecError, match="unknown placeholder"):
        render_output("gs://b/{nope}/", dt.datetime(2026, 1, 2), 1)
    with pytest.raises(SpecError, match="not a cron expression"):
        next_fire("every day", dt.datetime(2026, 1, 1))
    r = _cli("schedule", "--input", str(tmp_path), "--output", str(tmp_path / "x"),
             "--cron", "61 * * * *", timeout=60)
    assert r.returncode == 2 and "cron" in r.stderr


def test_cron_and_templates():
    t0 = dt.datetime(2026, 11, 23, 1, 59, 30, tzinfo=dt.timezone.utc)
    assert next_fire("0 2 * * *", t0) == dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.timezone.utc)
    assert next_fire("* * * * * */10", t0).second == 40
    when = dt.datetime(2026, 11, 23, 2, 0, 5)
    assert render_output("gs://b/{date}/{time}-{run}", when, 7) == "gs://b/2026-11-23/020005-7"


def test_stop_a_running_job_leaves_no_published_output(ray_head, tmp_path):
    """`stop` ends a long job mid-run and waits for it; nothing is published (no _SUCCESS, no
    shards: publish is atomic and last); `list` shows it stopped."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(400)],
                             "text": [f"Document {i} about topic {i % 7}." for i in range(400)]}),
                   inp / "part-0.parquet")
    r = _cli("submit", "--input", str(inp), "--output", str(out), "--model", "tiny-gemma3",
             "--max-new-tokens", "48", "--batch-size", "2", "--address", ray_head,
             "--job-id", "test-job-stop", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    deadline = time.time() + 240
    while not list((out / "_parts").glob("*.parquet")):  # mid-run: batches are committed
        st = json.loads(_cli("status", "test-job-stop", "--address", ray_head, "--json").stdout)
        assert st["status"] in ("PENDING", "RUNNING"), st
        assert time.time() < deadline, "the job committed nothing in 240 s"
        time.sleep(1)
    r = _cli("stop", "test-job-stop", "--address", ray_head, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "test-job-stop: STOPPED"
    names = sorted(p.name for p in out.iterdir())
    assert "_SUCCESS" not in names and "_SUMMARY.json" not in names, names
    assert not [n for n in names if n.startswith("part-")], names
    listed = _cli("list", "--address", ray_head, "--json")
    assert listed.returncode == 0, listed.stderr
    mine = [j for j in json.loads(listed.stdout) if j["job_id"] == "test-job-stop"]
    assert mine and mine[0]["status"] == "STOPPED" and mine[0]["metadata"]["output"] == str(out)
    plain = _cli("list", "--address", ray_head).stdout
    assert any(ln.startswith("test-job-stop  STOPPED") for ln in plain.splitlines()), plain
