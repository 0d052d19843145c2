"""The engine's host side: `generate` validates rows, groups them by cache length, keeps every
decode slot busy from a queue of waiting rows, and finishes results into `Generation`s.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import jax
import numpy as np

from model.engine import sampling
from model.engine.buckets import DEFAULT_BUCKETS, Buckets, enable_compile_cache
from model.engine.prefill import Row, assign_prefixes, prefill_rows
from model.engine.programs import Engine, RowSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    Attributes:
      tokens: generated ids; a stop token that ended the row is not included, and with a stop
        string the ids end with the one that completed it.
      text: decoded `tokens`, cut before the first stop string.
      finish_reason: "stop" (stop token or stop string) or "length" (max_new_tokens reached).
      prompt_tokens / output_tokens: token counts (output_tokens == len(tokens)).
    """

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int


# ----------------------------------------------------------------------------------------------
# Shapes: groups of rows, slots, prefill sizes and the programs they imply.


def _groups(needs: Sequence[int], max_batch: int, buckets: Buckets) -> list[tuple[int, list[int]]]:
    """Rows (by their cache need: prompt + max_new_tokens) -> [(cache length L, row indices)].

    Rows are taken shortest first into groups of at least `max_batch` rows (a group never splits
    rows of one length bucket), so N rows that fit the slots run in one group, as one wave; a
    group's L is the bucket of its longest need.
    """
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    groups: list[tuple[int, list[int]]] = []
    cur: list[int] = []
    for k, i in enumerate(order):
        cur.append(i)
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is None or (len(cur) >= max_batch and buckets.length_bucket(needs[nxt])
                           > buckets.length_bucket(needs[i])):
            groups.append((buckets.length_bucket(needs[i]), cur))
            cur = []
    return groups


def plan_programs(prompt_lengths: Sequence[int], max_new_tokens: int, max_batch: int,
                  buckets: Buckets = DEFAULT_BUCKETS, stop_strings: bool = False,
                  refill_min: int | None = None) -> set[tuple]:
    """Upper bound on the programs `generate` may compile for these prompts (no device work).

    Returns a set of (kind, shape...) tuples: per group of rows (cache length L, B slots) one
    decode program (plus `deactivate` with stop strings), packed prefills ("packed", B, L, N,
    span) for the pack and span buckets its rows can reach, the 1-slot packed prefills of a
    shared prefix, and chunked prefills ("prefill", B, L, P, T) for prompts past the largest
    span.
    """
    del refill_min  # refills pack rows like the first fill: no shapes of their own
    progs: set[tuple] = set()
    for length, idx in _groups([n + max_new_tokens for n in prompt_lengths], max_batch,
                               buckets):
        b = _slots_for(len(idx), max_batch, buckets)
        heads = sorted((min(prompt_lengths[i] - 1, buckets.span_max) for i in idx),
                       reverse=True)
        progs.add(("decode", b, length))
        if stop_strings:
            progs.add(("deactivate", b, length))
        top_n = buckets.pack_bucket(sum(heads[:b]))
        top_span = buckets.span_bucket(heads[0])
        for slots, top in ((b, top_n), (1, buckets.pack_bucket(heads[0]))):  # rows; a prefix
            for n in buckets.pack:
                for span in buckets.span:
                    if n <= top and span <= top_span:
                        progs.add(("packed", slots, length, n, span))
        longest = max(prompt_lengths[i] for i in idx) - 1
        if longest > buckets.span_max:
            top = buckets.chunk_bucket(longest - buckets.span_max)
            for p in (x for x in buckets.batch if x <= b):
                for t in (c for c in buckets.chunk if c <= top):
                    progs.add(("prefill", b, length, p, t))
                    progs.add(("prefill", 1, length, 1, t))
    return progs


def expected_programs(plan: set[tuple]) -> int:
    """About how many programs a call compiles, from its `plan_programs` bound: every decode,
    deactivate and chunked program it lists, plus per group two packed ones (the first fill and
    a shared prefix); refills of other sizes add a few more."""
    groups = {p[1:3] for p in plan if p[0] == "decode"}
    fixed = sum(1 for p in plan if p[0] != "packed")
    return min(len(plan), fixed + 2 * len(groups))


