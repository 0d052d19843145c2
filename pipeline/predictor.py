"""The generator actors: each loads the model once and turns batches of rows into output rows,
written by the actor itself as a part under `_parts/` (pipeline/parts.py); the driver gets one
small record per batch, never the rows.

`StreamingPredictor` (batching: stream) takes several batches at once (Ray Data's concurrent
calls into an async `__call__`), all feeding one long-lived `StreamEngine`, so a batch returns
as soon as its own rows are done and freed slots take the next waiting rows of any batch.
`ClosedPredictor` (batching: closed) generates one batch at a time, until its longest row ends.

One row in, one row out. A row that cannot be used (null, empty, too long, a bad per-row
setting) or that fails in generation becomes an error row and the batch goes on; errors that
mean the engine itself is gone (out of memory, lost device) are raised so Ray retries the batch
on a fresh actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import pyarrow as pa

from pipeline import row_params
from pipeline.gen_settings import GenSettings, is_fatal, prompt_setup, row_id_of
from pipeline.gen_settings import short_error as _short
from pipeline.phases import PhaseReporter, phase_text
from pipeline.prompts import Prompt

__all__ = ["GenSettings", "Predictor", "ClosedPredictor", "StreamingPredictor", "prompt_setup",
           "row_id_of", "is_fatal", "TEXT", "QUESTION", "CONTEXT"]

log = logging.getLogger(__name__)

TEXT, QUESTION, CONTEXT = "__text", "__question", "__context"
# Prefill counts of a batch (model.engine.PrefillStats fields) and their names in its record.
PREFILL_FIELDS = {"real_tokens": "prefill_real_tokens", "padded_tokens": "prefill_padded_tokens",
                  "prefix_tokens": "prefix_reused_tokens"}
# Decode counts (model.engine.DecodeStats fields), named as such in the record.
DECODE_FIELDS = ("decode_steps", "busy_slot_steps", "waiting_steps", "waiting_busy_slot_steps",
                 "waiting_slot_steps")


@dataclasses.dataclass
class Work:
    """One batch in an actor: its rows' prompts, settings, results and errors."""

    batch: pa.Table
    prompts: list[Prompt]
    requests: list[Any]  # model.engine.Request per row (None: the row is already an error)
    errors: list[tuple[str, str] | None]
    results: list[Any]
    t0: float
    choice_probs: dict[int, Any] = dataclasses.field(default_factory=dict)  # row -> [C]
    # Rows longer than the usable context under map-reduce: row -> (text, its Request without
    # a prompt), then row -> pipeline.longdoc.Summary once summarised.
    long: dict[int, tuple[str, Any]] = dataclasses.field(default_factory=dict)
    summaries: dict[int, Any] = dataclasses.field(default_factory=dict)


