"""Linear recurrence h_t = a_t * h_{t-1} + x_t, computed with a parallel (associative) scan.

Dimension letters: B batch, T time, L recurrence width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Composes two affine maps h -> a*h + x (left applied first)."""
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, a_r * x_l + x_r


def linear_scan(a: Array, x: Array, h0: Array | None = None) -> Array:
    """Runs the diagonal linear recurrence over time in O(log T) parallel depth.

    Args:
      a: [B, T, L] decay of each step (0 restarts the recurrence at that step).
      x: [B, T, L] input of each step.
      h0: [B, L] state before the first step (None = zeros).
    Returns:
      h: [B, T, L], the state after each step, in float32 (h[:, -1] is the new state).
    """
    a = a.astype(jnp.float32)
    x = x.astype(jnp.float32)
    if h0 is not None:
        x = x.at[:, 0].add(a[:, 0] * h0.astype(jnp.float32))
    if x.shape[1] == 1:  # decode: one O(1) step, nothing to scan
        return x
    _, h = jax.lax.associative_scan(_combine, (a, x), axis=1)
    return h
