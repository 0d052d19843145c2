"""The generation engine: bucketed, jitted prefill + on-device decode loop, continuous batching.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length,
V = vocabulary, S = stop-token table size.

The engine is family-agnostic: it only calls `family.init_state(cfg, batch, max_len, dtype)` and
`family.forward(params, tokens, positions, state, cfg)` (see model/transformer.py), and finds the
batch axis of every state leaf by shape inspection. Per call of `generate`:

  1. Prompts are grouped by cache length L = bucket(prompt + max_new_tokens) and, within a group,
     run longest first through B = bucket(min(#prompts, max_batch)) slots.
  2. Prefill: prompt[:-1] of up to P new rows is fed in chunks of T tokens (T a bucket; prompts
     longer than the largest chunk take several calls). The program gathers the P target slots'
     state, runs `forward` (position 0 resets a reused slot), scatters the state back, and writes
     the rows' bookkeeping (last prompt token, position, sampling settings). Logits are unused,
     so XLA drops the output projection.
  3. Decode: one `lax.while_loop` on device feeds each active slot its last token, samples the
     next one per row, and stops when every row is done - or, when prompts are waiting, as soon
     as enough slots have freed up, so the host can refill them (step 2) and carry on. Nothing
     recompiles: a refill only changes array contents.
Programs are compiled ahead of time per shape bucket, logged and counted (`COMPILE_LOG`), and
kept in JAX's persistent compilation cache. Results never depend on batch composition: rows never
interact, and each row's random key comes from (seed, row id, step).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from types import ModuleType
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import sampling
from model.buckets import COMPILE_LOG, DEFAULT_BUCKETS, Buckets, enable_compile_cache

log = logging.getLogger(__name__)

Array = jax.Array
_NO_SLOT = -1


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


class Slots(NamedTuple):
    """Per-slot bookkeeping kept on device (all [B] unless noted)."""

    active: Array  # bool: the slot holds a row that is still generating
    last_token: Array  # int32: the token to feed at `pos`
    pos: Array  # int32
    n_out: Array  # int32: tokens generated so far
    max_new: Array  # int32
    out: Array  # int32 [B, L]: generated tokens, out[b, :n_out[b]]
    temperature: Array  # float32
    top_k: Array  # int32
    top_p: Array  # float32
    seed: Array  # uint32
    row_id: Array  # int32


class NewRows(NamedTuple):
    """Bookkeeping of the P rows a prefill call places (all [P])."""

    slot: Array  # int32 target slot (B = none: padding row)
    last_token: Array
    pos: Array
    max_new: Array
    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array
    row_id: Array


def _empty_slots(b: int, length: int) -> Slots:
    def z(dtype: Any = jnp.int32) -> Array:  # a fresh buffer per field (they are donated)
        return jnp.zeros((b,), dtype)

    return Slots(active=z(bool), last_token=z(), pos=z(), n_out=z(), max_new=z(),
                 out=jnp.zeros((b, length), jnp.int32), temperature=z(jnp.float32), top_k=z(),
                 top_p=jnp.ones((b,), jnp.float32), seed=z(jnp.uint32), row_id=z())


# ----------------------------------------------------------------------------------------------
# Programs (pure functions; compiled per shape bucket by `_Engine`).


def _batch_axes(family: ModuleType, cfg: Any, length: int, dtype: Any) -> Any:
    """Per state leaf, the axis that scales with the batch (None: shared by all rows)."""
    s2 = jax.eval_shape(lambda: family.init_state(cfg, 2, length, dtype))
    s3 = jax.eval_shape(lambda: family.init_state(cfg, 3, length, dtype))

    def axis(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> int | None:
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if not diff:
            return None
        if (len(a.shape) != len(b.shape) or len(diff) != 1
                or (a.shape[diff[0]], b.shape[diff[0]]) != (2, 3)):
            raise ValueError(f"{family.__name__}.init_state: a state leaf of shape {a.shape} "
                             "does not have exactly one batch axis; the engine needs one")
        return diff[0]

    return jax.tree_util.tree_map(axis, s2, s3)


def _take_rows(state: Any, axes: Any, idx_p: Array) -> Any:
    def take(leaf: Array, ax: int | None) -> Array:
        return leaf if ax is None else jnp.take(leaf, idx_p, axis=ax, mode="clip")

    return jax.tree_util.tree_map(take, state, axes)


def _put_rows(state: Any, rows: Any, axes: Any, idx_p: Array) -> Any:
    def put(leaf: Array, new: Array, ax: int | None) -> Array:
        if ax is None:
            return new
        index = (slice(None),) * ax + (idx_p,)
        return leaf.at[index].set(new.astype(leaf.dtype), mode="drop")

    return jax.tree_util.tree_map(put, state, rows, axes)


def _prefill_program(family: ModuleType, cfg: Any, axes: Any):
    def prefill(params: Any, state: Any, slots: Slots, tokens_pt: Array, positions_pt: Array,
                new: NewRows) -> tuple[Any, Slots]:
        b = slots.active.shape[0]
        idx_p = jnp.where(new.slot >= 0, new.slot, b)  # B: out of range, dropped on write
        rows = _take_rows(state, axes, idx_p)
        _, rows = family.forward(params, tokens_pt, positions_pt, rows, cfg)
        state = _put_rows(state, rows, axes, idx_p)

        def put(x: Array, v: Array) -> Array:
            return x.at[idx_p].set(v.astype(x.dtype), mode="drop")

        slots = slots._replace(
            active=put(slots.active, jnp.ones_like(new.slot, bool)),
            last_token=put(slots.last_token, new.last_token), pos=put(slots.pos, new.pos),
            n_out=put(slots.n_out, jnp.zeros_like(new.slot)),
            max_new=put(slots.max_new, new.max_new),
            temperature=put(slots.temperature, new.temperature),
            top_k=put(slots.top_k, new.top_k), top_p=put(slots.top_p, new.top_p),
            seed=put(slots.seed, new.seed), row_id=put(slots.row_id, new.row_id))
        return state, slots

    return prefill


def _vocab_major_head(params: Any, b: int) -> bool:
    """Whether decode computes [V, B] logits (float32 on CPU with 2..32 slots: measured faster)."""
    return (jax.default_backend() == "cpu" and 2 <= b <= 32
            and all(leaf.dtype != jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params)))


def _decode_program(family: ModuleType, cfg: Any):
    def decode(params: Any, state: Any, slots: Slots, stop_ids_s: Array, max_steps: Array,
               min_free: Array) -> tuple[Any, Slots, Array]:
        b = slots.active.shape[0]
        rows_b = jnp.arange(b)
        out_len = slots.out.shape[1]
        vocab_major = _vocab_major_head(params, b)

        def cond(carry: tuple[Array, Any, Slots]) -> Array:
            step, _, sl = carry
            n_active = jnp.sum(sl.active)
            return (step < max_steps) & (n_active > 0) & (b - n_active < min_free)

        def body(carry: tuple[Array, Any, Slots]) -> tuple[Array, Any, Slots]:
            step, st, sl = carry
            act_b = sl.active
            positions_b1 = jnp.where(act_b, sl.pos, -1)[:, None]
            logits, st = family.forward(params, sl.last_token[:, None], positions_b1, st, cfg,
                                        vocab_major=vocab_major)
            keys_b2 = sampling.row_keys(sl.seed, sl.row_id, sl.n_out)
            nxt_b = sampling.sample_rows(logits if vocab_major else logits[:, 0], keys_b2,
                                         sl.temperature, sl.top_k, sl.top_p, vocab_major)
            write_b = jnp.where(act_b, sl.n_out, out_len)  # out of range: dropped
            out = sl.out.at[rows_b, write_b].set(nxt_b, mode="drop")
            n_out = sl.n_out + act_b
            hit_stop_b = jnp.any(nxt_b[:, None] == stop_ids_s[None, :], axis=-1)
            finished_b = act_b & (hit_stop_b | (n_out >= sl.max_new))
            sl = sl._replace(active=act_b & ~finished_b, out=out, n_out=n_out,
                             last_token=jnp.where(act_b, nxt_b, sl.last_token),
                             pos=sl.pos + act_b)
            return step + 1, st, sl

        steps, state, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), state, slots))
        return state, slots, steps

    return decode


def _deactivate(slots: Slots, kill_b: Array) -> Slots:
    return slots._replace(active=slots.active & ~kill_b)


# ----------------------------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass
class _Row:
    index: int  # position in the caller's list
    prompt: list[int]
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    row_id: int


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class _Engine:
    """Compiles (via COMPILE_LOG) and runs the programs for one (family, cfg, params, dtype)."""

    def __init__(self, family: ModuleType, cfg: Any, params: Any, dtype: Any, buckets: Buckets):
        self.family, self.cfg, self.params, self.dtype, self.buckets = (
            family, cfg, params, dtype, buckets)
        self.params_sig = _signature(params)
        self._axes: dict[int, Any] = {}

    def axes(self, length: int) -> Any:
        if length not in self._axes:
            self._axes[length] = _batch_axes(self.family, self.cfg, length, self.dtype)
        return self._axes[length]

    def _key(self, kind: str, *shape: Any) -> tuple:
        return (kind, self.family.__name__, self.cfg, str(jnp.dtype(self.dtype)),
                self.params_sig, shape)

    def prefill(self, state: Any, slots: Slots, tokens: np.ndarray, positions: np.ndarray,
                new: NewRows) -> tuple[Any, Slots]:
        b, length = slots.out.shape
        p, t = tokens.shape
        args = (self.params, state, slots, jnp.asarray(tokens), jnp.asarray(positions),
                NewRows(*(jnp.asarray(x) for x in new)))
        fn = COMPILE_LOG.get(
            self._key("prefill", b, length, p, t), "prefill", f"B={b} L={length} P={p} T={t}",
            lambda: jax.jit(_prefill_program(self.family, self.cfg, self.axes(length)),
                            donate_argnums=(1, 2)).lower(*args).compile())
        return fn(*args)

    def decode(self, state: Any, slots: Slots, stop_ids: np.ndarray, max_steps: int,
               min_free: int) -> tuple[Any, Slots, Array]:
        b, length = slots.out.shape
        args = (self.params, state, slots, jnp.asarray(stop_ids), jnp.int32(max_steps),
                jnp.int32(min_free))
        fn = COMPILE_LOG.get(
            self._key("decode", b, length, len(stop_ids)), "decode",
            f"B={b} L={length} S={len(stop_ids)}",
            lambda: jax.jit(_decode_program(self.family, self.cfg),
                            donate_argnums=(1, 2)).lower(*args).compile())
        return fn(*args)

    def deactivate(self, slots: Slots, kill: np.ndarray) -> Slots:
        b, length = slots.out.shape
        args = (slots, jnp.asarray(kill))
        fn = COMPILE_LOG.get(self._key("deactivate", b, length), "deactivate",
                             f"B={b} L={length}",
                             lambda: jax.jit(_deactivate, donate_argnums=(0,)).lower(*args)
                             .compile())
        return fn(*args)


def plan_programs(prompt_lengths: Sequence[int], max_new_tokens: int, max_batch: int,
                  buckets: Buckets = DEFAULT_BUCKETS, stop_strings: bool = False,
                  refill_min: int | None = None) -> set[tuple]:
    """Upper bound on the programs `generate` may compile for these prompts (no device work).

    Returns a set of (kind, shape...) tuples: per cache-length group one decode program and one
    prefill program per (P, T) pair it may use (plus `deactivate` with stop strings), where P is
    the refill size or the slot count and T a chunk bucket.
    """
    groups = collections.Counter(
        buckets.length_bucket(n + max_new_tokens) for n in prompt_lengths)
    progs: set[tuple] = set()
    for length, count in groups.items():
        b = _slots_for(count, max_batch, buckets)
        longest = max(n for n in prompt_lengths
                      if buckets.length_bucket(n + max_new_tokens) == length)
        progs.add(("decode", b, length))
        if stop_strings:
            progs.add(("deactivate", b, length))
        top = buckets.chunk_bucket(longest - 1)
        chunks = [c for c in buckets.chunk if c <= top]
        for p in _prefill_sizes(b, _refill_min(b, refill_min), buckets):
            for t in chunks:
                progs.add(("prefill", b, length, p, t))
    return progs


def _refill_min(b: int, refill_min: int | None) -> int:
    return max(1, b // 4) if refill_min is None else min(max(1, refill_min), b)


def _prefill_sizes(b: int, refill_min: int, buckets: Buckets) -> tuple[int, int]:
    """The two prefill batch sizes used with B slots: a refill bucket, and B (initial fill)."""
    return min(buckets.batch_bucket(refill_min), b), b


def _slots_for(n_rows: int, max_batch: int, buckets: Buckets) -> int:
    """Decode slots: the batch bucket of n_rows, capped at the largest bucket <= max_batch."""
    b = buckets.batch_bucket(min(n_rows, max_batch))
    if b > max_batch:
        b = max([x for x in buckets.batch if x <= max_batch], default=max_batch)
    return b


def _stop_table(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 8 (so the table size rarely changes shape)."""
    n = max(8, -(-len(stop_ids) // 8) * 8)
    table = np.full((n,), -1, np.int32)
    table[: len(stop_ids)] = list(stop_ids)
    return table


def _first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def _decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)) if tokenizer is not None else ""