def _refill_min(b: int, refill_min: int | None) -> int:
    return max(1, b // 4) if refill_min is None else min(max(1, refill_min), b)


def _slots_for(n_rows: int, max_batch: int, buckets: Buckets) -> int:
    """Decode slots: the batch bucket of min(n_rows, max_batch) (at most the largest bucket).

    The bucket may hold more slots than max_batch (21 rows, max_batch 21: 24 slots); the
    scheduler never fills more than max_batch of them, so the rows still run as one wave."""
    return min(buckets.batch_bucket(min(n_rows, max_batch)), buckets.max_batch)


def stop_string_tokens(tokenizer: Any, stop_strings: Sequence[str],
                       vocab_size: int | None = None) -> frozenset[int]:
    """Ids whose text alone contains a stop string (cached per tokenizer and strings).

    A token decoded alone can only lose a leading space against its text in context, so a
    token listed here completes the stop string wherever it appears; stop strings that span
    tokens are still found by the host's text check, and so is a string held by more than
    `MAX_STOP_TOKENS` tokens (" " or "e": a table that size would cost every decode step).
    """
    if tokenizer is None or not stop_strings:
        return frozenset()
    cache = getattr(tokenizer, "_stop_string_tokens", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._stop_string_tokens = cache
        except AttributeError:  # a tokenizer that takes no attributes: computed every call
            pass
    n = getattr(tokenizer, "vocab_size", None) or vocab_size or 0
    key = (tuple(stop_strings), n)
    if key not in cache:
        texts = [tokenizer.decode([i]) for i in range(n)]
        found: set[int] = set()
        for stop in stop_strings:
            ids = [i for i, t in enumerate(texts) if stop in t]
            if len(ids) <= MAX_STOP_TOKENS:
                found.update(ids)
        cache[key] = frozenset(found)
    return cache[key]


MAX_STOP_TOKENS = 1024


def _stop_table(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 8 (so the table size rarely changes shape)."""
    n = max(8, -(-len(stop_ids) // 8) * 8)
    table = np.full((n,), -1, np.int32)
    table[: len(stop_ids)] = list(stop_ids)
    return table


# ----------------------------------------------------------------------------------------------
# Results.


def _first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def _decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)) if tokenizer is not None else ""


def _finish(row: Row, out: list[int], tokenizer: Any, stop_set: frozenset[int],
            stop_strings: Sequence[str]) -> Generation:
    """Builds a row's result from its raw generated ids."""
    reason = "length"
    if out and out[-1] in stop_set:
        out = out[:-1]
        reason = "stop"
    text = _decode_text(tokenizer, out)
    if stop_strings:
        cut = _first_stop(text, stop_strings)
        if cut >= 0:
            # Keep ids up to the one that completed the first stop string.
            n = len(out)
            for i in range(1, len(out) + 1):
                if _first_stop(_decode_text(tokenizer, out[:i]), stop_strings) >= 0:
                    n = i
                    break
            out, text, reason = out[:n], text[:cut], "stop"
    return Generation(tokens=[int(x) for x in out], text=text, finish_reason=reason,
                      prompt_tokens=len(row.prompt), output_tokens=len(out))


# ----------------------------------------------------------------------------------------------
# Validation: arguments -> rows, before any device work.


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; pass one per "
                             "prompt or a single value")
        return list(value)
    return [value] * n


def _rows(prompts: list[list[int]], vocab: int, max_seq_len: int, max_news: list[int],
          temps: list[Any], ks: list[Any], ps: list[Any], seeds: list[Any],
          row_ids: Sequence[int]) -> list[Row]:
    """One checked `Row` per prompt (settings already one per prompt); raises ValueError
    naming the first bad prompt."""
    rows: list[Row] = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                             "(usually BOS)")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {vocab}); check the tokenizer matches the model")
        if max_news[i] < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_news[i]} for prompt {i}")
        if len(p) + max_news[i] > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_news[i]} it exceeds "
                f"the model's {max_seq_len}-token context; shorten it or lower max_new_tokens")
        t, k, pp = sampling.make_strategy(temps[i], ks[i], ps[i]).row_params()
        rows.append(Row(i, p, RowSettings(max_new=max_news[i], temperature=t, top_k=k,
                                           top_p=pp, seed=int(seeds[i]) & 0xFFFFFFFF,
                                           row_id=int(row_ids[i]))))
    return rows


# ----------------------------------------------------------------------------------------------
# Generation.


