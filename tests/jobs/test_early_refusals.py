"""Refusals before any compute: an output that cannot be written, and a store that cannot be
reached, each end as one line with exit 2, before a model loads and with nothing left behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.errors import InputError
from pipeline.output import OutputDir
from pipeline.preflight import preflight
from pipeline.spec import build_spec


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["one", "two"]}), path)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket closes


def _one_line(capsys, argv: list[str], *expect: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "aiohttp" not in err and "retries" not in err, err
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def test_unwritable_output_is_refused_in_preflight(capsys, shard):
    argv = ["run", "--input", str(shard), "--output", "/proc/forbidden", "--model", "tiny-gemma3"]
    _one_line(capsys, argv, "output /proc/forbidden cannot be written")
    # Preflight is what refuses it (run_job loads no model before preflight returns).
    with pytest.raises(InputError, match="cannot be written"):
        preflight(build_spec({"input": str(shard), "output": "/proc/forbidden/x",
                              "model": "tiny-gemma3"}))
    assert not Path("/proc/forbidden").exists()


def test_write_probe_leaves_nothing_behind(tmp_path, shard):
    fresh = tmp_path / "a" / "b" / "out"
    _, _, mode = preflight(build_spec({"input": str(shard), "output": str(fresh),
                                       "model": "tiny-gemma3"}))
    assert mode == "new" and not (tmp_path / "a").exists()  # the folders it made are gone
    empty = tmp_path / "empty"
    empty.mkdir()
    OutputDir(str(empty)).probe_writable()
    assert empty.is_dir() and list(empty.iterdir()) == []  # an existing folder stays, empty


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_unreachable_store_is_one_line(capsys, monkeypatch, shard, scheme):
    port = _closed_port()
    var = {"gs": "STORAGE_EMULATOR_HOST", "s3": "AWS_ENDPOINT_URL_S3"}[scheme]
    monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    # As the input (the listing used to say "matches no files") and as the output.
    line = _one_line(capsys, ["validate", "--input", f"{scheme}://nobucket/x", "--output",
                              str(shard.parent.parent / "out"), "--model", "tiny-gemma3"],
                     f"{scheme}:// storage at 127.0.0.1:{port} could not be reached",
                     "connection refused", var, "network", "credentials")
    assert "matches no files" not in line
    _one_line(capsys, ["run", "--input", str(shard), "--output", f"{scheme}://nobucket/out",
                       "--model", "tiny-gemma3"], f"127.0.0.1:{port}", "connection refused")