def _finish(row: _Row, out: list[int], tokenizer: Any, stop_set: frozenset[int],
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


def _state_dtype(params: Any) -> Any:
    """The params' floating dtype; float32 on CPU, where XLA would convert a bf16 cache to f32
    for every attention product (bf16 model, 16 rows: decode step 65 -> 50 ms with f32 state)."""
    if jax.default_backend() == "cpu":
        return jnp.float32
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; pass one per "
                             "prompt or a single value")
        return list(value)
    return [value] * n


def generate(family: ModuleType, cfg: Any, params: Any, tokenizer: Any,
             prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int] = 64,
             temperature: float | Sequence[float] = 0.0,
             top_k: int | None | Sequence[int | None] = None,
             top_p: float | None | Sequence[float | None] = None,
             seed: int | Sequence[int] = 0, row_ids: Sequence[int] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] | None = None, max_batch: int = 16,
             buckets: Buckets = DEFAULT_BUCKETS, refill_min: int | None = None,
             stop_check_every: int = 16, dtype: Any = None) -> list[Generation]:
    """Generates a continuation for every prompt (token ids, BOS included), in input order.

    Args:
      family: model module with `init_state` and `forward` (model.transformer, model.griffin).
      cfg: its config; params: its parameter tree; tokenizer: decodes ids to text (None: no text).
      prompts: token id lists, each non-empty.
      max_new_tokens: tokens to generate at most, one value or one per prompt.
      temperature / top_k / top_p: sampling settings, one value or one per prompt
        (temperature 0 = greedy; see model.sampling).
      seed: base seed, one value or one per prompt; a row's draws depend only on
        (seed, row id, step).
      row_ids: per-prompt ids that key the random draws (default: the prompt's index).
      stop_token_ids: ids that end a row (default: the tokenizer's `stop_ids`, else EOS).
      stop_strings: strings that end a row; its text is cut before the first one.
      max_batch: decode slots at most (continuous batching refills them).
      buckets: shape buckets (batch, cache length, prefill chunk).
      refill_min: with prompts waiting, the decode loop returns to the host to refill once this
        many slots are free (default: a quarter of the slots, at least 1).
      stop_check_every: with stop strings, decode steps between text checks on the host.
      dtype: state dtype (default: the params' floating dtype; float32 on CPU).
    Returns:
      One `Generation` per prompt.
    """
    n = len(prompts)
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
    vocab = cfg.vocab_size
    for s in stop_token_ids:
        if not 0 <= int(s) < vocab:
            raise ValueError(f"stop token id {s} is outside the vocabulary [0, {vocab})")

    rows: list[_Row] = []
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
        if len(p) + max_news[i] > cfg.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_news[i]} it exceeds "
                f"the model's {cfg.max_seq_len}-token context; shorten it or lower "
                "max_new_tokens")
        strategy = sampling.make_strategy(temps[i], ks[i], ps[i])
        t, k, pp = strategy.row_params()
        rows.append(_Row(i, p, max_news[i], t, k, pp, int(seeds[i]) & 0xFFFFFFFF,
                         int(row_ids[i])))

    results: list[Generation | None] = [None] * n
    todo = []
    for r in rows:
        if r.max_new == 0:
            results[r.index] = Generation([], "", "length", len(r.prompt), 0)
        else:
            todo.append(r)
    if not todo:
        return results  # type: ignore[return-value]

    enable_compile_cache()
    engine = _Engine(family, cfg, params, dtype or _state_dtype(params), buckets)
    groups: dict[int, list[_Row]] = collections.defaultdict(list)
    for r in todo:
        groups[buckets.length_bucket(len(r.prompt) + r.max_new)].append(r)
    stop_table = _stop_table([int(s) for s in stop_token_ids])
    stop_set = frozenset(int(s) for s in stop_token_ids)
    for length in sorted(groups):
        group = sorted(groups[length], key=lambda r: (-len(r.prompt), r.index))
        _run_group(engine, length, group, max_batch, stop_table, stop_set, stop_strings,
                   tokenizer, refill_min, stop_check_every, results)
    return results  # type: ignore[return-value]


