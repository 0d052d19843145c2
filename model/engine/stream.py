"""The streaming engine: one long-lived set of decode slots that rows join whenever slots free up.

`Stream` is the host loop, driven by the caller: `add` rows (checked, with their own settings and
stop strings), then `step` until idle; each step places waiting rows into free slots (packed
prefill), runs the decode loop until a slot frees while rows wait (so slots never idle while
rows wait), and returns the rows that finished. `StreamEngine` runs a `Stream` on its own thread
for callers that submit rows over time (a Ray actor's concurrent batches) and get a future per
row. `generate` (scheduler.py) is one `add` and steps until done.

The slots' shape follows the rows in them: B = bucket(min(rows, max_batch)) (grows only), L =
bucket(the longest prompt + max_new_tokens in the slots) and O = bucket(the largest
max_new_tokens); the state is resized when a placed row needs more, and shrinks when every row
in the slots fits half the cache (`Engine.resize`: nothing is recomputed). Results never depend
on what else is in the slots, nor on when a row arrived.

Legend: B = decode slots, L = cache length, O = generated-token buffer.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import dataclasses
import threading
from time import monotonic as _now  # the engine thread's clock (tests replace it)
from typing import Any, Callable, Sequence

import jax
import numpy as np

from model.engine import sampling
from model.engine.buckets import DecodeStats, enable_compile_cache
from model.engine.constrain import Automaton, Format, compile_format
from model.engine.prefill import Row, assign_prefixes, prefill_rows
from model.engine.programs import Engine, RowSettings
from model.engine.results import (Generation, decode_text, finish, first_stop, stop_string_tokens,
                                  stop_table)

DONE = Callable[[int, Generation], None]


@dataclasses.dataclass(frozen=True)
class Request:
    """One row to generate for: prompt ids (BOS included) and its own settings.

    `row_id` keys the row's random draws (with `seed`); `stop`: stop strings (None: the
    stream's own)."""

    prompt: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    row_id: int = 0
    stop: tuple[str, ...] | None = None


def check_request(req: Request, index: int, vocab: int, max_seq_len: int | None) -> Row:
    """The checked `Row` of a request; ValueError naming the prompt (by `index`) otherwise.
    `max_seq_len` None: any length (a fixed-size state)."""
    p = [int(t) for t in req.prompt]
    if not p:
        raise ValueError(f"prompt {index} is empty; every prompt needs at least one token "
                         "(usually BOS)")
    bad = [t for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary "
                         f"[0, {vocab}); check the tokenizer matches the model")
    m = int(req.max_new_tokens)
    if m < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {m} for prompt {index}")
    if max_seq_len is not None and len(p) + m > max_seq_len:
        raise ValueError(
            f"prompt {index} has {len(p)} tokens; with max_new_tokens={m} it exceeds "
            f"the model's {max_seq_len}-token context; shorten it or lower max_new_tokens")
    t, k, pp = sampling.make_strategy(req.temperature, req.top_k, req.top_p).row_params()
    return Row(index, p, RowSettings(max_new=m, temperature=t, top_k=k, top_p=pp,
                                     seed=int(req.seed) & 0xFFFFFFFF, row_id=int(req.row_id)))


