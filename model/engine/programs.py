"""The engine's device side: jitted prefill, decode loop and deactivate programs over slot state,
and `Engine`, which compiles them per shape bucket for one model and keeps its compile log; on a
device mesh the programs take and return sharded parameters, state and slots (model/sharding.py).

Legend: B = decode slots, P = rows per prefill call, T = prefill chunk, L = cache length,
O = generated-token buffer (`Buckets.out_bucket` of the rows' max_new_tokens, at most L),
S = stop-token table size.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import sharding
from model.config import ModelConfig
from model.engine import sampling, saved
from model.engine.buckets import DEFAULT_BUCKETS, Buckets, CompileLog, DecodeStats, PrefillStats
from model.engine.constrain import Automaton, advance, mask_to_format
from model.engine.rows import (batch_axes, copy_prefix, deactivate, decode_head, put_rows,
                               resize, state_dtype, take_rows, wants_codes)
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
    out: Array  # int32 [B, O]: generated tokens, out[b, :n_out[b]]
    fsm: Array  # int32: the output format's automaton state (constrain.py; 0 = its start)
    logp: Array  # float32 [B, O]: log-probability of each generated token (when asked for)


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


def empty_slots(b: int, out_len: int) -> Slots:
    """B free slots with room for O generated tokens each (fresh buffers: they are donated)."""
    return Slots(active=jnp.zeros((b,), bool), last_token=jnp.zeros((b,), jnp.int32),
                 pos=jnp.zeros((b,), jnp.int32), n_out=jnp.zeros((b,), jnp.int32),
                 settings=RowSettings(*(jnp.full((b,), v, dt)
                                        for v, dt in zip(ROW_PAD, ROW_DTYPES))),
                 out=jnp.zeros((b, out_len), jnp.int32), fsm=jnp.zeros((b,), jnp.int32),
                 logp=jnp.zeros((b, out_len), jnp.float32))


def _keep(state: State) -> State:
    return state


# ----------------------------------------------------------------------------------------------
# Programs (pure functions; compiled per shape bucket by `Engine`).


def _place(slots: Slots, new: NewRows, idx_p: Array) -> Slots:
    """Writes the new rows' bookkeeping into their slots (n_out = 0 hides old tokens)."""
    fresh = dict(active=jnp.ones_like(new.slot, bool), last_token=new.last_token,
                 pos=new.pos, n_out=jnp.zeros_like(new.slot), settings=new.settings,
                 fsm=jnp.zeros_like(new.slot))
    old = {name: getattr(slots, name) for name in fresh}

    def place(x: Array, v: Array) -> Array:
        return x.at[idx_p].set(v.astype(x.dtype), mode="drop")

    return slots._replace(**jax.tree_util.tree_map(place, old, fresh))


def packed_program(family: Family, cfg: ModelConfig, axes: Any, length: int, dtype: Any,
                   prefix_len: int, span: int,
                   constrain: Callable[[State], State] = _keep) -> Callable:
    """(params, state, slots, prefix, pack, new) -> (state, slots).

    Sets the new rows of a state of cache length L to a copy of `prefix` (a 1-row state of
    cache length <= L), feeds the packed segments (model/packed.py) through
    `family.forward_packed` and places the rows. `prefix_len` and `span` are static bounds
    (prefix slots read; longest segment).
    """

    def prefill(params: Params, state: State, slots: Slots, prefix: State, pack: Any,
                new: NewRows) -> tuple[State, Slots]:
        b = slots.active.shape[0]
        idx_p = jnp.where(new.slot >= 0, new.slot, b)
        empty = family.init_state(cfg, 1, length, dtype)
        state = copy_prefix(state, prefix, empty, axes, idx_p)
        _, state = family.forward_packed(params, pack, state, prefix, prefix_len, span, cfg)
        return constrain(state), _place(slots, new, idx_p)

    return prefill