def _run_group(engine: _Engine, length: int, group: list[_Row], max_batch: int,
               stop_table: np.ndarray, stop_set: frozenset[int], stop_strings: list[str],
               tokenizer: Any, refill_min: int | None, stop_check_every: int,
               results: list[Generation | None]) -> None:
    """Runs one cache-length group through continuous batching."""
    buckets = engine.buckets
    b = _slots_for(len(group), max_batch, buckets)
    state = engine.family.init_state(engine.cfg, b, length, engine.dtype)
    slots = _empty_slots(b, length)
    waiting = collections.deque(group)
    slot_row: list[_Row | None] = [None] * b
    refill_min = _refill_min(b, refill_min)
    prefill_sizes = _prefill_sizes(b, refill_min, buckets)

    while True:
        free = [s for s in range(b) if slot_row[s] is None]
        if waiting and free:
            placed = [(s, waiting.popleft()) for s in free[: len(waiting)]]
            for s, r in placed:
                slot_row[s] = r
            p = min(x for x in prefill_sizes if x >= len(placed))
            state, slots = _prefill_rows(engine, state, slots, placed, p)
        if all(r is None for r in slot_row):
            return
        min_free = min(len(waiting), refill_min) if waiting else b + 1
        max_steps = stop_check_every if stop_strings else np.iinfo(np.int32).max
        state, slots, _ = engine.decode(state, slots, stop_table, max_steps, min_free)
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
            slots = engine.deactivate(slots, kill)


