"""The streaming engine: rows submitted over time give the results of one `generate` call over
the same rows (greedy and seeded sampling), slots never idle while rows wait, and the slots
resize (grow and shrink) without changing any row's result."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from model import load_model
from model.engine import Buckets, Engine, Request, Stream, StreamEngine, generate

# Several cache lengths, so rows of different needs make the slots grow and shrink.
SB = Buckets(batch=(1, 2, 4, 8), length=(32, 64, 128, 256), chunk=(32,),
             pack=(32, 64, 128, 256), span=(64,))
_ENGINES: dict = {}


def engine_of(name: str) -> Engine:
    if name not in _ENGINES:
        m = load_model(name)
        _ENGINES[name] = Engine(m.family, m.config, m.params, buckets=SB)
    return _ENGINES[name]


def corpus(n: int, seed: int = 0) -> list[Request]:
    """Rows with spread lengths and a long tail of budgets; half greedy, half seeded top-k."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        plen = int(rng.integers(3, 90))
        prompt = [2] + rng.integers(4, 300, size=plen - 1).tolist()
        budget = int(rng.integers(40, 100)) if i % 5 == 0 else int(rng.integers(2, 9))
        sampled = i % 2 == 1
        reqs.append(Request(prompt, max_new_tokens=budget, temperature=0.8 if sampled else 0.0,
                            top_k=20 if sampled else None, seed=7, row_id=1000 + i))
    return reqs


def reference(engine: Engine, reqs: list[Request], max_batch: int = 4):
    return generate(engine, [r.prompt for r in reqs], None,
                    max_new_tokens=[r.max_new_tokens for r in reqs],
                    temperature=[r.temperature for r in reqs], top_k=[r.top_k for r in reqs],
                    seed=[r.seed for r in reqs], row_ids=[r.row_id for r in reqs],
                    stop_token_ids=[], max_batch=max_batch)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-recurrentgemma"])
def test_rows_submitted_over_time_match_one_generate_call(name):
    engine = engine_of(name)
    reqs = corpus(14)
    want = reference(engine, reqs)
    stream = Stream(engine, None, max_batch=4, poll_steps=3)  # back on the host every 3 steps
    got: dict[int, object] = {}
    index: dict[int, int] = {}

    def add(lo: int, hi: int) -> None:
        keys = stream.add(reqs[lo:hi], lambda k, g: got.__setitem__(index[k], g), index0=lo)
        index.update({k: lo + j for j, k in enumerate(keys)})

    # Arrivals between steps: 4 short rows, 2 steps later 5 more (one long), then the rest
    # mid-decode (the slots grow for the long rows, and shrink once only short ones are left).
    add(1, 5)
    stream.step()
    stream.step()
    add(5, 10)
    stream.step()
    add(10, 14)
    add(0, 1)
    while not stream.idle:
        stream.step()
    assert [got[i].tokens for i in range(14)] == [g.tokens for g in want]
    assert [got[i].finish_reason for i in range(14)] == ["length"] * 14
    assert stream.stats.resizes >= 1  # long-budget rows made the slots grow (or shrink)


def test_slots_stay_full_while_rows_wait():
    engine = engine_of("tiny-gemma3")
    reqs = corpus(20, seed=3)
    stream = Stream(engine, None, max_batch=4)
    stream.add(reqs, lambda k, g: None)
    while not stream.idle:
        stream.step()
    st = stream.stats
    assert st.waiting_steps > 0 and st.decode_steps > st.waiting_steps
    # Every decode step that ran while rows waited had all 4 usable slots busy.
    assert st.waiting_busy_slot_steps == st.waiting_slot_steps == 4 * st.waiting_steps
    assert st.occupancy_while_waiting == 1.0
    # Without refilling at the first free slot, the same rows leave slots idle while waiting.
    lazy = Stream(engine, None, max_batch=4, refill_min=3)
    lazy.add(reqs, lambda k, g: None)
    while not lazy.idle:
        lazy.step()
    assert lazy.stats.occupancy_while_waiting < 1.0


