"""Long documents (pipeline/longdoc.py and the actors): the chunker's boundaries, the reduce tree's
depth, a failing chunk failing only its document, documents of 3x, 10x and 30x the usable
context each giving one row (closed and streaming batching alike), RecurrentGemma's `stream`
policy (flat memory, the output of one full prefill), the summary's counts per outcome, and the
embedded 270M summarising a ~20K-token document under --max-input-tokens 1024."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pytest

from model.engine import Generation
from model.tokenizer import ByteTokenizer
from pipeline.longdoc import (OVERLAP_TOKENS, LongDocumentError, cut_scores, map_reduce,
                              plan_chunks, usable_tokens)
from pipeline.parts import RECORD_COLUMN
from pipeline.predictor import TEXT, ClosedPredictor, GenSettings, StreamingPredictor
from pipeline.preflight import preflight
from pipeline.prompts import PromptBuilder, PromptSettings
from pipeline.run import run_job
from pipeline.spec import build_spec
from tests.pipeline.pl_helpers import read_output, write_shard

_CHILD = "_GEMMA_BATCH_TEST_FRESH_PROCESS"


def in_fresh_process(test):
    """Runs the test alone in a fresh Python (pytest on its node id). The suite's process has
    compiled hundreds of programs by the time these run, and XLA segfaulted there compiling
    this file's packed-prefill programs (three CI runs; the same tests pass alone)."""
    @functools.wraps(test)
    def run(*args, **kw):
        if os.environ.get(_CHILD):
            return test(*args, **kw)
        node = f"{Path(__file__).resolve()}::{test.__name__}"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            node], env={**os.environ, _CHILD: "1"}, cwd=Path(__file__).parents[2],
                           capture_output=True, text=True, timeout=900, check=False)
        print(r.stdout[-3000:])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


PARA = "The river rose in spring. Farmers moved their herds to the hills before the rain. "


def _doc(paragraphs: int) -> str:
    return "\n\n".join(f"Part {j}. " + PARA * 3 for j in range(paragraphs))


