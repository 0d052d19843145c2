"""The engine's prefill, host side: which shared prefix each row starts from (found from the
token ids, prefilled once per engine), and the packed calls (model/packed.py) that place new
rows into their decode slots, with chunked calls for what a long prompt has past the span.

Legend: B = decode slots, P = rows per chunked call, T = chunk, L = cache length, N = packed
tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from model import packed
from model.engine.programs import (NO_SLOT, ROW_PAD, Engine, NewRows, RowSettings, Slots, State,
                                   settings_arrays)

ROW_PAD_SETTINGS = RowSettings(*ROW_PAD)


@dataclasses.dataclass
class Row:
    """A prompt to generate for: its tokens, settings and the shared prefix it starts from."""

    index: int  # position in the caller's list
    prompt: list[int]
    settings: RowSettings  # Python scalars
    prefix: tuple[int, ...] = ()  # a shared prefix the row starts from (prefilled once)


def prefill_rows(engine: Engine, state: State, slots: Slots, placed: list[tuple[int, Row]],
                 length: int, count: bool = True) -> tuple[State, Slots]:
    """Prefills prompt[:-1] of the placed rows into their slots and places them.

    Rows of one prefix share packed calls (model/packed.py): each row starts from a copy of the
    prefix's state and its next tokens (up to the largest span) are packed with other rows'
    into N-token calls; what a prompt has past the span continues in chunks.
    """
    b = slots.active.shape[0]
    bk, st = engine.buckets, engine.stats
    by_prefix: dict[tuple[int, ...], list[tuple[int, Row]]] = {}
    for s, r in placed:
        by_prefix.setdefault(r.prefix, []).append((s, r))
    for pfx, items in by_prefix.items():
        pre, pre_len = _prefix_state(engine, pfx)
        plen = len(pfx)
        heads = [(s, r, r.prompt[plen:-1][: bk.span_max]) for s, r in items]
        if count:
            st.prompt_tokens += sum(len(r.prompt) - 1 for _, r in items)
            if plen:
                st.prefix_rows += len(items)
                st.prefix_tokens += plen * len(items)
        packs: list[list[tuple[int, Row, list[int]]]] = [[]]
        filled = 0  # tokens in the last pack
        for h in heads:
            if packs[-1] and filled + len(h[2]) > bk.pack_size:
                packs.append([])
                filled = 0
            packs[-1].append(h)
            filled += len(h[2])
        for pk in packs:
            real = sum(len(x[2]) for x in pk)
            n = bk.pack_bucket(real)
            span = bk.span_bucket(max(len(x[2]) for x in pk))
            arrays = packed.pack_arrays([(s, plen, h) for s, _, h in pk], n, b, pad_row=b)
            state, slots = engine.prefill_packed(state, slots, pre, pre_len, arrays,
                                                 _new_rows([(s, r) for s, r, _ in pk], b),
                                                 length, plen, span)
            st.real_tokens += real
            st.padded_tokens += n
        rest = [(s, r) for s, r in items if len(r.prompt) - 1 - plen > bk.span_max]
        if rest:
            state, slots = _prefill_chunks(engine, state, slots, rest, plen + bk.span_max,
                                           length)
    return state, slots


def _new_rows(placed: list[tuple[int, Row]], p: int) -> NewRows:
    """Bookkeeping of the placed rows, padded to p entries."""
    pad = p - len(placed)
    return NewRows(
        slot=np.asarray([s for s, _ in placed] + [NO_SLOT] * pad, np.int32),
        last_token=np.asarray([r.prompt[-1] for _, r in placed] + [0] * pad, np.int32),
        pos=np.asarray([len(r.prompt) - 1 for _, r in placed] + [0] * pad, np.int32),
        settings=settings_arrays([r.settings for _, r in placed], p))


def _prefill_chunks(engine: Engine, state: State, slots: Slots, rows: list[tuple[int, Row]],
                    start: int, length: int) -> tuple[State, Slots]:
    """Feeds prompt[start:-1] of rows already holding their first `start` tokens, P rows per
    call, in chunks of at most the largest chunk bucket."""
    b = slots.active.shape[0]
    p = min(engine.buckets.batch_bucket(len(rows)), b)
    st = engine.stats
    for i in range(0, len(rows), p):
        part = rows[i:i + p]
        new = _new_rows(part, p)
        n_ctx = max(len(r.prompt) - 1 for _, r in part)
        chunk = engine.buckets.chunk_size
        pos = start
        while pos < n_ctx:
            t = engine.buckets.chunk_bucket(min(chunk, n_ctx - pos))
            tokens = np.zeros((p, t), np.int32)
            positions = np.full((p, t), -1, np.int32)
            for j, (_, r) in enumerate(part):
                ctx = r.prompt[:-1][pos: pos + t]
                tokens[j, : len(ctx)] = ctx
                positions[j, : len(ctx)] = np.arange(pos, pos + len(ctx))
                st.real_tokens += len(ctx)
            state, slots = engine.prefill(state, slots, tokens, positions, new, length)
            st.padded_tokens += p * t
            pos += t
    return state, slots


def _prefix_state(engine: Engine, prefix: tuple[int, ...]) -> tuple[State, int]:
    """(the 1-row state after `prefix`, its cache length Lp): empty for (), else prefilled once
    at the smallest length bucket that holds it (every row that starts from it has L >= Lp) and
    kept in `engine.prefixes` (least recently used dropped past `engine.max_prefixes` states or
    `engine.max_prefix_bytes` in all)."""
    hit = engine.prefixes.get(prefix)
    if hit is not None:
        engine.prefixes.move_to_end(prefix)
        return hit
    length = engine.buckets.length_bucket(len(prefix) + 1)
    state = engine.init_state(1, length)
    if prefix:
        slots = engine.empty_slots(1, engine.buckets.out_bucket(1, length))
        row = Row(-1, list(prefix) + [0], ROW_PAD_SETTINGS)
        state, _ = prefill_rows(engine, state, slots, [(0, row)], length, count=False)
        engine.stats.prefixes_computed += 1
    engine.prefixes[prefix] = (state, length)
    while len(engine.prefixes) > 1 and (len(engine.prefixes) > engine.max_prefixes
                                        or _bytes(engine.prefixes) > engine.max_prefix_bytes):
        engine.prefixes.popitem(last=False)
    return state, length


def _bytes(prefixes: dict) -> int:
    return sum(leaf.nbytes for st, _ in prefixes.values() for leaf in jax.tree_util.tree_leaves(st))


def assign_prefixes(rows: list[Row], cached: Sequence[tuple[int, ...]] = (),
                    min_len: int = 16, merge_within: int = 64) -> None:
    """Gives each row the shared prefix it starts from (`Row.prefix`), in place.

    A row's prefix is the longest token prefix it shares with another row of the call (all but
    its last token at most), or a longer-or-nearly-as-long prefix already prefilled (`cached`),
    so a job's prompt frame is computed once per engine. Prefixes under `min_len` tokens are not
    worth a call; one that extends a shorter shared one by under `merge_within` tokens is merged
    into it (fewer, fuller packed calls); one used by a single row and not cached is dropped.
    """
    order = sorted(rows, key=lambda r: r.prompt)
    best: dict[int, int] = {}
    for i, r in enumerate(order):
        n = 0
        for j in (i - 1, i + 1):
            if 0 <= j < len(order):
                n = max(n, len(os.path.commonprefix([r.prompt, order[j].prompt])))
        best[id(r)] = min(n, len(r.prompt) - 1)
    known = sorted({k for k in cached if k}, key=len, reverse=True)  # () is no prefix
    for r in rows:
        c = best[id(r)]
        hit = next((k for k in known if len(k) <= len(r.prompt) - 1
                    and tuple(r.prompt[:len(k)]) == k), None)
        if hit is not None and len(hit) >= c - merge_within:
            r.prefix = hit
        elif c >= min_len:
            r.prefix = tuple(r.prompt[:c])
    shared = sorted({r.prefix for r in rows if r.prefix}, key=len)
    for r in rows:
        for q in shared:
            if len(q) < len(r.prefix) and len(r.prefix) - len(q) < merge_within \
                    and r.prefix[:len(q)] == q:
                r.prefix = q
                break
    uses = collections.Counter(r.prefix for r in rows)
    cached_set = set(cached)
    for r in rows:
        if r.prefix and uses[r.prefix] < 2 and r.prefix not in cached_set:
            r.prefix = ()