class Predictor:
    """The generator of one actor: model, prompt builder, per-row settings, output rows."""

    def __init__(self, settings: GenSettings):
        from model import load_model

        self.s = settings
        self.report = PhaseReporter(settings.phase_board)
        self.report(phase_text("load"))
        self._calls = 0
        fmt = None if settings.prompt_format == "auto" else settings.prompt_format
        t0 = time.perf_counter()
        self.model = load_model(settings.model, dtype=settings.dtype, prompt_format=fmt,
                                mesh_shape=settings.mesh)
        self.load_s = time.perf_counter() - t0
        self.builder, self.stop = prompt_setup(self.model, settings)
        self.fmt = fmt = settings.output_format  # pipeline.formats.JobFormat or None
        self.gen_kw = {"output_format": fmt.automaton if fmt is not None else None,
                       "logprobs": bool(fmt is not None and fmt.logprobs),
                       "unbounded_context": settings.long_document == "stream"}
        self._choice_ids = None
        if fmt is not None and fmt.kind == "choice" and fmt.logprobs:
            self._choice_ids = [self.model.tokenizer.encode(fmt.lead + c) for c in fmt.spec]
        self.model_name = settings.model
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        info = self.model.info
        self.placement = json.dumps({"mesh": info.get("mesh"),
                                     "param_bytes_per_device": info.get("param_bytes_per_device")})
        self._work_lock = threading.Lock()
        self._work_seen = self._engine_work()
        threading.Thread(target=self._warm, name="gemma-batch-warm", daemon=True).start()

    def _warm(self) -> None:
        """Reads, while the first batch is on its way, what its first decode would wait for:
        the checkpoint's quantized codes (the 270M's 338 MB, memory-mapped from the cache) and
        the stop strings' token table (from the cache; else the whole vocabulary decoded,
        0.3 s alone, 3 s beside Ray's processes starting). Host work only: the device work
        (placing the codes) stays on the engine's thread. Both are kept where the engine
        looks; a failure here is met again, and raised, there."""
        from model.engine.results import stop_string_tokens

        try:
            self.model.engine.prefetch_codes()
            if self.stop:
                stop_string_tokens(self.model.tokenizer, sorted(set(self.stop)),
                                   self.model.engine.cfg.vocab_size)
        except Exception as e:  # noqa: BLE001
            log.debug("preparing the first decode failed: %s", e)

    # -- rows in ---------------------------------------------------------------------------------

    def _start(self, batch: pa.Table) -> Work:
        """Prompts and per-row settings of a batch; rows that cannot run become errors."""
        from model.engine import Request

        n, cols = batch.num_rows, batch.column_names
        texts = batch.column(TEXT).to_pylist()
        questions = batch.column(QUESTION).to_pylist() if QUESTION in cols else None
        contexts = batch.column(CONTEXT).to_pylist() if CONTEXT in cols else None
        raw = {p: batch.column(row_params.PREFIX + p).to_pylist() for p in self.s.params
               if row_params.PREFIX + p in cols}
        ids = batch.column("id").to_pylist()
        s = self.s
        defaults = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                    "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
                    "stop": tuple(self.stop or ())}
        work = Work(batch, [], [], [None] * n, [None] * n, time.perf_counter())
        for i in range(n):
            try:
                prompt = self.builder.build(texts[i], questions[i] if questions else None,
                                            contexts[i] if contexts else None)
            except Exception as e:  # noqa: BLE001 - a row's failure is data
                prompt = Prompt(None, "prompt", f"could not build the prompt: {_short(e)}")
            work.prompts.append(prompt)
            req = None
            long = prompt.error_kind == "too_long" and s.long_document == "map-reduce"
            if prompt.ids is None and not long:
                work.errors[i] = (prompt.error_kind or "prompt", prompt.error or "")
            else:
                try:
                    rs = row_params.parse({p: v[i] for p, v in raw.items()}, defaults)
                    req = Request(prompt.ids or [], rs["max_new_tokens"], rs["temperature"],
                                  rs["top_k"], rs["top_p"], rs["seed"], row_id_of(ids[i]),
                                  rs["stop"])
                except (ValueError, TypeError) as e:
                    work.errors[i] = ("params", f"bad per-row sampling setting: {e}")
                if long and req is not None:  # summarised by map-reduce (pipeline/longdoc.py)
                    work.long[i], req = (texts[i], req), None
            work.requests.append(req)
        return work

    # -- rows out --------------------------------------------------------------------------------

    def _engine_work(self) -> dict[str, float]:
        engine = self.model.engine
        dec = engine.decode_stats
        return {**engine.stats.as_dict(), **{k: getattr(dec, k) for k in DECODE_FIELDS},
                "compile_s": engine.compile_log.seconds}

    def _work_since_last(self) -> dict[str, Any]:
        """Engine work since this actor's previous record (each unit counted once, however
        batches overlap)."""
        with self._work_lock:
            now = self._engine_work()
            delta = {k: now[k] - self._work_seen[k]
                     for k in (*PREFILL_FIELDS, *DECODE_FIELDS, "compile_s")}
            self._work_seen = now
        return {**{name: int(delta[k]) for k, name in PREFILL_FIELDS.items()},
                **{k: int(delta[k]) for k in DECODE_FIELDS},
                "compile_s": round(float(delta["compile_s"]), 3)}

    def _finish(self, work: Work) -> tuple[pa.Table, dict[str, Any]]:
        """The batch's output rows and its batch record."""
        from pipeline import parts

        n = work.batch.num_rows
        out: dict[str, list] = {k: [] for k in ("output", "finish_reason", "error", "error_kind",
                                                "prompt_tokens", "output_tokens", "truncated")}
        extra = [f.name for f in self.fmt.fields()] if self.fmt is not None else []
        out.update({k: [None] * n for k in (*extra, "chunks", "input_tokens")})
        for i in range(n):
            g, err, p = work.results[i], work.errors[i], work.prompts[i]
            if err is not None or g is None:
                kind, msg = err or ("generation", "no result from the generator")
                row = (None, "error", msg, kind, len(p.ids) if p.ids else 0, 0)
            else:
                # Cut at max_new_tokens inside a multi-byte character: drop the partial one.
                text = g.text.rstrip("\ufffd") if g.finish_reason == "length" else g.text
                row = (text, g.finish_reason, None, None, int(g.prompt_tokens),
                       int(g.output_tokens))
                sm = work.summaries.get(i)  # a long document: what all its calls took
                out["chunks"][i] = sm.chunks if sm else 1
                out["input_tokens"][i] = sm.input_tokens if sm else row[4]
                if self.fmt is not None:
                    row, values = self._formatted(work, i, g, row)
                    for k, v in values.items():
                        out[k][i] = v
            for k, v in zip(("output", "finish_reason", "error", "error_kind", "prompt_tokens",
                             "output_tokens"), row):
                out[k].append(v)
            out["truncated"].append(bool(p.truncated))
        table = parts.output_table(self.s.schema, work.batch, out, self.s.task, self.model_name)
        latency = time.perf_counter() - work.t0
        name = parts.part_name(work.batch.column("id").to_pylist())
        record = parts.batch_record(table, name, self.actor, time.time(), latency,
                                    {**self._work_since_last(),
                                     "long_documents": self._long_outcomes(work)})
        return table, record

    def _long_outcomes(self, work: Work) -> dict[str, int]:
        """Rows longer than the usable context, by what became of them."""
        limit = self.builder.s.max_prompt_tokens
        got = {"map_reduce": len(work.summaries),
               "map_reduce_failed": sum(e is not None and e[0] == "long_document"
                                        for e in work.errors),
               "truncated": sum(p.truncated for p in work.prompts),
               "streamed": sum(len(p.ids or ()) > limit for p in work.prompts),
               "too_long": sum(e is not None and e[0] == "too_long" for e in work.errors)}
        return {k: v for k, v in got.items() if v}

    def _formatted(self, work: Work, i: int, g: Any, row: tuple) -> tuple[tuple, dict]:
        """A generated row through the output format (pipeline/formats.py): (its row, or an
        error row, and the values of the format's columns)."""
        probs = work.choice_probs.get(i)
        text, values, err = self.fmt.row(
            row[0], g.complete, g.logprobs, g.output_tokens,
            (work.requests[i] or work.long[i][1]).max_new_tokens,
            (lambda: probs) if probs is not None else None)
        if err is not None:
            return (text if err[0] == "parse" else None, "error", err[1], err[0], row[4],
                    row[5]), values
        return (text, *row[1:]), values

    def _score_choices(self, work: Work) -> None:
        """choice_probs of the generated rows (choice format with logprobs), from the logits."""
        from model.engine import choice_probs

        if self._choice_ids is None:
            return
        stops = tuple(self.model.tokenizer.stop_ids)
        for i, g in enumerate(work.results):
            if g is None or work.errors[i] is not None or not g.complete:
                continue
            try:
                work.choice_probs[i] = choice_probs(self.model.engine, work.prompts[i].ids,
                                                    self._choice_ids, stops)
            except Exception as e:  # noqa: BLE001 - a row's failure is data
                if is_fatal(e):
                    raise
                work.errors[i] = ("generation", f"scoring the choices failed: {_short(e)}")

    def _commit(self, work: Work) -> pa.Table:
        from pipeline import parts

        table, record = self._finish(work)
        return parts.commit(self.s.output, table, record, self.placement, self.s.lease)

    # -- closed batches --------------------------------------------------------------------------

    def rows(self, batch: pa.Table) -> pa.Table:
        """A batch's output rows, generated as one closed batch (tests and tools)."""
        work = self._start(batch)
        self._generate_closed(work)
        return self._finish(work)[0]

    def _generate_closed(self, work: Work) -> None:
        todo = [i for i, r in enumerate(work.requests) if r is not None]
        stop_watch = self._watch_first_compiles([len(work.requests[i].prompt) for i in todo])
        try:
            self._run_closed(work, todo)
            if work.long:
                async def gen(reqs: list[Any]) -> list[Any]:
                    return self._generate_list(reqs)

                asyncio.run(self._run_long(work, gen))
            self._score_choices(work)
        finally:
            stop_watch()

    def _run_closed(self, work: Work, todo: list[int]) -> None:
        if not todo:
            return
        got = self._generate_list([work.requests[i] for i in todo])
        failed = [(i, g) for i, g in zip(todo, got) if isinstance(g, BaseException)]
        for i, g in zip(todo, got):
            if not isinstance(g, BaseException):
                work.results[i] = g
        if len(todo) == 1 and failed:
            work.errors[todo[0]] = ("generation", f"generation failed: {_short(failed[0][1])}")
        elif failed:  # a call failed with other rows in it: each of its rows once more, alone
            log.warning("batch generate failed (%s); retrying row by row",
                        _short(failed[0][1], 120))
            for i, _ in failed:
                self._run_closed(work, [i])

    def _generate_list(self, reqs: list[Any]) -> list[Any]:
        """A Generation, or the exception that failed its call, per request (one generate call
        per set of stop strings); errors that end the engine are raised."""
        got: list[Any] = [None] * len(reqs)
        for stop in dict.fromkeys(r.stop for r in reqs):
            idx = [k for k, r in enumerate(reqs) if r.stop == stop]
            sub = [reqs[k] for k in idx]
            col = {f: [getattr(r, f) for r in sub] for f in ("max_new_tokens", "temperature",
                                                             "top_k", "top_p", "seed")}
            try:
                gens = self.model.generate(
                    [r.prompt for r in sub], stop=list(stop or ()),
                    row_ids=[r.row_id for r in sub], max_batch=max(1, min(
                        len(sub), self.s.slots, self.model.engine.buckets.max_batch)),
                    **col, **self.gen_kw)
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                gens = [e] * len(sub)
            for k, g in zip(idx, gens):
                got[k] = g
        return got

    async def _run_long(self, work: Work, generate: Any) -> None:
        """Summarises the batch's long documents by map-reduce (pipeline/longdoc.py), their
        chunks through `generate(requests) -> [Generation or exception]`."""
        from pipeline.longdoc import LongDocumentError, map_reduce

        async def one(i: int, text: str, req: Any) -> None:
            async def gen(prompts: list[list[int]], keys: list[int]) -> list[Any]:
                return await generate([dataclasses.replace(req, prompt=p, row_id=k)
                                       for p, k in zip(prompts, keys)])

            try:
                work.summaries[i] = sm = await map_reduce(text, self.builder, gen, req.row_id)
                work.results[i] = sm.final
            except LongDocumentError as e:
                if e.__cause__ is not None and is_fatal(e.__cause__):
                    raise e.__cause__ from None
                work.errors[i] = ("long_document", str(e))

        await asyncio.gather(*(one(i, t, r) for i, (t, r) in work.long.items()))

    def _watch_first_compiles(self, lengths: list[int], stream: bool = False) -> Any:
        """On this actor's first batch: reports about how many programs it compiles (`stream`:
        into a new `StreamEngine`), then each compile as it lands (the driver shows it until the
        first row). Returns a stopper."""
        self._calls += 1
        if self._calls > 1 or not lengths:
            return lambda: None
        from model.engine import expected_programs, plan_programs

        engine = self.model.engine
        slots = max(1, min(self.s.slots, engine.buckets.max_batch))
        planned = expected_programs(plan_programs(
            lengths, self.s.max_new_tokens, min(len(lengths), slots), engine.buckets,
            stop_strings=bool(self.stop)), one_wave=stream and len(lengths) <= slots)
        self.report(phase_text("compile", n=planned))
        return self.report.watch_compiles(lambda: engine.compile_log.count, planned)


