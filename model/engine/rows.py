"""The rows of a model state: which axis of each leaf is the batch, and taking, writing or
resetting a set of rows (slots) in every leaf at once, for any family's state tree."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.cpu import fast_bf16
from model.family import Family, State
from model.layers import split_head

Array = jax.Array


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



def copy_prefix(state: State, prefix: State, empty: State, axes: Any, idx_p: Array) -> State:
    """Sets rows idx_p of every state leaf to a copy of the 1-row `prefix` (out-of-range rows
    are dropped): first the whole row to `empty` (a 1-row empty state of the same shapes), then
    the prefix's leading slots on every axis (its cache may be shorter than the rows').

    A prefix of cache length Lp <= L holds its positions in the same slots a row of length L
    would (flat caches: slot = position; rings of min(window, length) slots: position < Lp), so
    a row starts as an exact copy of the prompt frame's caches or recurrent state.
    """
    def put(leaf: Array, pre: Array, emp: Array, ax: int | None) -> Array:
        if ax is None:
            return leaf
        whole = (slice(None),) * ax + (idx_p,)
        rows = emp.shape[:ax] + idx_p.shape + emp.shape[ax + 1:]
        leaf = leaf.at[whole].set(jnp.broadcast_to(emp, rows).astype(leaf.dtype), mode="drop")
        lead = tuple(idx_p if i == ax else slice(0, d) for i, d in enumerate(pre.shape))
        rows = pre.shape[:ax] + idx_p.shape + pre.shape[ax + 1:]
        return leaf.at[lead].set(jnp.broadcast_to(pre, rows).astype(leaf.dtype), mode="drop")

    return jax.tree_util.tree_map(put, state, prefix, empty, axes)


# Whole-state programs and helpers of the engine (programs.py).


def resize(fresh: Callable[[], tuple[State, Any]], state: State, slots: Any
           ) -> tuple[State, Any]:
    """(state, slots) copied into `fresh()` ones of other B, L, O: every leaf keeps the corner
    both shapes share. Valid while each active row fits the new L and O: cache entries sit at
    their position (a ring smaller than the window never wraps), so the corner holds them."""
    def fit(new: Array, old: Array) -> Array:
        corner = tuple(slice(0, min(a, c)) for a, c in zip(new.shape, old.shape))
        return new.at[corner].set(old[corner].astype(new.dtype))

    return jax.tree_util.tree_map(fit, fresh(), (state, slots))


def deactivate(slots: Any, kill_b: Array) -> Any:
    """Frees the slots marked in kill_b (bool [B])."""
    return slots._replace(active=slots.active & ~kill_b)


def state_dtype(params: Any) -> Any:
    """The params' floating dtype; float32 on CPU, where XLA would convert a bf16 cache to f32
    for every attention product (a bf16 model's 16-row decode step: ~25% faster, f32 state)."""
    if jax.default_backend() == "cpu":
        return jnp.float32
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


def wants_codes(params: Any, mesh: Any) -> bool:
    """Whether `decode_head` reads a checkpoint's quantized codes for these params (one CPU
    device, float32 weights, not turned off; the kernel's build is checked when it is made)."""
    return (mesh is None and jax.default_backend() == "cpu"
            and params["embed"].dtype == jnp.float32
            and os.environ.get("GEMMA_BATCH_QUANT_DECODE", "on").lower() not in ("off", "0"))


def decode_head(params: Any, mesh: Any, bf16_dots: bool | None = None,
                codes: Callable[[], dict[str, Any]] | None = None) -> Any:
    """What decode steps read besides `params` (the `head` argument of `family.forward`):

    * `quant.DecodeWeights`, from `codes()` (a GGUF's int8 block codes, checkpoints/
      gguf_codes.py), on one CPU device where the native kernel builds (model/kernels): the
      matrices of a few-row step at 1.25-1.5 bytes per weight instead of 4, the same weights;
      $GEMMA_BATCH_QUANT_DECODE=off turns it off;
    * else the tied head as bf16 halves for vocab-major logits (`layers.split_head`), on one CPU
      device with native bf16 dot products (`bf16_dots`, default: this CPU's
      `cpu.fast_bf16()`), for a float32 model whose head V x D >= 2^24 (the 270M's head is ~45%
      of a decode step; small heads stay exact float32). Same bytes as the head it reads;
    * else None.
    """
    embed = params["embed"]
    one_cpu = mesh is None and jax.default_backend() == "cpu"
    if codes is not None and wants_codes(params, mesh):
        from model import kernels, quant

        if kernels.available():
            found = codes()
            return quant.decode_weights(found, params, checked=getattr(codes, "checked", False),
                                        on_checked=getattr(codes, "remember", None))
    if bf16_dots is None:
        bf16_dots = fast_bf16()
    if not bf16_dots or not one_cpu or embed.dtype != jnp.float32 or embed.size < 1 << 24:
        return None
    return jax.jit(split_head)(embed)