def prefill_program(family: Family, cfg: ModelConfig, axes: Any,
                    constrain: Callable[[State], State] = _keep) -> Callable:
    """(params, state, slots, tokens [P, T], positions [P, T], new) -> (state, slots).

    `constrain` pins the state's layout (a sharding constraint on a mesh; identity otherwise).
    """

    def prefill(params: Params, state: State, slots: Slots, tokens_pt: Array,
                positions_pt: Array, new: NewRows) -> tuple[State, Slots]:
        b = slots.active.shape[0]
        idx_p = jnp.where(new.slot >= 0, new.slot, b)  # B: out of range, dropped on write
        rows = take_rows(state, axes, idx_p)
        _, rows = family.forward(params, tokens_pt, positions_pt, rows, cfg)
        state = constrain(put_rows(state, rows, axes, idx_p))
        return state, _place(slots, new, idx_p)

    return prefill


def vocab_major_head(b: int) -> bool:
    """Whether decode computes [V, B] logits: on CPU with 2..32 slots, in float32 and bfloat16
    alike (measured faster: float32 at 16 slots; bfloat16 at 8 slots, the 270M's decode step
    99 -> 69 ms on an AVX512-BF16 CPU). One bf16 row would take XLA's slow path: row-major."""
    return jax.default_backend() == "cpu" and 2 <= b <= 32


def decode_program(family: Family, cfg: ModelConfig,
                   constrain: Callable[[State], State] = _keep,
                   formatted: bool = False, logprobs: bool = False,
                   greedy: bool = False) -> Callable:
    """(params, state, slots, stop ids [S], max_steps, min_free, token_class [V], next_sc
    [S', C], head: `rows.decode_head` or None) -> (state, slots, steps, busy).

    One `lax.while_loop`: every active slot gets its next token per step, until no slot is
    active, `max_steps` steps ran, or at least `min_free` slots are free; `busy` counts the
    active slots summed over the steps (slot occupancy). `constrain` pins the state's layout in
    the loop (a sharding constraint on a mesh; identity otherwise). `formatted` (static): each
    row's logits are masked to its automaton state's tokens, and its state follows the token
    picked (constrain.py's tables; unread otherwise). `logprobs` (static): each token's
    log-probability under the raw logits goes to `slots.logp`. `greedy` (static; every row is
    greedy, neither `formatted` nor `logprobs`): each step takes `family.greedy_next`, the
    same tokens without all the logits (`head` carries its tiles: `Engine.greedy_head`).
    """
    if greedy and (formatted or logprobs):
        raise ValueError("a greedy decode program has no format and no log-probabilities")

    def decode(params: Params, state: State, slots: Slots, stop_ids_s: Array, max_steps: Array,
               min_free: Array, token_class_v: Array, next_sc: Array, head: Any
               ) -> tuple[State, Slots, Array]:
        b = slots.active.shape[0]
        rows_b = jnp.arange(b)
        out_len = slots.out.shape[1]
        vocab_major = vocab_major_head(b)

        def cond(carry: tuple[Array, Array, State, Slots]) -> Array:
            step, _, _, sl = carry
            n_active = jnp.sum(sl.active)
            return (step < max_steps) & (n_active > 0) & (b - n_active < min_free)

        def body(carry: tuple[Array, Array, State, Slots]) -> tuple[Array, Array, State, Slots]:
            step, busy, st, sl = carry
            act_b, rs = sl.active, sl.settings
            positions_b1 = jnp.where(act_b, sl.pos, -1)[:, None]
            if greedy:
                nxt_b, st = family.greedy_next(params, sl.last_token[:, None], positions_b1, st,
                                               cfg, head)
            else:
                logits, st = family.forward(params, sl.last_token[:, None], positions_b1, st,
                                            cfg, vocab_major, head)
                keys_b2 = sampling.row_keys(rs.seed, rs.row_id, sl.n_out)
                logits = raw = logits if vocab_major else logits[:, 0]
                if formatted:
                    logits, next_bc = mask_to_format(logits, vocab_major, sl.fsm,
                                                     token_class_v, next_sc)
                nxt_b = sampling.sample_rows(logits, keys_b2, rs.temperature, rs.top_k,
                                             rs.top_p, vocab_major)
            fsm_b = advance(next_bc, token_class_v, nxt_b, act_b, sl.fsm) if formatted else sl.fsm
            write_b = jnp.where(act_b, sl.n_out, out_len)  # out of range: dropped
            out = sl.out.at[rows_b, write_b].set(nxt_b, mode="drop")
            if logprobs:
                sl = sl._replace(logp=sl.logp.at[rows_b, write_b].set(
                    sampling.token_logprob(raw, nxt_b, vocab_major), mode="drop"))
            n_out = sl.n_out + act_b
            hit_stop_b = jnp.any(nxt_b[:, None] == stop_ids_s[None, :], axis=-1)
            finished_b = act_b & (hit_stop_b | (n_out >= rs.max_new))
            sl = sl._replace(active=act_b & ~finished_b, out=out, n_out=n_out, fsm=fsm_b,
                             last_token=jnp.where(act_b, nxt_b, sl.last_token),
                             pos=sl.pos + act_b)
            return step + 1, busy + jnp.sum(act_b, dtype=jnp.int32), constrain(st), sl

        steps, busy, state, slots = jax.lax.while_loop(
            cond, body, (jnp.int32(0), jnp.int32(0), state, slots))
        return state, slots, steps, busy

    return decode


