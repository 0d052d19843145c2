"""`gemma-batch demo` with the real embedded Gemma 3 270M on the shared local Ray cluster."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs.cli import demo_corpus_rows, main


def test_demo_corpus_is_bundled():
    rows = demo_corpus_rows()
    assert 18 <= len(rows) <= 30
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["lang"] for r in rows}) >= 8  # several languages and scripts
    assert all(40 <= len(r["text"].split()) or r["lang"] in ("ja", "zh") for r in rows)


def test_demo_with_embedded_model(ray_cluster, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out), "--limit", "2", "--max-new-tokens", "12",
                 "--rows", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "[doc-01]" in captured.out and "tokens/s" in captured.out
    table = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in table) == ["doc-01", "doc-02"]
    for r in table:
        assert r["finish_reason"] in ("stop", "length") and r["error"] is None
        text = r["output"].strip()
        # Real words from a real model: mostly letters and spaces, several words long.
        assert len(text.split()) >= 3, text
        assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8, text
        assert r["model"] == "gemma3-270m" and r["lang"] == "en"
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["rows_out"] == 2 and summary["output_tokens"] > 0
    assert (out / "_SUCCESS").exists()
