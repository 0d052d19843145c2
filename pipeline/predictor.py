"""The generator actor: loads the model once, builds prompts and generates per batch.

One row in, one row out. A row that cannot be used (null, empty, too long) or that fails in
generation becomes an error row and the batch goes on; errors that mean the engine itself is
gone (out of memory, lost device) are raised so Ray retries the batch on a fresh actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa

from pipeline.phases import PhaseReporter, phase_text
from pipeline.prompts import Prompt, PromptBuilder, PromptSettings, default_stop
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)

TEXT, QUESTION, CONTEXT = "__text", "__question", "__context"
LATENCY = "__batch_latency_s"  # per-row copy of the batch's generate time, stripped by the driver
BATCH = "__batch_id"  # per-row copy of a random batch id, stripped by the driver
PLACEMENT = "__placement"  # per-row copy of the actor's mesh and parameter bytes (JSON), stripped
ACTOR = "__actor"  # per-row copy of the actor's identity ("host:pid"), stripped by the driver
BATCH_END = "__batch_end"  # per-row copy of the batch's end time (Unix s), stripped
PREFILL = "__prefill"  # per-row copy of the batch's prefill work and compile time (JSON)
HIDDEN = (LATENCY, BATCH, PLACEMENT, ACTOR, BATCH_END, PREFILL)  # stripped before commit
# Prefill counts of a batch (model.engine.PrefillStats fields) and their names in its record.
PREFILL_FIELDS = {"real_tokens": "prefill_real_tokens", "padded_tokens": "prefill_padded_tokens",
                  "prefix_tokens": "prefix_reused_tokens"}
_FATAL_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "DEVICE_LOST", "UNAVAILABLE",
                  "device lost", "Device lost")


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """What the actor needs besides rows: model source, prompt and sampling settings."""

    model: str
    dtype: str | None
    prompt_format: str  # auto | chat | completion
    task: str
    instruction: str | None
    summary_words: int | None
    max_prompt_tokens: int | None
    long_document: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop: tuple[str, ...] | None
    mesh: tuple[int, int] | None  # (data, model); None = chosen from devices and model size
    schema: pa.Schema  # the output schema (id, contract columns, carried columns)
    phase_board: str | None = None  # named Ray actor the actor reports its phase to

    @classmethod
    def of(cls, spec: JobSpec, schema: pa.Schema,
           phase_board: str | None = None) -> "GenSettings":
        s = spec.sampling
        return cls(
            model=spec.model, dtype=spec.dtype, prompt_format=spec.prompt_format, task=spec.task,
            instruction=spec.instruction, summary_words=spec.summary_words,
            max_prompt_tokens=spec.max_prompt_tokens, long_document=spec.long_document,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, seed=s.seed, stop=tuple(s.stop) if s.stop else None,
            mesh=spec.mesh.shape if spec.mesh else None, schema=schema, phase_board=phase_board)


def is_fatal(exc: BaseException) -> bool:
    """Errors after which this actor's engine cannot be trusted."""
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc)
    return type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and any(
        m in msg for m in _FATAL_MARKERS)


def batch_records(table: pa.Table) -> list[dict[str, Any]]:
    """One record per generate batch in an actor's output (from the hidden columns): batch id,
    actor, end time (Unix s), generate latency (s), rows, prompt/output tokens, errors and the
    prefill work (token slots computed, real tokens, prefix tokens reused)."""
    cols = table.select([BATCH, ACTOR, BATCH_END, LATENCY, PREFILL, "prompt_tokens",
                         "output_tokens", "finish_reason"]).to_pydict()
    recs: dict[str, dict[str, Any]] = {}
    for i, b in enumerate(cols[BATCH]):
        if b not in recs:
            work = json.loads(cols[PREFILL][i] or "{}")
            recs[b] = {"batch": b, "actor": cols[ACTOR][i], "end": cols[BATCH_END][i],
                       "latency_s": round(cols[LATENCY][i], 4), "rows": 0,
                       "prompt_tokens": 0, "output_tokens": 0, "errors": 0,
                       **{name: int(work.get(k, 0)) for k, name in PREFILL_FIELDS.items()},
                       "compile_s": round(float(work.get("compile_s", 0.0)), 3)}
        r = recs[b]
        r["rows"] += 1
        r["prompt_tokens"] += cols["prompt_tokens"][i] or 0
        r["output_tokens"] += cols["output_tokens"][i] or 0
        r["errors"] += cols["finish_reason"][i] == "error"
    return list(recs.values())


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:limit]}"


def prompt_setup(model: Any, settings: GenSettings) -> tuple[PromptBuilder, list[str] | None]:
    """The prompt builder and stop strings of a loaded model under these settings (the actors
    and `validate`'s token counts use the same)."""
    if model.tokenizer is None:
        raise RuntimeError(f"model {settings.model} has no tokenizer; it cannot read text")
    cfg = model.config
    limit = cfg.max_seq_len - settings.max_new_tokens
    if settings.max_prompt_tokens:
        limit = min(limit, settings.max_prompt_tokens)
    if limit < 8:
        raise RuntimeError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {cfg.max_seq_len} tokens")
    fmt_used = model.prompt_format
    builder = PromptBuilder(
        PromptSettings(settings.task, fmt_used, limit, settings.long_document,
                       settings.instruction, settings.summary_words),
        model.tokenizer,
    )
    stop = list(settings.stop) if settings.stop else default_stop(fmt_used, settings.task)
    return builder, stop


