"""Packed prefill: several prompts' tokens in one sequence, so prefill cost follows the real token
count rather than a padded chunk per row.

A `Pack` holds N tokens of up to B rows, each row a contiguous segment. Every segment continues
one shared context (`prefix`: a 1-row state, the prompt frame computed once, or an empty state):
a token at position p of row r sees the prefix keys at positions <= p and the earlier tokens of
its own segment (a block-diagonal causal mask), and its K/V (or recurrent state) is written into
row r of the engine's state. Families implement `forward_packed` on top of the helpers here.

Dimension letters: N packed tokens, Q query block, W keys per block, C prefix context slots,
H query heads, K key/value heads, G = H // K, Dh head dim, P placed rows.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BLOCK = 64  # queries per attention block (32 when N is an odd multiple of 32)
_NEG = -1e30


class Pack(NamedTuple):
    """Device arrays of one packed prefill call (all [N] unless noted)."""

    tokens: Array  # int32
    positions: Array  # int32, -1 = padding
    row: Array  # int32: the state row (decode slot) the token belongs to; B (dropped) for padding
    offset: Array  # int32: index of the token within its segment (0 = the segment's first)
    last: Array  # int32: the last position of the token's segment (ring write rule)
    row_end: Array  # int32 [P]: index in N of placed row p's last token, -1 if it has none


def pack_arrays(segments: Sequence[tuple[int, int, Sequence[int]]], n: int, rows: int,
                pad_row: int) -> Pack:
    """Host-side Pack of `segments` [(state row, first position, tokens)], padded to n tokens.

    `rows` (P) is the length of row_end: segment i's end goes to row_end[i]; `pad_row` is the
    row index padding tokens get (B: out of range, so their writes are dropped).
    """
    tokens = np.zeros((n,), np.int32)
    positions = np.full((n,), -1, np.int32)
    row = np.full((n,), pad_row, np.int32)
    offset = np.zeros((n,), np.int32)
    last = np.full((n,), -1, np.int32)
    row_end = np.full((rows,), -1, np.int32)
    i = 0
    for p, (r, start, toks) in enumerate(segments):
        k = len(toks)
        if i + k > n:
            raise ValueError(f"pack of {n} tokens cannot hold {i + k}")
        tokens[i:i + k] = toks
        positions[i:i + k] = np.arange(start, start + k)
        row[i:i + k] = r
        offset[i:i + k] = np.arange(k)
        last[i:i + k] = start + k - 1
        row_end[p] = i + k - 1 if k else -1
        i += k
    return Pack(tokens, positions, row, offset, last, row_end)


def attention(q: Array, k: Array, v: Array, pack: Pack, ctx_k: Array, ctx_v: Array,
              ctx_pos: Array, span: int, window: int | None, cap: float | None) -> Array:
    """Block-diagonal causal attention of packed tokens over a shared context plus their segment.

    Args:
      q: [N, K, G, Dh] queries (RoPE and scaling applied); k, v: [N, K, Dh].
      pack: positions and rows of the N tokens (N a multiple of 32 when over 32).
      ctx_k, ctx_v: [C, K, Dh] the shared prefix's keys and values; ctx_pos: [C] (-1 = empty).
      span: static; every segment in the pack is at most this long, so block j's queries
        [jQ, jQ+Q) only need packed keys in [jQ - span, jQ + Q).
      window: sliding window (a query at p sees keys q with p - q < window), None = global.
      cap: attention logit soft-cap, None = none.
    Returns:
      [N, K, G, Dh] float32 attention outputs (garbage at padding).
    """
    n, kh, g, dh = q.shape
    qb = min(BLOCK if n % BLOCK == 0 else BLOCK // 2, n)
    nb = n // qb
    w = span + qb  # keys per block
    pos, row = pack.positions, pack.row
    if w >= n:  # one block sees the whole pack
        nb, qb, w = 1, n, n
        kb, vb, kpos, krow = k[None], v[None], pos[None], row[None]
    else:
        lead = w - qb
        idx = jnp.arange(nb)[:, None] * qb + jnp.arange(w)[None, :]  # [nb, W] into padded
        kp = jnp.pad(k, ((lead, 0), (0, 0), (0, 0)))
        vp = jnp.pad(v, ((lead, 0), (0, 0), (0, 0)))
        kb, vb = kp[idx], vp[idx]  # [nb, W, K, Dh]
        kpos = jnp.pad(pos, (lead, 0), constant_values=-1)[idx]  # [nb, W]
        krow = jnp.pad(row, (lead, 0), constant_values=-1)[idx]
    qq = q.reshape(nb, qb, kh, g, dh)
    qpos, qrow = pos.reshape(nb, qb), row.reshape(nb, qb)
    dt = ctx_k.dtype
    s_ctx = jnp.einsum("jqkgd,ckd->jkgqc", qq.astype(dt), ctx_k,
                       preferred_element_type=jnp.float32)  # [nb, K, G, Q, C]
    s_own = jnp.einsum("jqkgd,jwkd->jkgqw", qq.astype(dt), kb.astype(dt),
                       preferred_element_type=jnp.float32)  # [nb, K, G, Q, W]
    scores = jnp.concatenate([s_ctx, s_own], axis=-1)
    if cap is not None:
        scores = jnp.tanh(scores / cap) * cap
    qp = qpos[:, :, None]  # [nb, Q, 1]
    m_ctx = (ctx_pos[None, None, :] >= 0) & (ctx_pos[None, None, :] <= qp)  # [nb, Q, C]
    m_own = ((kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qp)
             & (krow[:, None, :] == qrow[:, :, None]))  # [nb, Q, W]
    if window is not None:
        m_ctx &= qp - ctx_pos[None, None, :] < window
        m_own &= qp - kpos[:, None, :] < window
    mask = jnp.concatenate([m_ctx, m_own], axis=-1)  # [nb, Q, C+W]
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    c = ctx_k.shape[0]
    p_ctx, p_own = probs[..., :c].astype(dt), probs[..., c:].astype(dt)
    out = (jnp.einsum("jkgqc,ckd->jqkgd", p_ctx, ctx_v, preferred_element_type=jnp.float32)
           + jnp.einsum("jkgqw,jwkd->jqkgd", p_own, vb.astype(dt),
                        preferred_element_type=jnp.float32))
    return out.reshape(n, kh, g, dh)


def ctx_slots(size: int, prefix_len: int) -> int:
    """Slots of a prefix cache of `size` slots that can hold its first prefix_len positions
    (a multiple of 64, at least 8): the context the packed attention reads."""
    return min(size, max(8, -(-prefix_len // 64) * 64))