def generate(engine: Engine, prompts: Sequence[Sequence[int]], tokenizer: Any = None, *,
             max_new_tokens: int | Sequence[int] = 64,
             temperature: float | Sequence[float] = 0.0,
             top_k: int | None | Sequence[int | None] = None,
             top_p: float | None | Sequence[float | None] = None,
             seed: int | Sequence[int] = 0, row_ids: Sequence[int] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] | None = None, max_batch: int = 16,
             refill_min: int | None = None, stop_check_every: int = 16,
             reuse_prefixes: bool = True) -> list[Generation]:
    """Generates a continuation for every prompt (token ids, BOS included), in input order.

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
        many slots are free (default: a quarter of the slots, at least 1).
      stop_check_every: with stop strings, decode steps between text checks on the host.
      reuse_prefixes: prefill a token prefix shared by several rows (a prompt frame, a passage
        shared by questions) once, keep it in the engine (`Engine.prefixes`), and start each
        row from a copy of its state; results are those of prefilling every row in full.
    Returns:
      One `Generation` per prompt.
    """
    cfg, n = engine.cfg, len(prompts)
    prompts = [[int(t) for t in p] for p in prompts]
    max_news = [int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
    temps = _per_row(temperature, n, "temperature")
    ks = _per_row(top_k, n, "top_k")
    ps = _per_row(top_p, n, "top_p")
    seeds = _per_row(seed, n, "seed")
    if row_ids is None:
        row_ids = list(range(n))
    elif len(row_ids) != n:
        raise ValueError(f"row_ids has {len(row_ids)} entries for {n} prompts")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    stop_strings = [s for s in (stop_strings or []) if s]
    if stop_token_ids is None:
        stop_token_ids = (tuple(tokenizer.stop_ids) if tokenizer is not None
                          else (cfg.eos_id,))
    for s in stop_token_ids:
        if not 0 <= int(s) < cfg.vocab_size:
            raise ValueError(f"stop token id {s} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
    rows = _rows(prompts, cfg.vocab_size, cfg.max_seq_len, max_news, temps, ks, ps, seeds,
                 row_ids)

    results: list[Generation | None] = [None] * len(rows)
    todo = []
    for r in rows:
        if r.settings.max_new == 0:
            results[r.index] = Generation([], "", "length", len(r.prompt), 0)
        else:
            todo.append(r)
    if not todo:
        return results  # type: ignore[return-value]

    enable_compile_cache()
    if reuse_prefixes:
        assign_prefixes(todo, list(engine.prefixes))
    stop_set = frozenset(int(s) for s in stop_token_ids)
    # Tokens whose own text holds a stop string end their row on device (the text is still cut
    # on the host): no decode steps run past a row's end while the host is not looking.
    stop_table = _stop_table(sorted(
        stop_set | {i for i in stop_string_tokens(tokenizer, stop_strings, cfg.vocab_size)
                    if i < cfg.vocab_size}))
    needs = [len(r.prompt) + r.settings.max_new for r in todo]
    for length, idx in _groups(needs, max_batch, engine.buckets):
        # Rows of one prefix together (a refill packs them in one call), longest first.
        group = sorted((todo[i] for i in idx), key=lambda r: (r.prefix, -len(r.prompt), r.index))
        _run_group(engine, length, group, max_batch, stop_table, stop_set, stop_strings,
                   tokenizer, refill_min, stop_check_every, results)
    return results  # type: ignore[return-value]


def _run_group(engine: Engine, length: int, group: list[Row], max_batch: int,
               stop_table: np.ndarray, stop_set: frozenset[int], stop_strings: list[str],
               tokenizer: Any, refill_min: int | None, stop_check_every: int,
               results: list[Generation | None]) -> None:
    """Runs one cache-length group through continuous batching."""
    b = _slots_for(len(group), max_batch, engine.buckets)
    state = engine.init_state(b, length)
    # Generated tokens need room for the longest max_new_tokens only, not the whole cache.
    out_len = engine.buckets.out_bucket(max(r.settings.max_new for r in group), length)
    slots = engine.empty_slots(b, out_len)
    waiting = collections.deque(group)
    slot_row: list[Row | None] = [None] * b
    cap = min(b, max_batch)  # rows decoding at once
    refill_min = _refill_min(cap, refill_min)

    while True:
        free = [s for s in range(b) if slot_row[s] is None]
        room = min(len(waiting), cap - (b - len(free)))
        if room > 0:
            placed = [(s, waiting.popleft()) for s in free[:room]]
            for s, r in placed:
                slot_row[s] = r
            state, slots = prefill_rows(engine, state, slots, placed, length)
        if all(r is None for r in slot_row):
            return
        # Slots past `cap` never hold a row: they count as free from the start.
        min_free = min(len(waiting), refill_min) + (b - cap) if waiting else b + 1
        max_steps = stop_check_every if stop_strings else np.iinfo(np.int32).max
        state, slots, _ = engine.decode(state, slots, stop_table, max_steps, min_free, length)
        active, n_out, out = jax.device_get((slots.active, slots.n_out, slots.out))
        kill = np.zeros((b,), bool)
        for s, r in enumerate(slot_row):
            if r is None:
                continue
            ids = out[s, : n_out[s]].tolist()
            if active[s]:
                if not stop_strings or _first_stop(_decode_text(tokenizer, ids),
                                                   stop_strings) < 0:
                    continue
                kill[s] = True
            results[r.index] = _finish(r, ids, tokenizer, stop_set, stop_strings)
            slot_row[s] = None
        if kill.any():
            slots = engine.deactivate(slots, kill, length)
