"""Structured outputs, pipeline side (pipeline/formats.py): Arrow types from JSON Schemas, the
spec's and the CLI's output formats, preflight refusals, and with the embedded 270M model, a
40-row extraction job (every output validates against the schema, `parsed` has its Arrow types)
and a classification job (every output one of the choices, choice_probs summing to 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest

from pipeline.errors import InputError
from pipeline.formats import JobFormat, arrow_type, describe, to_arrow
from pipeline.run import run_job
from pipeline.spec import SpecError, build_spec
from tests.pipeline.pl_helpers import read_output, tiny_spec, write_shard

ROOT = Path(__file__).parents[2]
TOPICS = ["physics", "history", "art", "biology"]
SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "year": {"type": "integer"},
                         "topic": {"enum": TOPICS}},
          "required": ["title", "year", "topic"]}


def test_arrow_types_follow_the_schema():
    nested = {
        "type": "object", "$defs": {"who": {"type": "object", "properties": {
            "name": {"type": "string"}, "born": {"type": ["integer", "null"]}}}},
        "properties": {
            "score": {"type": "number"}, "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "authors": {"type": "array", "items": {"$ref": "#/$defs/who"}},
            "level": {"enum": [1, 2, 3]}, "mixed": {"enum": ["a", 1]},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "maybe": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "free": {"type": "object"}}}
    who = pa.struct([("name", pa.string()), ("born", pa.int64())])
    assert arrow_type(nested) == pa.struct([
        ("score", pa.float64()), ("ok", pa.bool_()), ("tags", pa.list_(pa.string())),
        ("authors", pa.list_(who)), ("level", pa.int64()), ("mixed", pa.string()),
        ("either", pa.string()), ("maybe", pa.float64()), ("free", pa.string())])
    value = {"score": 3, "ok": True, "tags": ["x"], "authors": [{"name": "Ada", "born": None}],
             "level": 2, "mixed": 1, "either": 7, "maybe": None, "free": {"k": [1]}}
    got = to_arrow(value, arrow_type(nested))
    assert got["score"] == 3.0 and got["mixed"] == "1" and got["either"] == "7"
    assert got["free"] == '{"k": [1]}' and got["authors"] == [{"name": "Ada", "born": None}]
    assert pa.array([got], arrow_type(nested)).to_pylist()[0]["score"] == 3.0
    with pytest.raises(ValueError, match="not a 64-bit integer"):
        to_arrow({"level": 2**70}, arrow_type(nested))
    assert describe(SCHEMA) == ("an object with title (string); year (integer); topic (one of: "
                                "physics, history, art, biology)")


def test_incomplete_rows_are_errors_never_half_parsed():
    fmt = JobFormat("json", SCHEMA, logprobs=True, automaton=object(), lead=" ")
    text, values, err = fmt.row(' {"title": "A', False, [-1.0, -3.0], 8, 8)
    assert text is None and "parsed" not in values and err[0] == "incomplete"
    assert "max_new_tokens=8" in err[1] and values == {"mean_logprob": -2.0, "min_logprob": -3.0}
    text, values, err = fmt.row(' {"title": "A", "year": 1999, "topic": "art"}', True, [-1.0],
                                20, 64)
    assert err is None and text.startswith("{")
    assert values["parsed"] == {"title": "A", "year": 1999, "topic": "art"}


@pytest.mark.parametrize("fmt, msg", [
    ({"type": "json"}, "a json format needs schema"),
    ({"type": "choice", "choices": ["a", "a"]}, "at least two distinct"),
    ({"type": "json", "schema": {"type": "nope"}}, "not a valid JSON Schema"),
    ({"type": "regex", "pattern": "("}, "not a valid regex"),
    ({"type": "text", "choices": ["a", "b"]}, "choices does not apply to a text format"),
])
def test_bad_formats_are_refused_with_one_line(tmp_path, fmt, msg):
    with pytest.raises(SpecError, match=msg) as e:
        build_spec(tiny_spec("in", "out", output_format=fmt))
    assert "\n" not in str(e.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=False)


def test_cli_format_flags(tmp_path):
    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": [1], "text": ["x"]}))
    base = ["validate", "--input", str(tmp_path / "in.parquet"), "--output",
            str(tmp_path / "out"), "--model", "tiny-gemma3", "--task", "extract",
            "--no-estimate"]
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    ok = _cli(*base, "--json-schema", str(tmp_path / "s.json"), "--json")
    assert ok.returncode == 0, ok.stderr
    both = _cli(*base, "--choices", "a", "b", "--regex", "[a-z]+")
    missing = _cli(*base, "--json-schema", str(tmp_path / "none.json"))
    unsupported = _cli(*base, "--regex", "(?=a)b")  # Python's re has it, the automaton not
    for r, msg in ((both, "exclude each other"), (missing, "--json-schema file"),
                   (unsupported, "cannot be compiled to a token automaton")):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_too_large_format_is_refused_in_preflight(tmp_path, monkeypatch):
    from model.engine import constrain
    from pipeline.preflight import preflight

    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": [1], "text": ["x"]}))
    spec = build_spec(tiny_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"),
                                task="extract",
                                output_format={"type": "json", "schema": SCHEMA}))
    monkeypatch.setattr(constrain, "TABLE_BUDGET_BYTES", 4096)
    with pytest.raises(InputError, match=r"output_format: the json format has \d+ automaton"):
        preflight(spec)
    assert not (tmp_path / "out").exists()


def _documents(n: int) -> pa.Table:
    people = ["Ada Lovelace", "Marie Curie", "Ibn Battuta", "Frida Kahlo", "Gregor Mendel"]
    what = {"physics": "a study of how light bends near heavy stars",
            "history": "an account of the trade routes across the Sahara",
            "art": "a series of self-portraits painted in bright colours",
            "biology": "experiments on how pea plants pass on their traits"}
    rows = []
    for i in range(n):
        topic = TOPICS[i % 4]
        year = 1850 + 7 * i
        rows.append(f"In {year}, {people[i % 5]} published \"{topic.title()} Notes {i}\", "
                    f"{what[topic]}.")
    return pa.table({"id": list(range(n)), "text": rows})


@pytest.mark.slow
def test_270m_extraction_and_classification_jobs(ray_cluster, tmp_path):
    write_shard(str(tmp_path / "docs.parquet"), _documents(40))
    common = {"input": str(tmp_path / "docs.parquet"), "model": "gemma3-270m",
              "task": "extract", "batch_size": 20, "sampling": {"max_new_tokens": 64}}
    out = str(tmp_path / "extract")
    summary = run_job(build_spec({**common, "output": out, "logprobs": True, "output_format": {
        "type": "json", "schema": SCHEMA}}), progress=False)
    t = read_output(out)
    assert t.num_rows == 40 and summary["errors"] == 0, summary["errors_by_kind"]
    assert t.schema.field("parsed").type == pa.struct([
        ("title", pa.string()), ("year", pa.int64()), ("topic", pa.string())])
    for row in t.to_pylist():
        jsonschema.validate(json.loads(row["output"]), SCHEMA)
        assert row["parsed"] == json.loads(row["output"])
        assert row["min_logprob"] <= row["mean_logprob"] <= 0.0
    info = summary["output_format"]
    assert info["type"] == "json" and 0 < info["table_bytes"] < 64 << 20
    years_right = sum(r["parsed"]["year"] == 1850 + 7 * r["id"] for r in t.to_pylist())
    print(f"\n270M extraction: 40/40 valid, {years_right}/40 years right, tables "
          f"{info['states']} states x {info['classes']} classes = {info['table_bytes']} bytes")

    out = str(tmp_path / "classify")
    summary = run_job(build_spec({**common, "output": out, "logprobs": True,
                                  "instruction": "What is the topic of the text?",
                                  "output_format": {"type": "choice", "choices": TOPICS}}),
                      progress=False)
    t = read_output(out)
    assert t.num_rows == 40 and summary["errors"] == 0
    assert t.schema.field("choice_probs").type == pa.map_(pa.string(), pa.float64())
    right = 0
    for row in t.to_pylist():
        assert row["output"] == row["choice"] and row["choice"] in TOPICS
        probs = dict(row["choice_probs"])
        assert sorted(probs) == sorted(TOPICS) and abs(sum(probs.values()) - 1) <= 1e-5
        right += row["choice"] == TOPICS[row["id"] % 4]
    print(f"270M classification: {right}/40 topics right")


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gemma2", "tiny-recurrentgemma"])
def test_formatted_rows_do_not_depend_on_batching(tmp_path, model):
    """The same rows through a closed batch and through the streaming engine (split over two
    concurrent batches): the same outputs, choices, probabilities and log-probabilities."""
    import asyncio

    from pipeline.parts import RECORD_COLUMN
    from pipeline.predictor import TEXT, ClosedPredictor, GenSettings, StreamingPredictor
    from pipeline.preflight import preflight

    texts = [f"note {i}: " + "abc " * (i * 3) for i in range(6)]
    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": list(range(6)), "text": texts}))
    spec = build_spec(tiny_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"),
                                model=model, task="extract", logprobs=True,
                                output_format={"type": "choice", "choices": ["red", "rose"]},
                                sampling={"max_new_tokens": 8}))
    plan, _, _ = preflight(spec)
    settings = GenSettings.of(spec, plan)
    batch = pa.table({"id": list(range(6)), TEXT: texts})
    closed = ClosedPredictor(settings).rows(batch).to_pylist()
    stream = StreamingPredictor(settings)

    async def both() -> list:
        halves = await asyncio.gather(stream(batch.slice(0, 3)), stream(batch.slice(3)))
        return [r for t in halves for r in t.drop_columns([RECORD_COLUMN]).to_pylist()]

    try:
        streamed = asyncio.run(both())
    finally:
        stream.close()
    assert [r["output"] for r in streamed] == [r["output"] for r in closed]
    for a, b in zip(closed, streamed):
        assert a["error"] is None and a["choice"] in ("red", "rose")
        assert a["mean_logprob"] == pytest.approx(b["mean_logprob"], abs=1e-5)
        pa_, pb = dict(a["choice_probs"]), dict(b["choice_probs"])
        assert sum(pa_.values()) == pytest.approx(1.0, abs=1e-9)
        assert pa_ == pytest.approx(pb, abs=1e-6)