class Predictor:
    """Ray Data callable class: `__init__` loads the model, `__call__` maps a pyarrow batch."""

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
        self.model_name = settings.model
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        info = self.model.info
        self.placement = json.dumps({"mesh": info.get("mesh"),
                                     "param_bytes_per_device": info.get("param_bytes_per_device")})

    def _generate(self, prompts: list[list[int]]) -> list[Any]:
        s = self.s
        # All rows of a batch decode together (up to the engine's largest slot bucket): more rows
        # per decode step give more tokens/s (bench/generate.py measures it per batch size).
        return self.model.generate(
            prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, seed=s.seed, stop=self.stop,
            max_batch=max(1, min(len(prompts), self.model.engine.buckets.max_batch)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = batch.column_names
        texts = batch.column(TEXT).to_pylist()
        questions = batch.column(QUESTION).to_pylist() if QUESTION in cols else None
        contexts = batch.column(CONTEXT).to_pylist() if CONTEXT in cols else None
        prompts: list[Prompt] = []
        for i in range(n):
            try:
                q = questions[i] if questions else None
                c = contexts[i] if contexts else None
                prompts.append(self.builder.build(texts[i], q, c))
            except Exception as e:  # noqa: BLE001 - a row's failure is data
                prompts.append(Prompt(None, "prompt", f"could not build the prompt: {_short(e)}"))
        results: list[Any] = [None] * n
        errors: list[tuple[str, str] | None] = [
            (p.error_kind or "prompt", p.error or "") if p.ids is None else None for p in prompts]
        todo = [i for i in range(n) if prompts[i].ids is not None]
        t0 = time.perf_counter()
        work0 = {**self.model.engine.stats.as_dict(),
                 "compile_s": self.model.engine.compile_log.seconds}
        stop_watch = self._watch_first_compiles([len(prompts[i].ids) for i in todo])
        if todo:
            try:
                gens = self._generate([prompts[i].ids for i in todo])
                for i, g in zip(todo, gens):
                    results[i] = g
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                log.warning("batch generate failed (%s); retrying row by row", _short(e, 120))
                for i in todo:
                    try:
                        results[i] = self._generate([prompts[i].ids])[0]
                    except Exception as e1:  # noqa: BLE001
                        if is_fatal(e1):
                            raise
                        errors[i] = ("generation", f"generation failed: {_short(e1)}")
            finally:
                stop_watch()
        latency = time.perf_counter() - t0
        work1 = {**self.model.engine.stats.as_dict(),
                 "compile_s": self.model.engine.compile_log.seconds}
        work = json.dumps({k: work1[k] - work0[k] for k in (*PREFILL_FIELDS, "compile_s")})
        return self._table(batch, prompts, results, errors, latency, work)

    def _watch_first_compiles(self, lengths: list[int]) -> Any:
        """On this actor's first batch: reports about how many programs it compiles, then each
        compile as it lands (the driver shows it until the first row). Returns a stopper."""
        self._calls += 1
        if self._calls > 1 or not lengths:
            return lambda: None
        from model.engine import expected_programs, plan_programs

        engine = self.model.engine
        planned = expected_programs(plan_programs(
            lengths, self.s.max_new_tokens, max(1, min(len(lengths), engine.buckets.max_batch)),
            engine.buckets, stop_strings=bool(self.stop)))
        self.report(phase_text("compile", n=planned))
        return self.report.watch_compiles(lambda: engine.compile_log.count, planned)

    def _table(self, batch: pa.Table, prompts: list[Prompt], results: list[Any],
               errors: list[tuple[str, str] | None], latency: float,
               prefill: str = "{}") -> pa.Table:
        n = batch.num_rows
        out: dict[str, list] = {k: [] for k in ("output", "finish_reason", "error", "error_kind",
                                                "prompt_tokens", "output_tokens", "truncated")}
        for i in range(n):
            g, err = results[i], errors[i]
            if err is not None or g is None:
                kind, msg = err or ("generation", "no result from the generator")
                out["output"].append(None)
                out["finish_reason"].append("error")
                out["error"].append(msg)
                out["error_kind"].append(kind)
                out["prompt_tokens"].append(len(prompts[i].ids) if prompts[i].ids else 0)
                out["output_tokens"].append(0)
            else:
                text = g.text
                if g.finish_reason == "length":
                    # Cut at max_new_tokens inside a multi-byte character: drop the partial one.
                    text = text.rstrip("\ufffd")
                out["output"].append(text)
                out["finish_reason"].append(g.finish_reason)
                out["error"].append(None)
                out["error_kind"].append(None)
                out["prompt_tokens"].append(int(g.prompt_tokens))
                out["output_tokens"].append(int(g.output_tokens))
            out["truncated"].append(bool(prompts[i].truncated))
        schema = self.s.schema
        arrays = []
        for field in schema:
            name = field.name
            if name == "id":
                arrays.append(batch.column("id").cast(field.type))
            elif name == "task":
                arrays.append(pa.array([self.s.task] * n, pa.string()))
            elif name == "model":
                arrays.append(pa.array([self.model_name] * n, pa.string()))
            elif name in out:
                arrays.append(pa.array(out[name], field.type))
            elif name in batch.column_names:
                arrays.append(batch.column(name).cast(field.type))
            else:
                arrays.append(pa.nulls(n, field.type))
        table = pa.Table.from_arrays(arrays, schema=schema)
        table = table.append_column(LATENCY, pa.array([latency] * n, pa.float64()))
        table = table.append_column(PLACEMENT, pa.array([self.placement] * n, pa.string()))
        table = table.append_column(ACTOR, pa.array([self.actor] * n, pa.string()))
        table = table.append_column(BATCH_END, pa.array([time.time()] * n, pa.float64()))
        table = table.append_column(PREFILL, pa.array([prefill] * n, pa.string()))
        return table.append_column(BATCH, pa.array([uuid.uuid4().hex] * n, pa.string()))
