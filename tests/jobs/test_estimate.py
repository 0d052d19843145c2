"""`gemma-batch validate`'s estimate: prompt tokens equal the tokenizer's count of the prompts the
actors build, output-token bounds, a sample on large corpora, and a forecast from a calibration
(a table entry, or `--calibrate` measuring in a real actor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from pl_helpers import write_corpus  # noqa: E402

from jobs.cli import main  # noqa: E402
from pipeline import calibration  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_BATCH_CACHE", str(tmp_path / "cache"))  # no calibration yet


def _validate(capsys, tmp_path, *extra: str, task: str = "summarize") -> dict:
    code = main(["validate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", "tiny-gemma3", "--task", task, "--batch-size", "4",
                 "--max-new-tokens", "8", "--json", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1, out  # one JSON object, nothing else on stdout
    assert not (tmp_path / "out").exists()
    return json.loads(out[0])


def _texts(tmp_path) -> list[str]:
    import pyarrow.parquet as pq

    return [t for p in sorted((tmp_path / "in").glob("*.parquet"))
            for t in pq.read_table(p).column("text").to_pylist()]


def test_token_counts_equal_the_tokenizers(capsys, tmp_path):
    from model import load_model
    from pipeline.predictor import GenSettings, prompt_setup
    from pipeline.spec import build_spec

    ids = write_corpus(str(tmp_path / "in"), shards=3, rows=4)
    got = _validate(capsys, tmp_path)
    est = got["estimate"]
    assert got["rows"] == est["rows"] == est["rows_to_generate"] == len(ids)
    # The prompts as the actors build them, with the fully loaded model's tokenizer.
    m = load_model("tiny-gemma3")
    spec = build_spec({"input": str(tmp_path / "in"), "output": str(tmp_path / "o"),
                       "model": "tiny-gemma3", "task": "summarize",
                       "sampling": {"max_new_tokens": 8}}, "test")
    import pyarrow as pa

    from pipeline.plan import Plan

    plan = Plan([], [], 0, pa.int64(), True, [], {}, pa.schema([]))  # no output format
    builder, _ = prompt_setup(m, GenSettings.of(spec, plan))
    lengths = [len(builder.build(t).ids) for t in _texts(tmp_path)]
    pt = est["prompt_tokens"]
    assert pt["exact"] and pt["rows_counted"] == len(ids) and pt["sample_note"] is None
    assert pt["total"] == sum(lengths) and pt["max"] == max(lengths) and pt["prompt_errors"] == 0
    assert est["output_tokens"] == {"max_new_tokens": 8, "upper_bound": 8 * len(ids),
                                    "expected": None}
    assert est["forecast"]["source"] is None and "--calibrate" in est["forecast"]["note"]

    # raw task: the prompt is BOS + the text itself, so the tokenizer's count is direct.
    raw = _validate(capsys, tmp_path, task="raw")["estimate"]["prompt_tokens"]
    assert raw["total"] == sum(1 + len(m.tokenizer.encode(t)) for t in _texts(tmp_path))


def test_large_corpus_is_sampled_and_says_so(capsys, tmp_path):
    write_corpus(str(tmp_path / "in"), shards=3, rows=4)
    full = _validate(capsys, tmp_path)["estimate"]["prompt_tokens"]
    est = _validate(capsys, tmp_path, "--sample-rows", "5")["estimate"]["prompt_tokens"]
    assert not est["exact"] and est["rows_counted"] == 5
    assert est["sample_note"] == "sampled 5 of 12 rows; totals scaled"
    assert abs(est["total"] - full["total"]) <= 0.05 * full["total"]  # rows differ by a digit


def test_forecast_from_a_calibration_entry(capsys, tmp_path):
    write_corpus(str(tmp_path / "in"), shards=3, rows=4)
    calibration.write_entry({
        "accelerator": "cpu", "device": calibration.cpu_model(), "model": "tiny-gemma3",
        "dtype": "default", "batch_size": 4, "prefill_tok_s": 2000.0, "decode_tok_s": 50.0,
        "output_fraction": 0.5, "max_new_tokens": 8, "source": "bench/calibrate.py",
        "startup": {"ray_start_s": 5.0, "actor_ready_s": 10.0, "compile_s": 3.0},
        "measured_at": "2026-01-01T00:00:00Z"})
    est = _validate(capsys, tmp_path)["estimate"]
    fc = est["forecast"]
    assert fc["source"].startswith("bench/calibrate.py on ") and "calibration.json" in fc["source"]
    assert est["output_tokens"]["expected"] == fc["expected_output_tokens"] == 48  # 12 x 8 x 0.5
    prompt = est["prompt_tokens"]["total"]
    assert fc["startup_s"] == 18.0
    assert fc["generate_s"] == round(prompt / 2000.0 + 48 / 50.0, 1)
    for key in ("wall_s", "device_hours", "prefill_tok_s", "decode_tok_s", "generate_s"):
        assert fc[key] > 0, key
    # The text form says the same.
    assert main(["validate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", "tiny-gemma3", "--batch-size", "4", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "prompt tokens: " in text and "forecast: " in text and "from bench/calibrate.py" in text


def test_calibrate_measures_in_a_real_actor(ray_cluster, capsys, tmp_path):
    write_corpus(str(tmp_path / "in"), shards=2, rows=4)
    est = _validate(capsys, tmp_path, "--calibrate")["estimate"]
    fc = est["forecast"]
    assert fc["source"].startswith("validate --calibrate on ")
    for key in ("wall_s", "device_hours", "prefill_tok_s", "decode_tok_s", "startup_s"):
        assert fc[key] > 0, key
    (entry,) = calibration.load_table()
    assert entry["model"] == "tiny-gemma3" and entry["batch_size"] == 4
    assert entry["sample_prompts"] == 4 and entry["startup"]["actor_ready_s"] > 0
    assert 0 < entry["output_fraction"] <= 1
