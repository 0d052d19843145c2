"""Shard listing and output files through fsspec (local and gs:// on the fake GCS server)."""

from __future__ import annotations

import pytest

from pipeline.errors import InputError
from pipeline.output import OutputDir
from pipeline.storage import list_shards


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_directory_glob_and_list(tmp_path):
    for rel in ("a/x.parquet", "a/y.parquet", "a/_SUCCESS", "a/.hidden", "a/_tmp/z.parquet",
                "b/x.parquet"):
        _touch(tmp_path / rel)
    d = list_shards(str(tmp_path / "a"))
    assert [s.name for s in d] == ["x.parquet", "y.parquet"]  # markers and hidden skipped
    g = list_shards(str(tmp_path / "*" / "x.parquet"))
    assert [s.name for s in g] == ["a/x.parquet", "b/x.parquet"]  # names stay distinct
    lst = list_shards([str(tmp_path / "b" / "x.parquet"), str(tmp_path / "a" / "y.parquet")])
    assert len(lst) == 2 and all(s.url.startswith("file://") for s in lst)
    with pytest.raises(InputError, match="more than once"):
        list_shards([str(tmp_path / "a" / "x.parquet")] * 2)
    with pytest.raises(InputError, match="matches no files"):
        list_shards(str(tmp_path / "nope" / "*.parquet"))


def test_output_files_on_gcs(gcs_server):
    out = OutputDir("gs://test-bucket/storage-test/out")
    assert out.ls() == [] and not out.is_finished()
    out.write_json("_parts/_RUN.json", {"a": 1})
    out.write_bytes("_SUCCESS", b"")
    assert out.ls() == ["_SUCCESS", "_parts"] and out.is_finished()
    assert out.ls("_parts") == ["_RUN.json"]  # no temporary file left behind
    assert out.read_json("_parts/_RUN.json") == {"a": 1}
    out.clear_ours()
    assert out.ls() == []