# ----------------------------------------------------------------------------------------------
# The engine: programs compiled per shape bucket, for one model.


class Engine:
    """The compiled programs of one model (family, config, params), per shape bucket.

    Attributes:
      buckets: the shape buckets generation rounds to (`Buckets.max_batch`: most slots).
      dtype: the state dtype (default: the params' floating dtype; float32 on CPU).
      mesh: the (data, model) device mesh, or None on one device. On a mesh the parameters are
        placed by their family's logical axes, the state and slots by theirs (slots over `data`),
        and every program takes and returns them with those shardings (nothing is re-laid out
        between calls); the programs and their count are those of one device.
      compile_log: this engine's compiled programs, with a record (program, shapes, seconds) of
        each compile; compiles also go through JAX's persistent cache (`enable_compile_cache`),
        and each program is kept on disk for a later process to load untraced (saved.py).
    """

    def __init__(self, family: Family, cfg: ModelConfig, params: Params,
                 buckets: Buckets = DEFAULT_BUCKETS, dtype: Any = None,
                 mesh: jax.sharding.Mesh | None = None,
                 codes: Callable[[], dict[str, Any]] | None = None):
        """`mesh` None: the mesh the params are placed on (a 1-device mesh counts as none).
        `codes`: reads the checkpoint's quantized blocks for decode (`rows.decode_head`)."""
        self.codes = codes
        mesh = sharding.mesh_of(params) if mesh is None else mesh
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self._param_sh = None
        if self.mesh is not None:
            self._param_sh = sharding.tree_shardings(params, family.PARAM_AXES, self.mesh,
                                                     "parameter")
            params = sharding.place(params, self._param_sh)
        self.family, self.cfg, self.params, self.buckets = family, cfg, params, buckets
        self.dtype = dtype or state_dtype(params)
        self.compile_log = CompileLog()
        self._axes: dict[int, Any] = {}
        self._state_sh: dict[tuple[int, int], Any] = {}
        self._init: dict[tuple[int, int], Callable[[], State]] = {}
        self._slots: dict[tuple[int, int], Callable[[], Slots]] = {}
        # Prefilled prompt prefixes by their tokens: (1-row state, its cache length); see
        # scheduler.py.
        self.prefixes: collections.OrderedDict[tuple[int, ...], tuple[State, int]] = (
            collections.OrderedDict())
        self.max_prefixes = 32
        self.max_prefix_bytes = 1 << 30  # a 27B model's 8K-token prefix is ~1 GB: keep one
        self.stats = PrefillStats()
        self.decode_stats = DecodeStats()  # every stream's decode work, cumulative

    def __repr__(self) -> str:
        mesh = f", mesh={sharding.mesh_dict(self.mesh)}" if self.mesh is not None else ""
        return (f"Engine({self.family.__name__}, {type(self.cfg).__name__}, "
                f"dtype={jnp.dtype(self.dtype)}{mesh}, programs={self.compile_log.count})")

    @functools.cached_property
    def head(self) -> Any:
        """`decode_head(params)`, made at the first decode (a scoring-only engine never has it)."""
        return decode_head(self.params, self.mesh, codes=self.codes)

    @functools.cached_property
    def greedy_head(self) -> Any:
        """`head` with its `ArgmaxTiles` (`family.greedy_next`'s), made at the first decode call
        that takes it (see `greedy_applies`)."""
        return self.head.with_argmax()

    def greedy_applies(self, b: int) -> bool:
        """Whether a decode call of B slots whose every row is greedy takes `greedy_head`: the
        family has `greedy_next` and it applies to this config, head and B (the 270M: a
        quantized tied head, no final soft-cap), and $GEMMA_BATCH_GREEDY_HEAD is not off."""
        applies = getattr(self.family, "greedy_head", None)
        return (applies is not None and applies(self.cfg, self.head, b)
                and os.environ.get("GEMMA_BATCH_GREEDY_HEAD", "on").lower() not in ("off", "0"))

    def prefetch_codes(self) -> None:
        """Reads the checkpoint's quantized codes that `head` will place (host arrays, no
        device work; thread-safe), when it will read them: for a caller with idle time."""
        prefetch = getattr(self.codes, "prefetch", None)
        if (prefetch is not None and "head" not in self.__dict__
                and wants_codes(self.params, self.mesh)):
            prefetch()

    def axes(self, length: int) -> Any:
        """Per state leaf of a cache of length L, its batch axis (see `batch_axes`)."""
        if length not in self._axes:
            self._axes[length] = batch_axes(self.family, self.cfg, length, self.dtype)
        return self._axes[length]

    # Placement on the mesh (all identity without one).

    def state_shardings(self, b: int, length: int) -> Any:
        """NamedSharding per state leaf of B slots, cache length L (mesh only)."""
        if (b, length) not in self._state_sh:
            shapes = jax.eval_shape(lambda: self.family.init_state(self.cfg, b, length,
                                                                   self.dtype))
            self._state_sh[b, length] = sharding.tree_shardings(
                shapes, self.family.STATE_AXES, self.mesh, "state")
        return self._state_sh[b, length]

    def _slots_sh(self, slots: Slots) -> Any:
        return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(self.mesh, x.shape),
                                      slots)

    def _constrain(self, b: int, length: int) -> Callable[[State], State]:
        if self.mesh is None:
            return _keep
        sh = self.state_shardings(b, length)
        return lambda st: jax.lax.with_sharding_constraint(st, sh)

    def _put(self, x: Any, rows: bool = False) -> Any:
        """Host values onto the device(s): replicated, or with `rows` axis 0 over `data`."""
        if self.mesh is None:  # not jnp.asarray: that compiles a program per shape and dtype
            return jax.device_put(x)
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, np.shape(a)) if rows
                                     else sharding.replicated(self.mesh)), x)

    def _compile(self, key: Hashable, fn: Callable, donate: tuple[int, ...], args: tuple,
                 shardings: Callable[[], tuple[Any, Any]]) -> Any:
        """`fn` compiled for `args` (`key`: its `compile_log` key); on a mesh with the (in, out)
        shardings `shardings()`. The program is kept on disk, and a later process loads it
        without tracing (`saved.py`); on a mesh its key also holds the mesh's devices and the
        shardings."""
        parts = (self.family.__name__, repr(self.cfg), str(jnp.dtype(self.dtype)), key, donate)
        if self.mesh is None:
            return saved.load_or_compile(key[0], parts, args, lambda name: jax.jit(
                saved.named(fn, name), donate_argnums=donate).lower(*args))
        in_sh, out_sh = shardings()
        # The nested device ids carry the mesh's shape; the names say which axis is which.
        placed = (self.mesh.axis_names, self.mesh.device_ids.tolist(), repr(in_sh), repr(out_sh))
        return saved.load_or_compile(key[0], (*parts, placed), args, lambda name: jax.jit(
            saved.named(fn, name), donate_argnums=donate, in_shardings=in_sh,
            out_shardings=out_sh).lower(*args))

    def init_state(self, b: int, length: int) -> State:
        """Empty model state for B slots of cache length L (made in place on a mesh). One small
        jitted program per shape: made op by op, the 270M's 18 layers took 0.75-0.85 s, the
        program 0.1 s."""
        if (b, length) not in self._init:
            sh = None if self.mesh is None else self.state_shardings(b, length)
            self._init[b, length] = jax.jit(
                lambda: self.family.init_state(self.cfg, b, length, self.dtype),
                out_shardings=sh)
        return self._init[b, length]()

    def empty_slots(self, b: int, out_len: int) -> Slots:
        """B free slots with room for O generated tokens (see `empty_slots`), made by one
        jitted program per shape (op by op, each of its ~12 arrays compiled an eager program)."""
        if (b, out_len) not in self._slots:
            sh = (None if self.mesh is None else
                  self._slots_sh(jax.eval_shape(lambda: empty_slots(b, out_len))))
            self._slots[b, out_len] = jax.jit(lambda: empty_slots(b, out_len), out_shardings=sh)
        return self._slots[b, out_len]()

    # The programs.

    def prefill(self, state: State, slots: Slots, tokens: np.ndarray, positions: np.ndarray,
                new: NewRows, length: int) -> tuple[State, Slots]:
        """Feeds tokens [P, T] at positions [P, T] into the new rows' slots (state of cache
        length L) and places them."""
        b, o = slots.out.shape
        p, t = tokens.shape
        args = (self.params, state, slots, self._put(tokens, rows=True),
                self._put(positions, rows=True), self._put(new))

        def shardings() -> tuple[Any, Any]:
            st, sl = self.state_shardings(b, length), self._slots_sh(slots)
            return ((self._param_sh, st, sl, args[3].sharding, args[4].sharding,
                     sharding.replicated(self.mesh)), (st, sl))

        key = ("prefill", b, length, o, p, t)
        fn = self.compile_log.get(
            key, "prefill", f"B={b} L={length} P={p} T={t}",
            lambda: self._compile(key, prefill_program(self.family, self.cfg, self.axes(length),
                                                       self._constrain(b, length)),
                                  (1, 2), args, shardings))
        return fn(*args)

    def prefill_packed(self, state: State, slots: Slots, prefix: State, prefix_length: int,
                       pack: Any, new: NewRows, length: int, prefix_len: int, span: int
                       ) -> tuple[State, Slots]:
        """Packed prefill (see `packed_program`) of the rows in `new` ([B] entries) of a state
        of cache length L from the 1-row `prefix` state of cache length `prefix_length` <= L
        holding `prefix_len` tokens; pack is a host `model.packed.Pack`."""
        b, o = slots.out.shape
        n = len(pack.tokens)
        prefix_len = -(-prefix_len // 64) * 64  # a bound: one program per 64 prefix tokens
        args = (self.params, state, slots, prefix, self._put(pack), self._put(new))

        def shardings() -> tuple[Any, Any]:
            st, sl = self.state_shardings(b, length), self._slots_sh(slots)
            rep = sharding.replicated(self.mesh)
            return ((self._param_sh, st, sl, self.state_shardings(1, prefix_length), rep, rep),
                    (st, sl))

        key = ("packed", b, length, o, n, span, prefix_len, prefix_length)
        fn = self.compile_log.get(
            key, "packed", f"B={b} L={length} N={n} span={span} prefix<={prefix_len}",
            lambda: self._compile(key, packed_program(self.family, self.cfg, self.axes(length),
                                                      length, self.dtype, prefix_len, span,
                                                      self._constrain(b, length)),
                                  (1, 2), args, shardings))
        return fn(*args)

    def decode(self, state: State, slots: Slots, stop_ids: np.ndarray, max_steps: int,
               min_free: int, length: int, tables: tuple[Array, Array] | None = None,
               logprobs: bool = False, greedy: bool = False
               ) -> tuple[State, Slots, Array, Array]:
        """Runs the decode loop (see `decode_program`) over a state of cache length L;
        `tables`: an output format's (token_class [V], next_sc [S, C]) (`format_tables`);
        `logprobs`: record each token's log-probability in `slots.logp`; `greedy`: every row
        the call runs is greedy (then, with neither of those, the steps take `greedy_head`
        where it applies: the same tokens)."""
        b, o = slots.out.shape
        formatted = tables is not None
        greedy = greedy and not formatted and not logprobs and self.greedy_applies(b)
        tables = tables or (self._put(np.zeros((1,), np.int32)),
                            self._put(np.zeros((1, 1), np.int32)))
        args = (self.params, state, slots, self._put(stop_ids),
                self._put(np.int32(max_steps)), self._put(np.int32(min_free)), *tables,
                self.greedy_head if greedy else self.head)
        shape = tuple(tables[1].shape) if formatted else None

        def shardings() -> tuple[Any, Any]:
            st, sl = self.state_shardings(b, length), self._slots_sh(slots)
            rep = sharding.replicated(self.mesh)
            return (self._param_sh, st, sl, rep, rep, rep, rep, rep, rep), (st, sl, rep, rep)

        key = ("decode", b, length, o, len(stop_ids), shape, logprobs) + (
            ("greedy",) if greedy else ())
        fn = self.compile_log.get(
            key, "decode",
            f"B={b} L={length} S={len(stop_ids)}" + (f" format={shape}" if formatted else "")
            + (" logprobs" if logprobs else "") + (" greedy" if greedy else ""),
            lambda: self._compile(key, decode_program(self.family, self.cfg,
                                                      self._constrain(b, length), formatted,
                                                      logprobs, greedy),
                                  (1, 2), args, shardings))
        return fn(*args)

    def format_tables(self, auto: Automaton) -> tuple[Array, Array]:
        """An output format's tables on device (replicated on a mesh), for `decode`."""
        return self._put(auto.token_class), self._put(auto.next_sc)

    def deactivate(self, slots: Slots, kill: np.ndarray, length: int) -> Slots:
        """Frees the slots marked in kill (bool [B]) of a group of cache length L."""
        b, o = slots.out.shape
        args = (slots, self._put(kill, rows=True))

        def shardings() -> tuple[Any, Any]:
            sl = self._slots_sh(slots)
            return (sl, args[1].sharding), sl

        key = ("deactivate", b, length, o)
        fn = self.compile_log.get(key, "deactivate", f"B={b} L={length}",
                                  lambda: self._compile(key, deactivate, (0,), args, shardings))
        return fn(*args)

    def resize(self, state: State, slots: Slots, length: int, b: int, new_length: int,
               out_len: int) -> tuple[State, Slots]:
        """The state and slots moved to B' = b slots, cache length L' and O' = out_len (see
        `resize`); every active row must fit L' and O'."""
        b0, o0 = slots.out.shape
        args = (state, slots)
        fresh = (jax.eval_shape(lambda: self.family.init_state(self.cfg, b, new_length,
                                                                self.dtype)),
                 jax.eval_shape(lambda: empty_slots(b, out_len)))

        def shardings() -> tuple[Any, Any]:
            new_sl = jax.tree_util.tree_map(
                lambda x: sharding.batch_sharding(self.mesh, x.shape), fresh[1])
            return ((self.state_shardings(b0, length), self._slots_sh(slots)),
                    (self.state_shardings(b, new_length), new_sl))

        key = ("resize", b0, length, o0, b, new_length, out_len)
        fn = self.compile_log.get(
            key, "resize", f"B={b0}->{b} L={length}->{new_length} O={o0}->{out_len}",
            lambda: self._compile(key, functools.partial(
                resize, lambda: (self.family.init_state(self.cfg, b, new_length, self.dtype),
                                 empty_slots(b, out_len))), (), args, shardings))
        return fn(*args)
