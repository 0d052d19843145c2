"""RecurrentGemma's shared pieces: the state of each block, the GeGLU MLP, the RG-LRU and the
embedding scale, used by the cached forward (model/griffin.py) and the packed prefill
(model/griffin_packed.py).

Dimension letters: B batch, T time, L lru_width, D d_model, F MLP width, N RG-LRU blocks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model.config import GriffinConfig
from model.layers import dot, gelu_tanh
from model.scan import linear_scan

Array = jax.Array
Params = dict[str, Any]


class RecurrentState(NamedTuple):
    """State of one recurrent block."""

    rg_lru: Array  # [B, L] float32 hidden state of the RG-LRU
    conv: Array  # [B, W-1, L] the last W-1 inputs of the temporal conv (oldest first)


class AttentionState(NamedTuple):
    """Ring buffer of one local-attention block: position p lives in slot p % S."""

    k: Array  # [B, S, K, Dh] keys (RoPE applied)
    v: Array  # [B, S, K, Dh]
    pos: Array  # [B, S] int32 position held in each slot, -1 = empty


GriffinState = tuple  # one RecurrentState | AttentionState per block


def embed_scale(d_model: int) -> float:
    """sqrt(d_model) rounded to bfloat16, as both reference implementations compute it."""
    return float(np.asarray(math.sqrt(d_model), dtype=jnp.bfloat16))


def mlp(p: Params, x: Array) -> Array:
    """GeGLU MLP with biases: [B, T, D] -> [B, T, D]."""
    gate = gelu_tanh(dot("btd,fd->btf", x, p["gate"]) + p["gate_b"])  # [B, T, F]
    up = dot("btd,fd->btf", x, p["up"]) + p["up_b"]
    return dot("btf,df->btd", gate * up, p["down"]) + p["down_b"]


def rg_lru(p: Params, x: Array, pos: Array, h0: Array | None, cfg: GriffinConfig,
           start: Array | None = None, h_start: Array | None = None) -> Array:
    """Real-gated linear recurrent unit.

    Args:
      x: [B, T, L] input (output of the conv).
      pos: [B, T] positions (-1 padding, 0 restarts the recurrence).
      h0: [B, L] float32 state before the chunk, or None for zeros.
      start / h_start: [B, T] bool tokens that begin a segment continuing from the state
        h_start [L] (packed prefill: every segment continues one shared prefix), or None.
    Returns:
      h: [B, T, L] float32, the state after every token (h[:, -1]: after the chunk).
    """
    b, t, lw = x.shape
    n = cfg.num_heads
    xf = x.astype(jnp.float32)
    xb = xf.reshape(b, t, n, lw // n)  # [B, T, N, I]

    def block_diag(w: Array, bias: Array) -> Array:
        y = jnp.einsum("btni,nij->btnj", xb, w.astype(jnp.float32)) + bias.astype(jnp.float32)
        return y.reshape(b, t, lw)  # [B, T, L]

    gate_x = jax.nn.sigmoid(block_diag(p["input_gate"], p["input_gate_b"]))
    gate_a = jax.nn.sigmoid(block_diag(p["a_gate"], p["a_gate_b"]))
    log_a = -8.0 * gate_a * jax.nn.softplus(p["a_param"].astype(jnp.float32))  # c = 8
    a = jnp.exp(log_a)
    a_sq = jnp.exp(2.0 * log_a)
    reset = (pos == 0)[..., None]  # [B, T, 1]
    valid = (pos >= 0)[..., None]
    multiplier = jnp.where(reset, 1.0, jnp.sqrt(1.0 - a_sq))  # sqrt(1 - a^2) normalisation
    x_in = jnp.where(valid, xf * gate_x * multiplier, 0.0)
    if start is not None:  # a segment's first step reads h_start instead of the token before
        start = start[..., None]
        x_in = jnp.where(start, x_in + a * h_start.astype(jnp.float32), x_in)
        reset = reset | start
    a = jnp.where(valid, jnp.where(reset, 0.0, a), 1.0)  # padding: h passes through unchanged
    return linear_scan(a, x_in, h0)  # [B, T, L] float32