def _prefill_rows(engine: _Engine, state: Any, slots: Slots, placed: list[tuple[int, _Row]],
                  p: int) -> tuple[Any, Slots]:
    """Prefills prompt[:-1] of the placed rows into their slots, P rows per call, in chunks."""
    buckets = engine.buckets
    new = NewRows(
        slot=np.full((p,), _NO_SLOT, np.int32), last_token=np.zeros((p,), np.int32),
        pos=np.zeros((p,), np.int32), max_new=np.zeros((p,), np.int32),
        temperature=np.zeros((p,), np.float32), top_k=np.zeros((p,), np.int32),
        top_p=np.ones((p,), np.float32), seed=np.zeros((p,), np.uint32),
        row_id=np.zeros((p,), np.int32))
    for i, (s, r) in enumerate(placed):
        new.slot[i], new.last_token[i], new.pos[i] = s, r.prompt[-1], len(r.prompt) - 1
        new.max_new[i], new.temperature[i], new.top_k[i] = r.max_new, r.temperature, r.top_k
        new.top_p[i], new.seed[i], new.row_id[i] = r.top_p, r.seed, r.row_id
    n_ctx = max(len(r.prompt) - 1 for _, r in placed)  # tokens to prefill (all but the last)
    chunk = buckets.chunk_size
    start = 0
    while True:
        t = buckets.chunk_bucket(min(chunk, n_ctx - start))
        tokens = np.zeros((p, t), np.int32)
        positions = np.full((p, t), -1, np.int32)
        for i, (_, r) in enumerate(placed):
            ctx = r.prompt[:-1][start: start + t]
            tokens[i, : len(ctx)] = ctx
            positions[i, : len(ctx)] = np.arange(start, start + len(ctx))
        # A call with no context tokens still places the rows (their first decode step, at
        # position 0, resets the slot's state).
        state, slots = engine.prefill(state, slots, tokens, positions, new)
        start += t
        if start >= n_ctx:
            return state, slots