@pytest.mark.parametrize("budget, overlap", [(40, 8), (64, 32), (100, 0), (9, 32)])
def test_chunks_cover_every_token_and_repeat_only_the_overlap(budget, overlap):
    rng = np.random.default_rng(budget)
    scores = rng.integers(0, 5, 1000).astype(np.int8)
    chunks = plan_chunks(scores, budget, overlap)
    seen = np.zeros(1000, int)
    for a, b in chunks:
        assert 0 < b - a <= budget
        seen[a:b] += 1
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000 and (seen >= 1).all()
    stated = min(overlap, budget // 4)
    for (a0, b0), (a1, b1) in zip(chunks, chunks[1:]):
        assert b0 - a1 == stated  # each chunk repeats exactly the stated overlap
        window = scores[a0 + budget // 2 - 1: a0 + budget]
        assert scores[b0 - 1] == window.max()  # it ends at the best break of its window
    assert seen.sum() == 1000 + stated * (len(chunks) - 1)


def test_chunks_end_at_paragraphs_then_sentences():
    tok = ByteTokenizer()
    ids = tok.encode(_doc(6))
    scores = cut_scores(tok, ids)
    for a, b in plan_chunks(scores, 400):
        if b < len(ids):
            assert tok.decode(ids[a:b]).endswith("\n\n")
    for a, b in plan_chunks(scores, 120):  # shorter than a paragraph: sentence ends
        if b < len(ids):
            assert tok.decode(ids[a:b]).rstrip().endswith(".")


def _builder(limit: int) -> PromptBuilder:
    return PromptBuilder(PromptSettings("summarize", "chat", limit, "map-reduce"), ByteTokenizer())


def _fake_summaries(n_chars: int, fail_on: str | None = None):
    """A generator stand-in for the tree's logic: each summary is `n_chars` letters."""
    calls: list[int] = []

    async def generate(prompts: list[list[int]], keys: list[int]) -> list:
        calls.append(len(prompts))
        out = []
        for p in prompts:
            text = ByteTokenizer().decode(p)
            if fail_on is not None and fail_on in text:
                out.append(RuntimeError("device said no"))
            else:
                out.append(Generation([], "s" * n_chars, "stop", len(p), n_chars))
        return out

    return generate, calls


def test_reduce_tree_depth_follows_the_sizes():
    tok, b = ByteTokenizer(), _builder(300)
    budget = usable_tokens(b)  # text tokens per prompt
    doc = "word " * (budget * 6)
    gen, calls = _fake_summaries(40)
    sm = asyncio.run(map_reduce(doc, b, gen, seed=1))
    # The tree the sizes give: each level chunks the joined summaries of the one before, until
    # they fit one prompt; then one final call.
    want, ids = [], tok.encode(doc)
    while len(ids) > budget:
        want.append(len(plan_chunks(cut_scores(tok, ids), budget)))
        ids = tok.encode("\n\n".join(["s" * 40] * want[-1]))
    assert calls == want + [1] and len(want) >= 3 and sm.levels == len(want) + 1
    assert sm.chunks == want[0] and sm.final.text == "s" * 40
    gen, calls = _fake_summaries(2)  # tiny summaries: one map level, then the final call
    assert asyncio.run(map_reduce(doc, b, gen, seed=1)).levels == 2 and len(calls) == 2


def test_a_failing_chunk_fails_its_document_with_a_line():
    b = _builder(300)
    doc = "word " * 500 + "POISON " + "word " * 500
    gen, _ = _fake_summaries(10, fail_on="POISON")
    with pytest.raises(LongDocumentError, match=r"chunk \d+ of \d+ \(level 1\) failed: "
                                                r"RuntimeError: device said no"):
        asyncio.run(map_reduce(doc, b, gen, seed=1))
    gen, _ = _fake_summaries(400)  # summaries as long as the text: they never shrink it
    with pytest.raises(LongDocumentError, match="do not shrink the document"):
        asyncio.run(map_reduce(doc, b, gen, seed=1))


def _settings(tmp_path, **kw):
    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": [0], "text": ["x"]}))
    spec = build_spec({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "o"),
                       "model": "tiny-gemma3", "task": "summarize", "prompt_format": "chat",
                       "max_input_tokens": 600, "sampling": {"max_new_tokens": 12}, **kw})
    plan, _, _ = preflight(spec)
    return GenSettings.of(spec, plan)


def _stream_rows(settings, batches: list[pa.Table]) -> list[dict]:
    pred = StreamingPredictor(settings)

    async def all_batches() -> list:
        return await asyncio.gather(*(pred(b) for b in batches))

    try:
        tables = asyncio.run(all_batches())
    finally:
        pred.close()
    return [r for t in tables for r in t.drop_columns([RECORD_COLUMN]).to_pylist()]


@in_fresh_process
def test_documents_of_3_10_30_contexts_give_one_row_each(tmp_path):
    settings = _settings(tmp_path)
    pred = ClosedPredictor(settings)
    usable = usable_tokens(pred.builder)
    texts = ["A short note.", "word " * (3 * usable // 5), "word " * (10 * usable // 5),
             "word " * (30 * usable // 5)]
    batch = pa.table({"id": list(range(4)), TEXT: texts})
    closed = pred.rows(batch).to_pylist()
    assert [r["id"] for r in closed] == [0, 1, 2, 3]
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in closed)
    chunks = [r["chunks"] for r in closed]
    assert chunks[0] == 1 and closed[0]["input_tokens"] == closed[0]["prompt_tokens"]
    assert 3 <= chunks[1] < chunks[2] < chunks[3] and chunks[3] >= 30
    assert all(r["input_tokens"] > r["prompt_tokens"] for r in closed[1:])
    print(f"\n3x/10x/30x the usable context ({usable} tokens): chunks {chunks[1:]}")
    # Streaming, the rows split over two batches in flight: the same rows.
    streamed = _stream_rows(settings, [batch.slice(0, 2), batch.slice(2)])
    assert [(r["output"], r["chunks"], r["input_tokens"]) for r in streamed] == \
        [(r["output"], r["chunks"], r["input_tokens"]) for r in closed]


@in_fresh_process
def test_a_failing_chunk_fails_only_its_document(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    pred = ClosedPredictor(settings)
    real = pred.model.generate
    poison = pred.model.tokenizer.encode("POISON")

    def generate(prompts, **kw):  # the device refuses any chunk holding the poison
        if any(str(poison)[1:-1] in str(p) for p in prompts):
            raise RuntimeError("chunk refused")
        return real(prompts, **kw)

    monkeypatch.setattr(pred.model, "generate", generate)
    long = "word " * 900
    batch = pa.table({"id": [0, 1, 2], TEXT: [long + "POISON " + long, long, "short"]})
    rows = pred.rows(batch).to_pylist()
    assert rows[0]["error_kind"] == "long_document" and "chunk refused" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["chunks"] > 1
    assert rows[2]["error"] is None and rows[2]["chunks"] == 1


def _peak_live_bytes(pred, text: str) -> tuple[int, dict]:
    """Runs one row; the most bytes of live device arrays seen after any prefill call."""
    engine, peak = pred.model.engine, [0]
    calls = {name: getattr(engine, name) for name in ("prefill", "prefill_packed")}

    def watch(fn):
        def call(*a, **kw):
            out = fn(*a, **kw)
            peak[0] = max(peak[0], sum(x.nbytes for x in jax.live_arrays()))
            return out
        return call

    for name, fn in calls.items():
        setattr(engine, name, watch(fn))
    try:
        row = pred.rows(pa.table({"id": [0], TEXT: [text]})).to_pylist()[0]
    finally:
        for name, fn in calls.items():
            setattr(engine, name, fn)
    return peak[0], row


@in_fresh_process
def test_recurrentgemma_stream_keeps_memory_flat_and_equals_full_prefill(tmp_path):
    settings = _settings(tmp_path, model="tiny-recurrentgemma", long_document="stream",
                         max_input_tokens=None)
    pred = ClosedPredictor(settings)
    context = pred.model.config.max_seq_len
    one, row1 = _peak_live_bytes(pred, "w " * (context // 4))  # fits: ~1x the context
    many, row32 = _peak_live_bytes(pred, "w " * (16 * context))  # ~32x the context
    assert row32["error"] is None and row32["prompt_tokens"] > 30 * context
    assert many <= 1.2 * one, (one, many)
    # Where the document fits, streaming it is one full prefill: the same output.
    plain = ClosedPredictor(dataclasses.replace(settings, long_document="error"))
    assert plain.rows(pa.table({"id": [0], TEXT: ["w " * (context // 4)]})).to_pylist()[0][
        "output"] == row1["output"]
    print(f"\nstream: peak live device bytes {one} (1x context) vs {many} (32x)")


def test_stream_policy_needs_a_fixed_state_model(tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="long_document: stream needs a model with a fixed"):
        _settings(tmp_path, long_document="stream")


def test_summary_counts_long_documents(ray_cluster, tmp_path):
    texts = ["short", "word " * 2000, "word " * 40, "word " * 3000]
    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": list(range(4)), "text": texts}))
    base = {"input": str(tmp_path / "in.parquet"), "model": "tiny-gemma3", "task": "summarize",
            "prompt_format": "chat", "max_input_tokens": 800, "batch_size": 2,
            "sampling": {"max_new_tokens": 8}}
    summary = run_job(build_spec({**base, "output": str(tmp_path / "mr")}), progress=False)
    assert summary["long_documents"] == {"map_reduce": 2} and summary["errors"] == 0
    t = read_output(str(tmp_path / "mr")).sort_by("id").to_pylist()
    assert [r["chunks"] > 1 for r in t] == [False, True, False, True]
    summary = run_job(build_spec({**base, "output": str(tmp_path / "cut"),
                                  "long_document": "truncate"}), progress=False)
    assert summary["long_documents"] == {"truncated": 2}
    summary = run_job(build_spec({**base, "output": str(tmp_path / "err"),
                                  "long_document": "error"}), progress=False)
    assert summary["long_documents"] == {"too_long": 2}
    assert summary["errors_by_kind"] == {"too_long": 2}


@pytest.mark.slow
def test_270m_map_reduce_of_a_20k_token_document(ray_cluster, tmp_path):
    from model.checkpoints import load_text_side

    tok = load_text_side("gemma3-270m").tokenizer
    topics = ["harbour", "railway", "market", "school", "bridge", "library", "mill", "garden"]
    paras, n = [], 0
    while n < 20_000:
        t = topics[len(paras) % len(topics)]
        p = (f"Chapter {len(paras) + 1}. In the town the {t} was rebuilt after the flood of "
             f"{1900 + len(paras)}. The council paid for new stone walls, the workers came from "
             f"three villages, and the {t} opened again in the autumn with a small celebration. "
             "Older residents said it looked better than before, though some missed the old "
             "wooden doors. ") * 2
        paras.append(p.strip())
        n += len(tok.encode(p))
    long_doc = "\n\n".join(paras)
    short = "The new bridge opened on Monday after two years of work."
    write_shard(str(tmp_path / "in.parquet"), pa.table({"id": ["long", "short"],
                                                         "text": [long_doc, short]}))
    spec = build_spec({"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
                       "model": "gemma3-270m", "task": "summarize", "max_input_tokens": 1024,
                       "batch_size": 32, "sampling": {"max_new_tokens": 48}})
    summary = run_job(spec, progress=False)
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    long, short_row = rows["long"], rows["short"]
    assert long["error"] is None and long["output"].strip(), long
    assert long["finish_reason"] in ("stop", "length") and long["chunks"] >= 4
    assert long["input_tokens"] > 20_000 and long["prompt_tokens"] <= 1024
    assert short_row["chunks"] == 1 and short_row["input_tokens"] == short_row["prompt_tokens"]
    assert summary["long_documents"] == {"map_reduce": 1}
    print(f"\n270M map-reduce: {len(tok.encode(long_doc))} tokens -> {long['chunks']} chunks, "
          f"{long['input_tokens']} prompt tokens in all; summary: {long['output'][:160]!r}")
