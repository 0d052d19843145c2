"""The engine's one-call API: `generate` runs every row through one `Stream` (stream.py) and
returns their `Generation`s in input order; `plan_programs` bounds the programs it compiles.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from model.engine.buckets import DEFAULT_BUCKETS, Buckets
from model.engine.constrain import Automaton, Format
from model.engine.programs import Engine
from model.engine.results import MAX_STOP_TOKENS, Generation, stop_string_tokens
from model.engine.stream import Request, Stream

__all__ = ["generate", "plan_programs", "expected_programs", "Generation", "stop_string_tokens",
           "MAX_STOP_TOKENS"]


# ----------------------------------------------------------------------------------------------
# Shapes: groups of rows, slots, prefill sizes and the programs they imply.


def plan_programs(prompt_lengths: Sequence[int], max_new_tokens: int, max_batch: int,
                  buckets: Buckets = DEFAULT_BUCKETS, stop_strings: bool = False,
                  refill_min: int | None = None) -> set[tuple]:
    """Upper bound on the programs `generate` may compile for these prompts (no device work).

    Returns a set of (kind, shape...) tuples. The slots (B = bucket(min(#rows, max_batch)))
    take every cache length bucket L between the shortest and the longest need (prompt +
    max_new_tokens); per L: a decode program (plus `deactivate` with stop strings), a resize
    from it ("resize", B, L), packed prefills ("packed", B, L, N, span) for the pack and span
    buckets its rows can reach, the 1-slot packed prefills of a shared prefix, and chunked
    prefills ("prefill", B, L, P, T) for prompts past the largest span.
    """
    del refill_min  # refills pack rows like the first fill: no shapes of their own
    progs: set[tuple] = set()
    if not prompt_lengths:
        return progs
    needs = [n + max_new_tokens for n in prompt_lengths]
    lo, hi = buckets.length_bucket(min(needs)), buckets.length_bucket(max(needs))
    b = _slots_for(len(needs), max_batch, buckets)
    heads = sorted((min(n - 1, buckets.span_max) for n in prompt_lengths), reverse=True)
    top_n = buckets.pack_bucket(sum(heads[:b]))
    top_span = buckets.span_bucket(heads[0])
    longest = max(prompt_lengths) - 1
    for length in (x for x in buckets.length if lo <= x <= hi):
        progs.add(("decode", b, length))
        progs.add(("resize", b, length))
        if stop_strings:
            progs.add(("deactivate", b, length))
        for slots, top in ((b, top_n), (1, buckets.pack_bucket(heads[0]))):  # rows; a prefix
            for n in buckets.pack:
                for span in buckets.span:
                    if n <= top and span <= top_span:
                        progs.add(("packed", slots, length, n, span))
        if longest > buckets.span_max:
            top = buckets.chunk_bucket(longest - buckets.span_max)
            for p in (x for x in buckets.batch if x <= b):
                for t in (c for c in buckets.chunk if c <= top):
                    progs.add(("prefill", b, length, p, t))
                    progs.add(("prefill", 1, length, 1, t))
    return progs


def expected_programs(plan: set[tuple], one_wave: bool = False) -> int:
    """About how many programs a call compiles, from its `plan_programs` bound: every decode,
    deactivate and chunked program it lists, plus per group two packed ones (the first fill and
    a shared prefix); refills of other sizes add a few more. `one_wave`: every row gets a slot
    at once (a streaming engine's first batch of at most its slots): one cache length, the
    longest, so its decode, the rows' packed prefill, a shared prefix's and, for prompts past
    the largest span, a chunked prefill (the demo: 3)."""
    if one_wave and plan:
        return 3 + any(p[0] == "prefill" for p in plan)
    groups = {p[1:3] for p in plan if p[0] == "decode"}
    fixed = sum(1 for p in plan if p[0] != "packed")
    return min(len(plan), fixed + 2 * len(groups))


def _slots_for(n_rows: int, max_batch: int, buckets: Buckets) -> int:
    """Decode slots: the batch bucket of min(n_rows, max_batch) (at most the largest bucket).

    The bucket may hold more slots than max_batch (21 rows, max_batch 21: 24 slots); the
    scheduler never fills more than max_batch of them, so the rows still run as one wave."""
    return min(buckets.batch_bucket(min(n_rows, max_batch)), buckets.max_batch)


# ----------------------------------------------------------------------------------------------
# Validation: arguments -> rows, before any device work.


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; pass one per "
                             "prompt or a single value")
        return list(value)
    return [value] * n


def generate(engine: Engine, prompts: Sequence[Sequence[int]], tokenizer: Any = None, *,
             max_new_tokens: int | Sequence[int] = 64,
             temperature: float | Sequence[float] = 0.0,
             top_k: int | None | Sequence[int | None] = None,
             top_p: float | None | Sequence[float | None] = None,
             seed: int | Sequence[int] = 0, row_ids: Sequence[int] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] | None = None, max_batch: int = 16,
             refill_min: int | None = None, stop_check_every: int = 16,
             reuse_prefixes: bool = True,
             output_format: Format | Automaton | None = None,
             logprobs: bool = False, unbounded_context: bool = False) -> list[Generation]:
    """Generates a continuation for every prompt (token ids, BOS included), in input order.

    One `Stream` (stream.py) over all the rows: they fill up to `max_batch` decode slots,
    longest budgets first, and each freed slot takes the next waiting row.

    Args:
      engine: the model's compiled programs and shape buckets (`Model.engine`).
      prompts: token id lists, each non-empty.
      tokenizer: decodes ids to text (None: no text).
      max_new_tokens: tokens to generate at most, one value or one per prompt.
      temperature / top_k / top_p: sampling settings, one value or one per prompt
        (temperature 0 = greedy; see model.engine.sampling).
      seed: base seed, one value or one per prompt; a row's draws depend only on
        (seed, row id, step).
      row_ids: per-prompt ids that key the random draws (default: the prompt's index).
      stop_token_ids: ids that end a row (None: the tokenizer's `stop_ids`, else EOS; []: none).
      stop_strings: strings that end a row; its text is cut before the first one.
      max_batch: decode slots at most (continuous batching refills them).
      refill_min: with prompts waiting, the decode loop returns to the host to refill once this
        many slots are free (default 1: a freed slot never idles while rows wait).
      stop_check_every: with stop strings, decode steps between text checks on the host.
      reuse_prefixes: prefill a token prefix shared by several rows (a prompt frame, a passage
        shared by questions) once, keep it in the engine (`Engine.prefixes`), and start each
        row from a copy of its state; results are those of prefilling every row in full.
      output_format: constrain every row to a format (constrain.py; see `Stream`).
      logprobs: give each `Generation` its tokens' log-probabilities.
      unbounded_context: prompts may exceed the model's context (RecurrentGemma only; see
        `Stream`).
    Returns:
      One `Generation` per prompt.
    """
    cfg, n = engine.cfg, len(prompts)
    columns = {name: _per_row(v, n, name) for name, v in (
        ("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k),
        ("top_p", top_p), ("seed", seed))}
    if row_ids is None:
        row_ids = list(range(n))
    elif len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} prompts")
    if stop_token_ids is None:
        stop_token_ids = (tuple(tokenizer.stop_ids) if tokenizer is not None
                          else (cfg.eos_id,))
    stream = Stream(engine, tokenizer, max_batch=max_batch, stop_token_ids=stop_token_ids,
                    stop_strings=stop_strings or (), refill_min=refill_min or 1,
                    stop_check_every=stop_check_every, reuse_prefixes=reuse_prefixes,
                    output_format=output_format, logprobs=logprobs,
                    unbounded_context=unbounded_context)
    requests = [Request(prompts[i], *(int(columns["max_new_tokens"][i]),
                                      columns["temperature"][i], columns["top_k"][i],
                                      columns["top_p"][i], columns["seed"][i]),
                        row_id=int(row_ids[i])) for i in range(n)]
    results: list[Generation | None] = [None] * n

    def done(key: int, gen: Generation) -> None:
        results[key] = gen

    stream.add(requests, done)  # keys are 0..n-1: a fresh stream numbers rows from 0
    while not stream.idle:
        stream.step()
    return results  # type: ignore[return-value]