class ClosedPredictor(Predictor):
    """Ray Data callable class, batching: closed: one batch at a time, generated in full."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        work = self._start(batch)
        self._generate_closed(work)
        return self._commit(work)


class StreamingPredictor(Predictor):
    """Ray Data callable class, batching: stream: concurrent batches into one `StreamEngine`
    (started on the first batch); each returns when its own rows are done."""

    _engine: Any = None
    _stop_watch: Any = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        work = self._start(batch)
        todo = [i for i, r in enumerate(work.requests) if r is not None]
        if self._engine is None:
            from model.engine import StreamEngine

            self._stop_watch = self._watch_first_compiles(
                [len(work.requests[i].prompt) for i in todo], stream=True)
            tok = self.model.tokenizer
            self._engine = StreamEngine(
                self.model.engine, tok, max_batch=max(1, min(self.s.slots,
                                                             self.model.engine.buckets.max_batch)),
                stop_token_ids=tuple(tok.stop_ids), stop_strings=tuple(self.stop or ()),
                **self.gen_kw)
        await asyncio.gather(self._run(work, todo, retry=True),
                             self._run_long(work, self._submit_all))
        if self._choice_ids is not None:  # on the engine's thread, between its decode calls
            await asyncio.wrap_future(self._engine.call(lambda: self._score_choices(work)))
        if self._stop_watch is not None:
            self._stop_watch, stop = None, self._stop_watch
            stop()
        return await asyncio.to_thread(self._commit, work)

    def close(self) -> None:
        """Stops the engine's thread (rows still in it fail), so the engine and its compiled
        programs can be freed; an actor's process ending does the same."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    async def _submit_all(self, reqs: list[Any]) -> list[Any]:
        """Rows into the engine; a Generation or an exception per row."""
        futures = self._engine.submit(reqs)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures),
                                         return_exceptions=True))

    async def _run(self, work: Work, todo: list[int], retry: bool) -> None:
        done = await self._submit_all([work.requests[i] for i in todo])
        failed = []
        for i, res in zip(todo, done):
            if not isinstance(res, BaseException):
                work.results[i] = res
            elif is_fatal(res):
                raise res
            elif isinstance(res, ValueError) or not retry:
                work.errors[i] = ("generation", f"generation failed: {_short(res)}")
            else:
                failed.append(i)
        if failed:  # a device call failed with other rows in it: each row once more, alone
            log.warning("generation failed for %d rows; retrying them one by one", len(failed))
            for i in failed:
                await self._run(work, [i], retry=False)
