"""The engine's device side: jitted prefill, decode loop and deactivate programs over slot state,
and `Engine`, which compiles them per shape bucket for one model and keeps its compile log.

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length,
S = stop-token table size.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.engine import sampling
from model.engine.buckets import DEFAULT_BUCKETS, Buckets, CompileLog
from model.family import Family, Params, State

Array = jax.Array
NO_SLOT = -1  # NewRows.slot of a padding row


class RowSettings(NamedTuple):
    """A row's generation settings: one field per setting, each [B] in `Slots`, [P] in `NewRows`,
    a Python scalar on the host (`ROW_DTYPES` gives the array dtypes, `ROW_PAD` the empty row)."""

    max_new: Any  # int32: tokens to generate at most
    temperature: Any  # float32 (0 = greedy)
    top_k: Any  # int32 (0 = off)
    top_p: Any  # float32 (1 = off)
    seed: Any  # uint32
    row_id: Any  # int32: keys the row's random draws


ROW_DTYPES = RowSettings(max_new=np.int32, temperature=np.float32, top_k=np.int32,
                         top_p=np.float32, seed=np.uint32, row_id=np.int32)
ROW_PAD = RowSettings(max_new=0, temperature=0.0, top_k=0, top_p=1.0, seed=0, row_id=0)


class Slots(NamedTuple):
    """Per-slot bookkeeping kept on device (all [B] unless noted)."""

    active: Array  # bool: the slot holds a row that is still generating
    last_token: Array  # int32: the token to feed at `pos`
    pos: Array  # int32
    n_out: Array  # int32: tokens generated so far
    settings: RowSettings  # each [B]
    out: Array  # int32 [B, L]: generated tokens, out[b, :n_out[b]]


class NewRows(NamedTuple):
    """Bookkeeping of the P rows a prefill call places (all [P])."""

    slot: Array  # int32 target slot (NO_SLOT: padding row)
    last_token: Array  # int32: the prompt's last token, fed by the first decode step
    pos: Array  # int32: its position
    settings: RowSettings  # each [P]


def settings_arrays(rows: Sequence[RowSettings], n: int) -> RowSettings:
    """Host settings of up to n rows -> RowSettings of numpy [n] arrays, padded with ROW_PAD."""
    padded = list(rows) + [ROW_PAD] * (n - len(rows))
    return RowSettings(*(np.asarray(col, dt) for col, dt in zip(zip(*padded), ROW_DTYPES)))


def empty_slots(b: int, length: int) -> Slots:
    """B free slots with room for L generated tokens each (fresh buffers: they are donated)."""
    return Slots(active=jnp.zeros((b,), bool), last_token=jnp.zeros((b,), jnp.int32),
                 pos=jnp.zeros((b,), jnp.int32), n_out=jnp.zeros((b,), jnp.int32),
                 settings=RowSettings(*(jnp.full((b,), v, dt)
                                        for v, dt in zip(ROW_PAD, ROW_DTYPES))),
                 out=jnp.zeros((b, length), jnp.int32))


# ----------------------------------------------------------------------------------------------
# State rows.


def batch_axes(family: Family, cfg: ModelConfig, length: int, dtype: Any) -> Any:
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


def take_rows(state: State, axes: Any, idx_p: Array) -> State:
    """The P rows idx_p of every state leaf (out-of-range indices clip)."""
    def take(leaf: Array, ax: int | None) -> Array:
        return leaf if ax is None else jnp.take(leaf, idx_p, axis=ax, mode="clip")

    return jax.tree_util.tree_map(take, state, axes)


def put_rows(state: State, rows: State, axes: Any, idx_p: Array) -> State:
    """Writes P rows back at idx_p (out-of-range indices are dropped)."""
    def put(leaf: Array, new: Array, ax: int | None) -> Array:
        if ax is None:
            return new
        index = (slice(None),) * ax + (idx_p,)
        return leaf.at[index].set(new.astype(leaf.dtype), mode="drop")

    return jax.tree_util.tree_map(put, state, rows, axes)


# ----------------------------------------------------------------------------------------------
# Programs (pure functions; compiled per shape bucket by `Engine`).


def prefill_program(family: Family, cfg: ModelConfig, axes: Any) -> Callable:
    """(params, state, slots, tokens [P, T], positions [P, T], new) -> (state, slots)."""

    def prefill(params: Params, state: State, slots: Slots, tokens_pt: Array,
                positions_pt: Array, new: NewRows) -> tuple[State, Slots]:
        b = slots.active.shape[0]
        idx_p = jnp.where(new.slot >= 0, new.slot, b)  # B: out of range, dropped on write
        rows = take_rows(state, axes, idx_p)
        _, rows = family.forward(params, tokens_pt, positions_pt, rows, cfg)
        state = put_rows(state, rows, axes, idx_p)
        # Every per-slot field but `out` (n_out = 0 hides a reused slot's old tokens).
        fresh = dict(active=jnp.ones_like(new.slot, bool), last_token=new.last_token,
                     pos=new.pos, n_out=jnp.zeros_like(new.slot), settings=new.settings)
        old = {name: getattr(slots, name) for name in fresh}

        def place(x: Array, v: Array) -> Array:
            return x.at[idx_p].set(v.astype(x.dtype), mode="drop")

        return state, slots._replace(**jax.tree_util.tree_map(place, old, fresh))

    return prefill


def vocab_major_head(params: Params, b: int) -> bool:
    """Whether decode computes [V, B] logits (float32 on CPU with 2..32 slots: measured faster)."""
    return (jax.default_backend() == "cpu" and 2 <= b <= 32
            and all(leaf.dtype != jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params)))


def decode_program(family: Family, cfg: ModelConfig) -> Callable:
    """(params, state, slots, stop ids [S], max_steps, min_free) -> (state, slots, steps).

    One `lax.while_loop`: every active slot gets its next token per step, until no slot is
    active, `max_steps` steps ran, or at least `min_free` slots are free.
    """

    def decode(params: Params, state: State, slots: Slots, stop_ids_s: Array, max_steps: Array,
               min_free: Array) -> tuple[State, Slots, Array]:
        b = slots.active.shape[0]
        rows_b = jnp.arange(b)
        out_len = slots.out.shape[1]
        vocab_major = vocab_major_head(params, b)

        def cond(carry: tuple[Array, State, Slots]) -> Array:
            step, _, sl = carry
            n_active = jnp.sum(sl.active)
            return (step < max_steps) & (n_active > 0) & (b - n_active < min_free)

        def body(carry: tuple[Array, State, Slots]) -> tuple[Array, State, Slots]:
            step, st, sl = carry
            act_b, rs = sl.active, sl.settings
            positions_b1 = jnp.where(act_b, sl.pos, -1)[:, None]
            logits, st = family.forward(params, sl.last_token[:, None], positions_b1, st, cfg,
                                        vocab_major=vocab_major)
            keys_b2 = sampling.row_keys(rs.seed, rs.row_id, sl.n_out)
            nxt_b = sampling.sample_rows(logits if vocab_major else logits[:, 0], keys_b2,
                                         rs.temperature, rs.top_k, rs.top_p, vocab_major)
            write_b = jnp.where(act_b, sl.n_out, out_len)  # out of range: dropped
            out = sl.out.at[rows_b, write_b].set(nxt_b, mode="drop")
            n_out = sl.n_out + act_b
            hit_stop_b = jnp.any(nxt_b[:, None] == stop_ids_s[None, :], axis=-1)
            finished_b = act_b & (hit_stop_b | (n_out >= rs.max_new))
            sl = sl._replace(active=act_b & ~finished_b, out=out, n_out=n_out,
                             last_token=jnp.where(act_b, nxt_b, sl.last_token),
                             pos=sl.pos + act_b)
            return step + 1, st, sl

        steps, state, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), state, slots))
        return state, slots, steps

    return decode


def deactivate(slots: Slots, kill_b: Array) -> Slots:
    """Frees the slots marked in kill_b (bool [B])."""
    return slots._replace(active=slots.active & ~kill_b)


def state_dtype(params: Params) -> Any:
    """The params' floating dtype; float32 on CPU, where XLA would convert a bf16 cache to f32
    for every attention product (bf16 model, 16 rows: decode step 65 -> 50 ms with f32 state)."""
    if jax.default_backend() == "cpu":
        return jnp.float32
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


# ----------------------------------------------------------------------------------------------
# The engine: programs compiled per shape bucket, for one model.


class Engine:
    """The compiled programs of one model (family, config, params), per shape bucket.

    Attributes:
      buckets: the shape buckets generation rounds to (`Buckets.max_batch`: most slots).
      dtype: the state dtype (default: the params' floating dtype; float32 on CPU).
      compile_log: this engine's compiled programs, with a record (program, shapes, seconds) of
        each compile; compiles also go through JAX's persistent cache (`enable_compile_cache`).
    """

    def __init__(self, family: Family, cfg: ModelConfig, params: Params,
                 buckets: Buckets = DEFAULT_BUCKETS, dtype: Any = None):
        self.family, self.cfg, self.params, self.buckets = family, cfg, params, buckets
        self.dtype = dtype or state_dtype(params)
        self.compile_log = CompileLog()
        self._axes: dict[int, Any] = {}

    def __repr__(self) -> str:
        return (f"Engine({self.family.__name__}, {type(self.cfg).__name__}, "
                f"dtype={jnp.dtype(self.dtype)}, programs={self.compile_log.count})")

    def axes(self, length: int) -> Any:
        """Per state leaf of a cache of length L, its batch axis (see `batch_axes`)."""
        if length not in self._axes:
            self._axes[length] = batch_axes(self.family, self.cfg, length, self.dtype)
        return self._axes[length]

    def init_state(self, b: int, length: int) -> State:
        """Empty model state for B slots of cache length L."""
        return self.family.init_state(self.cfg, b, length, self.dtype)

    def prefill(self, state: State, slots: Slots, tokens: np.ndarray, positions: np.ndarray,
                new: NewRows) -> tuple[State, Slots]:
        """Feeds tokens [P, T] at positions [P, T] into the new rows' slots and places them."""
        b, length = slots.out.shape
        p, t = tokens.shape
        args = (self.params, state, slots, jnp.asarray(tokens), jnp.asarray(positions),
                jax.tree_util.tree_map(jnp.asarray, new))
        fn = self.compile_log.get(
            ("prefill", b, length, p, t), "prefill", f"B={b} L={length} P={p} T={t}",
            lambda: jax.jit(prefill_program(self.family, self.cfg, self.axes(length)),
                            donate_argnums=(1, 2)).lower(*args).compile())
        return fn(*args)

    def decode(self, state: State, slots: Slots, stop_ids: np.ndarray, max_steps: int,
               min_free: int) -> tuple[State, Slots, Array]:
        """Runs the decode loop (see `decode_program`)."""
        b, length = slots.out.shape
        args = (self.params, state, slots, jnp.asarray(stop_ids), jnp.int32(max_steps),
                jnp.int32(min_free))
        fn = self.compile_log.get(
            ("decode", b, length, len(stop_ids)), "decode",
            f"B={b} L={length} S={len(stop_ids)}",
            lambda: jax.jit(decode_program(self.family, self.cfg),
                            donate_argnums=(1, 2)).lower(*args).compile())
        return fn(*args)

    def deactivate(self, slots: Slots, kill: np.ndarray) -> Slots:
        """Frees the slots marked in kill (bool [B])."""
        b, length = slots.out.shape
        args = (slots, jnp.asarray(kill))
        fn = self.compile_log.get(("deactivate", b, length), "deactivate", f"B={b} L={length}",
                                  lambda: jax.jit(deactivate, donate_argnums=(0,)).lower(*args)
                                  .compile())
        return fn(*args)
