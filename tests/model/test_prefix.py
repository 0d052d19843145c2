"""Prefix reuse and packed prefill in the engine: a shared prompt frame (or a passage shared by
several questions) is prefilled once per engine, and every row's greedy output is the one it
gets when its prompt is prefilled in full; the padding of packed prefill stays small."""

from __future__ import annotations

import numpy as np
import pytest

from model import load_model
from model.engine import Buckets, Engine, generate
from model.engine.prefill import Row, assign_prefixes

# Spans of 64 tokens: rows whose prompt is longer continue in chunks of 32; packs of at most 96
# tokens: a placement of several long rows takes several packed calls.
TB = Buckets(batch=(1, 2, 4, 8), length=(128, 256), chunk=(32,), pack=(32, 64, 96), span=(64,))
FAMILIES = ["tiny-gemma3", "tiny-gemma2", "tiny-recurrentgemma"]
_ENGINES: dict = {}


def engine(name: str) -> Engine:
    if name not in _ENGINES:
        m = load_model(name)
        _ENGINES[name] = Engine(m.family, m.config, m.params, buckets=TB)
    return _ENGINES[name]


def corpus(seed: int, frame_len: int, doc_lengths, vocab: int = 300):
    rng = np.random.default_rng(seed)
    frame = [2] + rng.integers(4, vocab, size=frame_len - 1).tolist()
    return frame, [frame + rng.integers(4, vocab, size=n).tolist() for n in doc_lengths]


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_reuse_gives_the_outputs_of_full_prefill(name):
    eng = engine(name)
    # A 40-token frame (past the 16-token window: the prefix's own rings wrap), documents of
    # 1..90 tokens (some past the 64-token span: they continue in chunks).
    frame, prompts = corpus(1, 40, [12, 1, 30, 90, 7, 55])
    kw = dict(max_new_tokens=[9, 4, 12, 6, 10, 8], max_batch=4, stop_token_ids=[])
    before = dict(eng.stats.as_dict())
    reused = generate(eng, prompts, None, reuse_prefixes=True, **kw)
    st = eng.stats.as_dict()
    assert st["prefixes_computed"] - before["prefixes_computed"] == 1
    assert st["prefix_rows"] - before["prefix_rows"] == 6
    assert tuple(frame) in eng.prefixes
    assert st["padded_tokens"] - before["padded_tokens"] > 96  # more than one packed call
    full = generate(eng, prompts, None, reuse_prefixes=False, **kw)
    alone = [generate(eng, [p], None, reuse_prefixes=False, stop_token_ids=[],
                      max_new_tokens=n, max_batch=1)[0]
             for p, n in zip(prompts, kw["max_new_tokens"])]
    for a, b, c in zip(reused, full, alone):
        assert a.tokens == b.tokens == c.tokens
    # A later call finds the frame in the engine: nothing new is prefilled for it, even for one
    # row on its own.
    n0 = eng.stats.prefixes_computed
    again = generate(eng, prompts[2:3], None, reuse_prefixes=True, max_new_tokens=12,
                     max_batch=1, stop_token_ids=[])
    assert eng.stats.prefixes_computed == n0
    assert again[0].tokens == reused[2].tokens


def test_questions_on_one_passage_share_its_prefix():
    eng = engine("tiny-gemma3")
    rng = np.random.default_rng(5)
    frame = [2] + rng.integers(4, 300, size=20).tolist()
    passages = [rng.integers(4, 300, size=70).tolist() for _ in range(2)]
    prompts = [frame + p + [7] + rng.integers(4, 300, size=int(rng.integers(3, 9))).tolist()
               for p in passages for _ in range(4)]
    rows = [Row(i, p, None) for i, p in enumerate(prompts)]
    assign_prefixes(rows)
    # Each question starts from its passage (frame + passage + separator), not from the frame.
    assert {len(r.prefix) for r in rows} == {len(frame) + 70 + 1}
    assert len({r.prefix for r in rows}) == 2
    before = eng.stats.prefixes_computed
    kw = dict(max_new_tokens=6, max_batch=8, stop_token_ids=[])
    a = generate(eng, prompts, None, **kw)
    assert eng.stats.prefixes_computed - before == 2
    b = generate(eng, prompts, None, reuse_prefixes=False, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    # The store is bounded in bytes too: with room for none, only the newest prefix is kept,
    # and outputs do not change.
    eng.prefixes.clear()
    eng.max_prefix_bytes = 1
    try:
        c = generate(eng, prompts, None, **kw)
        assert len(eng.prefixes) == 1
    finally:
        eng.max_prefix_bytes = 1 << 30
    assert [g.tokens for g in c] == [g.tokens for g in a]


def test_prefix_assignment_rules():
    frame = list(range(10, 40))  # 30 tokens
    rows = [Row(i, p, None) for i, p in enumerate(
        [frame + [1, 2, 3], frame + [1, 2, 5], frame + [9], [5, 6, 7, 8]])]
    assign_prefixes(rows)
    # frame+[1, 2] extends the frame by 2 tokens: merged into the frame (one packed call).
    assert [len(r.prefix) for r in rows] == [30, 30, 30, 0]
    # A prefix is never a whole prompt (the last token is fed by the first decode step), and
    # one used by a single row is dropped unless the engine holds it already.
    rows = [Row(0, frame + [1], None), Row(1, frame, None)]
    assign_prefixes(rows)
    assert [len(r.prefix) for r in rows] == [29, 29]
    rows = [Row(0, frame + [1, 2], None)]
    assign_prefixes(rows)
    assert rows[0].prefix == ()
    assign_prefixes(rows, cached=[tuple(frame)])
    assert rows[0].prefix == tuple(frame)
    # The engine's empty prefix (kept like any other) never stands in for a short shared one.
    rows = [Row(i, frame[:20] + [i, 7], None) for i in range(3)]
    assign_prefixes(rows, cached=[()])
    assert [len(r.prefix) for r in rows] == [20, 20, 20]


def test_padding_ratio_on_the_demo_corpus():
    # The demo's summarize prompts (frame ~135 tokens + document ~87) with the embedded model,
    # in the demo's batches of 10: packed prefill computes < 1.15x the real tokens.
    from jobs.cli import demo_corpus_rows
    from pipeline.prompts import PromptBuilder, PromptSettings

    m = load_model("gemma3-270m")
    builder = PromptBuilder(PromptSettings("summarize", m.prompt_format, 4000), m.tokenizer)
    prompts = [builder.build(d["text"]).ids for d in demo_corpus_rows()]
    eng = Engine(m.family, m.config, m.params)
    for i in range(0, len(prompts), 10):
        generate(eng, prompts[i:i + 10], m.tokenizer, max_new_tokens=2, max_batch=10)
    st = eng.stats
    assert st.prefixes_computed == 1 and st.prefix_rows == len(prompts)
    assert st.real_tokens < 0.5 * st.prompt_tokens  # the frame is most of every prompt
    assert 1.0 <= st.padding_ratio < 1.15, st.as_dict()