class Stream:
    """The host loop over one engine's decode slots (see the module docstring).

    Args:
      engine: the model's programs (`Model.engine`).
      tokenizer: decodes ids (None: no text; stop strings need one).
      max_batch: rows decoding at once, at most.
      stop_token_ids: ids that end every row.
      stop_strings: the default stop strings of a row (a `Request.stop` replaces them).
      refill_min: with rows waiting, the decode loop returns to refill once this many slots
        are free (1: at the first free slot, so slots never idle while rows wait).
      stop_check_every: decode steps between the host's stop-string checks.
      poll_steps: decode steps at most per call when no row waits (None: until every row is
        done; a `StreamEngine` polls so rows submitted meanwhile join soon).
      reuse_prefixes: start rows from shared prefixes prefilled once (see prefill.py).
      output_format: every row's text matches this format (a `Format`, compiled here over the
        vocabulary with the stop ids, or an `Automaton`); stop ids end rows only where the
        format is complete. Each `Generation` says whether it is (`complete`).
      logprobs: each `Generation` carries its tokens' log-probabilities (`logprobs`).
      unbounded_context: rows may be longer than the model's context (families whose state
        has a fixed size, RecurrentGemma: the prompt streams through it in chunks).
    """

    def __init__(self, engine: Engine, tokenizer: Any = None, *, max_batch: int = 16,
                 stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 refill_min: int = 1, stop_check_every: int = 16, poll_steps: int | None = None,
                 reuse_prefixes: bool = True, output_format: Format | Automaton | None = None,
                 logprobs: bool = False, unbounded_context: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = engine.cfg
        for s in stop_token_ids:
            if not 0 <= int(s) < cfg.vocab_size:
                raise ValueError(f"stop token id {s} is outside the vocabulary "
                                 f"[0, {cfg.vocab_size})")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch = min(max_batch, engine.buckets.max_batch)
        self.stop_set = frozenset(int(s) for s in stop_token_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.refill_min, self.stop_check_every = max(1, refill_min), stop_check_every
        self.poll_steps, self.reuse_prefixes = poll_steps, reuse_prefixes
        self.logprobs = logprobs
        if unbounded_context and not engine.family.FIXED_STATE:
            raise ValueError(f"{engine.family.__name__}'s state grows with the sequence: rows "
                             "cannot exceed the model's context")
        self.max_seq_len = None if unbounded_context else cfg.max_seq_len
        self.stats = DecodeStats()
        # Waiting rows, a heap: longest budget first, then arrival (see `add`).
        self.waiting: list[tuple[int, int, Row]] = []
        self._stop: dict[int, tuple[str, ...]] = {}  # row key -> its stop strings
        self._on_done: dict[int, DONE] = {}
        self._next_key = 0
        self._lane: _Lane | None = None
        if isinstance(output_format, Format):
            output_format = compile_format(output_format, tokenizer, cfg.vocab_size,
                                           sorted(self.stop_set))
        self.automaton = output_format
        self._tables = None if output_format is None else engine.format_tables(output_format)
        enable_compile_cache()

    # -- rows in -------------------------------------------------------------------------------

    def add(self, requests: Sequence[Request], on_done: DONE, index0: int = 0) -> list[int]:
        """Checks and queues rows; `on_done(key, generation)` is called (from `step`) as each
        finishes. Returns their keys. Raises ValueError (nothing queued) for a bad request,
        naming it by `index0` + its position."""
        cfg = self.engine.cfg
        rows = [check_request(r, index0 + i, cfg.vocab_size, self.max_seq_len)
                for i, r in enumerate(requests)]
        keys = []
        for req, row in zip(requests, rows):
            row.index = key = self._next_key
            self._next_key += 1
            keys.append(key)
            stop = self.stop_strings if req.stop is None else tuple(s for s in req.stop if s)
            if row.settings.max_new == 0:
                on_done(key, Generation([], "", "length", len(row.prompt), 0,
                                        logprobs=[] if self.logprobs else None))
                continue
            self._stop[key], self._on_done[key] = stop, on_done
        todo = [r for r in rows if r.index in self._on_done]
        if self.reuse_prefixes and todo:
            assign_prefixes(todo, list(self.engine.prefixes))
        # Longest budgets first, over every waiting row whenever it arrived (the tail of a job
        # is its longest rows: started early, they end with the rest), then arrival order.
        for r in todo:
            heapq.heappush(self.waiting, (-r.settings.max_new, r.index, r))
        return keys

    @property
    def idle(self) -> bool:
        return not self.waiting and (self._lane is None or self._lane.empty)

    @property
    def rows_in_slots(self) -> int:
        return 0 if self._lane is None else self._lane.count

    @property
    def next_key(self) -> int:
        """The key the next added row gets (keys count up from 0)."""
        return self._next_key

    def drop(self) -> list[tuple[int, DONE]]:
        """Forgets every row (after a failed device call: the state cannot be trusted);
        returns their (key, on_done) so the caller can fail them."""
        keys = [r.index for _, _, r in self.waiting]
        if self._lane is not None:
            keys += [r.index for r in self._lane.rows if r is not None]
        self.waiting.clear()
        self._lane = None
        gone = [(k, self._on_done.pop(k)) for k in keys if k in self._on_done]
        for k in keys:
            self._stop.pop(k, None)
        return gone

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> int:
        """Places waiting rows into free slots, runs one decode call, finishes the rows that
        ended (their `on_done`). Returns how many rows finished."""
        if self.idle:
            return 0
        lane = self._place()
        stops = [self._stop[r.index] for r in lane.rows if r is not None]
        common = set(stops[0]).intersection(*stops[1:]) if stops else set()
        any_strings = any(stops)
        # Tokens whose own text holds a stop string every row shares end rows on device too.
        table = stop_table(sorted(self.stop_set | {
            i for i in stop_string_tokens(self.tokenizer, sorted(common),
                                          self.engine.cfg.vocab_size)}))
        waiting = len(self.waiting)
        b, cap = lane.b, min(lane.b, self.max_batch)
        min_free = min(waiting, self.refill_min) + (b - cap) if waiting else b + 1
        max_steps = np.iinfo(np.int32).max
        if any_strings:
            max_steps = self.stop_check_every
        if not waiting and self.poll_steps:
            max_steps = min(max_steps, self.poll_steps)
        greedy = all(r.settings.temperature <= 0 for r in lane.rows if r is not None)
        lane.state, lane.slots, steps, busy = self.engine.decode(
            lane.state, lane.slots, table, max_steps, min_free, lane.length, self._tables,
            self.logprobs, greedy)
        sl = lane.slots
        active, n_out, out, fsm, logp, steps, busy = jax.device_get(
            (sl.active, sl.n_out, sl.out, sl.fsm, sl.logp if self.logprobs else None, steps,
             busy))
        for st in (self.stats, self.engine.decode_stats):  # this stream's, the engine's
            st.add(int(steps), int(busy), cap, bool(waiting))
        return self._collect(lane, active, n_out, out, fsm, logp)

    def _collect(self, lane: "_Lane", active: np.ndarray, n_out: np.ndarray,
                 out: np.ndarray, fsm: np.ndarray, logp: np.ndarray | None) -> int:
        kill = np.zeros((lane.b,), bool)
        done = 0
        for s, r in enumerate(lane.rows):
            if r is None:
                continue
            ids = out[s, : n_out[s]].tolist()
            stop = self._stop[r.index]
            if active[s]:
                if not stop or first_stop(decode_text(self.tokenizer, ids), stop) < 0:
                    continue
                kill[s] = True
            gen = finish(r, ids, self.tokenizer, self.stop_set, stop,
                         None if logp is None else logp[s, : n_out[s]])
            if self.automaton is not None:
                gen = dataclasses.replace(gen, complete=bool(self.automaton.final[fsm[s]]))
            lane.rows[s] = None
            self._stop.pop(r.index)
            self._on_done.pop(r.index)(r.index, gen)
            done += 1
        if kill.any():
            lane.slots = self.engine.deactivate(lane.slots, kill, lane.length)
        return done

    def _place(self) -> "_Lane":
        """Moves waiting rows into free slots (resizing the slots to fit them) and prefills
        them; returns the lane."""
        bk = self.engine.buckets
        lane = self._lane
        held = [] if lane is None else [r for r in lane.rows if r is not None]
        picked = [heapq.heappop(self.waiting)[2]
                  for _ in range(min(self.max_batch - len(held), len(self.waiting)))]
        rows = held + picked
        b = min(bk.batch_bucket(min(len(rows) + len(self.waiting), self.max_batch)),
                bk.max_batch)
        length = bk.length_bucket(max(len(r.prompt) + r.settings.max_new for r in rows))
        out_len = bk.out_bucket(max(r.settings.max_new for r in rows), length)
        if lane is None or not held:  # nothing to keep: slots shaped for these rows
            lane = self._lane = _Lane(self.engine, b, length, out_len)
        else:
            shrink = length <= lane.length // 2  # every row fits half the cache
            new = (max(b, lane.b),
                   length if shrink or length > lane.length else lane.length,
                   out_len if shrink or out_len > lane.out_len else lane.out_len)
            if new != (lane.b, lane.length, lane.out_len):
                lane.resize(*new)
                self.stats.resizes += 1
                self.engine.decode_stats.resizes += 1
        if picked:
            free = [s for s in range(lane.b) if lane.rows[s] is None]
            placed = list(zip(free, picked))
            for s, r in placed:
                lane.rows[s] = r
            lane.state, lane.slots = prefill_rows(self.engine, lane.state, lane.slots, placed,
                                                  lane.length)
        return lane


class _Lane:
    """The device state of the slots: B slots of cache length L, O generated tokens each."""

    def __init__(self, engine: Engine, b: int, length: int, out_len: int):
        self.engine, self.b, self.length, self.out_len = engine, b, length, out_len
        self.state = engine.init_state(b, length)
        self.slots = engine.empty_slots(b, out_len)
        self.rows: list[Row | None] = [None] * b

    @property
    def count(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def resize(self, b: int, length: int, out_len: int) -> None:
        self.state, self.slots = self.engine.resize(self.state, self.slots, self.length, b,
                                                    length, out_len)
        self.rows += [None] * (b - self.b)
        self.b, self.length, self.out_len = b, length, out_len


class StreamEngine:
    """A `Stream` on its own thread: `submit` rows from any thread, get a future per row.

    A failed device call fails the rows in flight with its error (the stream restarts empty);
    `close` stops the thread and fails the rows not done. `call` runs other work on the engine
    (e.g. scoring) on the same thread, between decode calls.

    `gather_s`: when rows arrive at an idle engine, it waits until this long after they came for
    more before placing any, so batches submitted together (a Ray actor's concurrent batches)
    are placed as one set (the longest budgets first, slots and cache shaped for all of them)
    rather than the first batch alone and the rest into slots shaped for it. Time the engine's
    thread spent on other work (a `call`, e.g. scoring) counts towards it.
    """

    def __init__(self, engine: Engine, tokenizer: Any = None, poll_steps: int = 16,
                 gather_s: float = 0.25, **stream_kw: Any):
        self.stream = Stream(engine, tokenizer, poll_steps=poll_steps, **stream_kw)
        self.gather_s = gather_s
        self._lock = threading.Condition()
        self._inbox: list[tuple[list[Request], list[concurrent.futures.Future]]] = []
        self._first_in = 0.0  # _now() when the oldest waiting rows were submitted
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gemma-batch-engine",
                                        daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request]) -> list[concurrent.futures.Future]:
        """Queues rows; each future resolves to its `Generation`, or fails with a ValueError
        for a bad row or with the device error that failed it."""
        futures: list[concurrent.futures.Future] = [
            concurrent.futures.Future() for _ in requests]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if not self._inbox:
                self._first_in = _now()
            self._inbox.append((list(requests), futures))
            self._lock.notify()
        return futures

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs `fn()` on the engine's thread between decode calls; its future gets the result
        (or the exception)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._calls.append((fn, fut))
            self._lock.notify()
        return fut

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=60)

    def _done(self, key: int, gen: Generation) -> None:
        self._futures.pop(key).set_result(gen)

    def _take_inbox(self) -> None:
        with self._lock:
            while (not self._inbox and not self._calls and self.stream.idle
                   and not self._closed):
                self._lock.wait()
            if self._inbox and self.stream.idle and self.gather_s > 0:
                deadline = self._first_in + self.gather_s  # spent already if the thread was busy
                while not self._closed and (left := deadline - _now()) > 0:
                    self._lock.wait(left)
            inbox, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller's to handle
                fut.set_exception(e)
        cfg = self.stream.engine.cfg
        for requests, futures in inbox:
            good = []
            for i, (req, fut) in enumerate(zip(requests, futures)):
                try:  # a bad row fails alone
                    check_request(req, i, cfg.vocab_size, self.stream.max_seq_len)
                    good.append((req, fut))
                except ValueError as e:
                    fut.set_exception(e)
            # Keys are given in order before any row can finish: register them first.
            first = self.stream.next_key
            for k, (_, fut) in enumerate(good):
                self._futures[first + k] = fut
            self.stream.add([r for r, _ in good], self._done)

    def _fail_all(self, error: BaseException) -> None:
        for key, _ in self.stream.drop():
            fut = self._futures.pop(key, None)
            if fut is not None:
                fut.set_exception(error)

    def _loop(self) -> None:
        while True:
            self._take_inbox()
            if self._closed:
                self._fail_all(RuntimeError("the engine was closed before this row finished"))
                for _, fut in self._calls:
                    fut.set_exception(RuntimeError("the engine was closed"))
                return
            try:
                self.stream.step()
            except Exception as e:  # noqa: BLE001 - handed to every row in flight
                self._fail_all(e)