def test_stream_engine_futures_from_threads():
    engine = engine_of("tiny-gemma3")
    reqs = corpus(12, seed=5)
    want = reference(engine, reqs)
    se = StreamEngine(engine, None, max_batch=4)
    futures: dict[int, object] = {}
    try:
        def feeder(lo: int, hi: int, delay: float) -> None:
            time.sleep(delay)
            for i, f in zip(range(lo, hi), se.submit(reqs[lo:hi])):
                futures[i] = f

        threads = [threading.Thread(target=feeder, args=(lo, lo + 4, 0.2 * k))
                   for k, lo in enumerate((0, 4, 8))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [futures[i].result(timeout=300) for i in range(12)]
        assert [g.tokens for g in got] == [g.tokens for g in want]
        # A bad row fails alone, with its reason; the others of its call still finish.
        bad = Request([2, 10_000], max_new_tokens=3)
        fs = se.submit([reqs[0], bad, reqs[1]])
        assert fs[0].result(timeout=300).tokens == want[0].tokens
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fs[1].result(timeout=60)
        assert fs[2].result(timeout=300).tokens == want[1].tokens
    finally:
        se.close()


def test_idle_stream_engine_places_batches_submitted_together_as_one_set():
    # Two batches 50 ms apart reach an idle engine: it gathers both before placing any, so the
    # long rows of the second start first and the slots are shaped for all four rows at once
    # (no resize), as one `generate` over the four would place them.
    engine = engine_of("tiny-gemma3")
    rng = np.random.default_rng(3)
    short = [Request([2] + rng.integers(4, 300, size=4).tolist(), max_new_tokens=20,
                     row_id=i) for i in range(2)]
    long = [Request([2] + rng.integers(4, 300, size=79).tolist(), max_new_tokens=90,
                    row_id=2 + i) for i in range(2)]
    want = reference(engine, short + long)
    se = StreamEngine(engine, None, max_batch=4, gather_s=2.0)
    try:
        fs = se.submit(short)
        time.sleep(0.05)
        fs += se.submit(long)
        got = [f.result(timeout=300) for f in fs]
    finally:
        se.close()
    assert [g.tokens for g in got] == [g.tokens for g in want]
    assert se.stream.stats.resizes == 0


def test_rows_that_waited_for_a_busy_engine_thread_are_not_held_to_gather_more(monkeypatch):
    """The gathering window runs from when rows came: rows submitted while the engine's thread
    was busy (a `call`) for longer than `gather_s` are placed as soon as it is free. A fake
    clock: the old rule (a window from when the thread looked) would hold these rows an hour."""
    from model.engine import stream as stream_mod

    clock = [1000.0]
    monkeypatch.setattr(stream_mod, "_now", lambda: clock[0])
    engine = engine_of("tiny-gemma3")
    reqs = corpus(4, seed=9)
    want = reference(engine, reqs)
    se = StreamEngine(engine, None, max_batch=4, gather_s=3600.0)
    started, gate = threading.Event(), threading.Event()
    try:
        busy = se.call(lambda: (started.set(), gate.wait(120)))
        assert started.wait(120)
        futures = se.submit(reqs)  # at 1000 s, while the thread is busy
        clock[0] += 3601.0  # ...and the window has passed by the time it is free
        gate.set()
        busy.result(timeout=120)
        got = [f.result(timeout=300) for f in futures]
        assert [g.tokens for g in got] == [g.tokens for g in want]
    finally:
        gate.set()
        se.close()


def test_a_first_wave_compiles_the_programs_the_progress_line_expects():
    # The driver shows "k of about N programs compiled" for an actor's first batch: rows that
    # share a frame and get their slots at once compile the frame's prefill, the rows' packed
    # prefill and one decode, as `expected_programs(..., one_wave=True)` says.
    from model.engine import expected_programs, plan_programs

    m = load_model("tiny-gemma3")
    engine = Engine(m.family, m.config, m.params, buckets=SB)  # its own compile log
    rng = np.random.default_rng(3)
    frame = [2] + rng.integers(4, 300, size=30).tolist()
    reqs = [Request(frame + rng.integers(4, 300, size=int(rng.integers(5, 30))).tolist(),
                    max_new_tokens=6, row_id=i) for i in range(7)]  # within one span
    stream = Stream(engine, None, max_batch=8)
    stream.add(reqs, lambda k, g: None)
    while not stream.idle:
        stream.step()
    plan = plan_programs([len(r.prompt) for r in reqs], 6, 7, SB)
    assert engine.compile_log.count == expected_programs(plan, one_wave=True) == 3, [
        r.shapes for r in engine.compile_log.records]
    assert expected_programs(plan) >= 3  # the bound for closed batches stays an upper bound
