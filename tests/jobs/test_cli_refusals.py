"""Every refused input: exit code 2, one clear line on stderr, nothing written. No Ray needed."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.storage import get_fs


def _shard(path: Path, **cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def _text_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _refuse(capsys, argv: list[str], *expect: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gemma-batch: error: ")
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def _argv(inp, out, *extra) -> list[str]:
    return ["run", "--input", str(inp), "--output", str(out), "--model", "tiny-gemma3", *extra]


@pytest.fixture
def good(tmp_path) -> Path:
    return _shard(tmp_path / "in" / "a.parquet", id=["x", "y"], text=["one", "two"])


CASES = {
    "no files": (lambda d: d / "nothing-here", [], ["matches no files"]),
    "missing text column": (
        lambda d: _shard(d / "in" / "a.parquet", id=["x"], body=["t"]), ["--id-column", "id"],
        ["a.parquet", "'text' not found", "body"]),
    "text not string": (
        lambda d: _shard(d / "in" / "a.parquet", id=["x"], text=[3]), [],
        ["a.parquet", "'text'", "not string"]),
    "null ids": (
        lambda d: _shard(d / "in" / "a.parquet", id=["x", None, "z"], text=["a", "b", "c"]),
        ["--id-column", "id"], ["a.parquet", "1 null", "rows 1"]),
    "duplicate ids across shards": (
        lambda d: (_shard(d / "in" / "a.parquet", id=[1, 2], text=["a", "b"]),
                   _shard(d / "in" / "b.parquet", id=[2, 3], text=["c", "d"]))[0].parent,
        ["--id-column", "id"], ["duplicated", "2 (2x"]),
    "float ids": (
        lambda d: _shard(d / "in" / "a.parquet", id=[1.5], text=["a"]), ["--id-column", "id"],
        ["a.parquet", "ids must be integers or strings"]),
    "missing id column": (
        lambda d: _shard(d / "in" / "a.parquet", text=["a"]), ["--id-column", "key"],
        ["a.parquet", "'key' not found"]),
    "not parquet": (
        lambda d: _text_file(d / "in" / "a.parquet", "id,text\n1,a\n").parent, [],
        ["a.parquet", "not a readable Parquet file"]),
    "unknown model": (
        lambda d: _shard(d / "in" / "a.parquet", text=["a"]), ["--model", "no-such-model"],
        ["no-such-model", "neither a preset"]),
    "answer without question column": (
        lambda d: _shard(d / "in" / "a.parquet", text=["a"]), ["--task", "answer"],
        ["question_column"]),
    "resume and overwrite": (
        lambda d: _shard(d / "in" / "a.parquet", text=["a"]), ["--resume", "--overwrite"],
        ["exclude each other"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_input(case, tmp_path, capsys):
    make, extra, expect = CASES[case]
    inp = make(tmp_path)
    out = tmp_path / "out"
    _refuse(capsys, _argv(inp, out, *extra), *expect)
    assert not out.exists()


def test_output_inside_input_is_refused(tmp_path, capsys):
    _shard(tmp_path / "data" / "a.parquet", text=["a"])
    _shard(tmp_path / "data" / "out" / "part-00000.parquet", text=["old"])
    (tmp_path / "data" / "out" / "_SUCCESS").write_text("")
    _refuse(capsys, _argv(tmp_path / "data", tmp_path / "data" / "out", "--overwrite"),
            "inside the output directory")
    assert (tmp_path / "data" / "out" / "_SUCCESS").exists()


def test_truncated_parquet(tmp_path, capsys):
    src = _shard(tmp_path / "full.parquet", id=list(range(100)), text=["x" * 50] * 100)
    data = src.read_bytes()
    bad = tmp_path / "in" / "cut.parquet"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    _refuse(capsys, _argv(bad, tmp_path / "out"), "cut.parquet", "not a readable Parquet")
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_protected(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("")
    (out / "part-00000.parquet").write_bytes(b"old")
    _refuse(capsys, _argv(good, out), "finished run", "--overwrite")
    (out / "_SUCCESS").unlink()
    (out / "_parts").mkdir()
    _refuse(capsys, _argv(good, out), "unfinished run", "--resume")
    (out / "notes.txt").write_text("mine")
    _refuse(capsys, _argv(good, out, "--overwrite"), "not a gemma-batch output", "notes.txt")
    assert sorted(os.listdir(out)) == ["_parts", "notes.txt", "part-00000.parquet"]
    assert (out / "part-00000.parquet").read_bytes() == b"old"


def test_bad_spec_files(good, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("input: [unclosed\n")
    _refuse(capsys, ["run", str(bad_yaml)], "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"input: {good}\noutput: {tmp_path / 'o'}\nmodle: tiny-gemma3\n")
    _refuse(capsys, ["run", str(unknown)], "modle", "Extra inputs")
    _refuse(capsys, ["run", "--input", str(good)], "output is missing")
    _refuse(capsys, ["run", str(tmp_path / "absent.yaml")], "does not exist")
    assert not (tmp_path / "o").exists()


def test_gs_refusals(gcs_server, capsys):
    fs, _ = get_fs("gs://test-bucket/x")
    with fs.open("test-bucket/refuse/in/a.parquet", "wb") as f:
        f.write(b"this is not parquet")
    _refuse(capsys, _argv("gs://test-bucket/refuse/in", "gs://test-bucket/refuse/out"),
            "gs://test-bucket/refuse/in/a.parquet", "not a readable Parquet")
    _refuse(capsys, _argv("gs://test-bucket/refuse/none", "gs://test-bucket/refuse/out"),
            "matches no files")
    fs.invalidate_cache()
    assert not fs.exists("test-bucket/refuse/out")


def test_validate_writes_nothing(good, tmp_path, capsys):
    assert main(["validate", "--input", str(good), "--output", str(tmp_path / "o"),
                 "--model", "tiny-gemma3", "--id-column", "id"]) == 0
    assert "ok: 1 shards, 2 rows" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes" in out and "2  bad usage" in out
