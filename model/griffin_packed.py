"""RecurrentGemma's packed prefill: several rows' segments in one sequence (model/packed.py),
each continuing a shared prefix state (its RG-LRU state, conv tail and local-attention ring),
each row's final state written into the engine's state; `model.griffin` exports it as the
family's `forward_packed`.
"""

from __future__ import annotations

import jax.numpy as jnp

from model import packed
from model.config import GriffinConfig
from model.griffin_blocks import (Array, AttentionState, GriffinState, Params, RecurrentState,
                                  embed_scale, mlp, rg_lru)
from model.layers import dot, gelu_tanh, rms_norm, rope, unembed, write_slots


def _recurrent_packed(p: Params, x: Array, pack: packed.Pack, st: RecurrentState,
                      pre: RecurrentState, cfg: GriffinConfig) -> tuple[Array, RecurrentState]:
    """Recurrent block over packed segments, each continuing the prefix state `pre` (1 row).

    The conv reads the segment's own earlier inputs, else the prefix's conv tail; the RG-LRU
    starts each segment from the prefix's hidden state (position 0: from zero, as in `rg_lru`).
    Writes each placed row's final hidden state and conv tail into `st` (rows pack.row).
    """
    wc, n = cfg.conv1d_width, x.shape[1]
    off, pos = pack.offset, pack.positions
    y = gelu_tanh(dot("btd,dl->btl", x, p["linear_y"]) + p["linear_y_b"])[0]  # [N, L]
    u = (dot("btd,dl->btl", x, p["linear_x"]) + p["linear_x_b"])[0]  # [N, L]
    tail0 = pre.conv[0].astype(u.dtype)  # [W-1, L], oldest first

    def lagged(lag: int, idx: Array, o: Array) -> Array:
        """The conv input `lag` steps before token idx (offset o in its segment)."""
        own = u[jnp.clip(idx - lag, 0, n - 1)]
        old = tail0[jnp.clip(wc - 1 - lag + o, 0, wc - 2)]
        return jnp.where((o >= lag)[:, None], own, old)

    idx_n = jnp.arange(n)
    conv = p["conv_b"].astype(u.dtype)
    for j in range(wc):  # conv_w[j] multiplies the input (W-1-j) steps back
        conv = conv + lagged(wc - 1 - j, idx_n, off) * p["conv_w"][j].astype(u.dtype)

    # The RG-LRU, each segment starting from the prefix state (position 0: from zero).
    start = (off == 0) & (pos > 0)
    h = rg_lru(p, conv[None], pos[None], None, cfg, start[None], pre.rg_lru[0])[0]  # [N, L]
    out = dot("btl,ld->btd", (h.astype(u.dtype) * y)[None].astype(x.dtype), p["linear_out"])
    out = out + p["linear_out_b"]

    # Each placed row's state after its last token (rows without tokens keep the prefix copy).
    end = pack.row_end  # [P]
    rows = jnp.where(end >= 0, pack.row[jnp.maximum(end, 0)], st.rg_lru.shape[0])
    e = jnp.maximum(end, 0)
    o_end = off[e]
    tail = jnp.stack([lagged(wc - 2 - k, e, o_end) for k in range(wc - 1)], axis=1)  # [P,W-1,L]
    new = RecurrentState(rg_lru=st.rg_lru.at[rows].set(h[e], mode="drop"),
                         conv=st.conv.at[rows].set(tail.astype(st.conv.dtype), mode="drop"))
    return out, new


def _attention_packed(p: Params, x: Array, pack: packed.Pack, st: AttentionState,
                      pre: AttentionState, prefix_len: int, span: int,
                      cfg: GriffinConfig) -> tuple[Array, AttentionState]:
    """Local attention over packed segments plus the prefix ring; writes the rows' rings."""
    s, h, k, dh = cfg.attention_window, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = pack.positions
    q_ = dot("btd,dhe->bthe", x, p["q"])  # [1, N, H, Dh]
    k_ = dot("btd,dke->btke", x, p["k"])
    v_ = dot("btd,dke->btke", x, p["v"])[0]
    q_ = rope(q_, pos[None], cfg.rope_base, rotary_dims=dh // 2)[0] * dh**-0.5
    k_ = rope(k_, pos[None], cfg.rope_base, rotary_dims=dh // 2)[0]
    c = packed.ctx_slots(s, prefix_len)
    out = packed.attention(q_.reshape(-1, k, h // k, dh), k_, v_, pack, pre.k[0, :c],
                           pre.v[0, :c], pre.pos[0, :c], span, s, None)
    out = out.reshape(1, -1, h * dh).astype(x.dtype)
    out = dot("btf,fd->btd", out, p["o"].reshape(h * dh, -1)) + p["o_b"]
    slot = write_slots(pack.positions, s, ring=True, last=pack.last)
    new = AttentionState(k=st.k.at[pack.row, slot].set(k_.astype(st.k.dtype), mode="drop"),
                         v=st.v.at[pack.row, slot].set(v_.astype(st.v.dtype), mode="drop"),
                         pos=st.pos.at[pack.row, slot].set(pos, mode="drop"))
    return out, new


def forward_packed(params: Params, pack: packed.Pack, state: GriffinState,
                   prefix: GriffinState, prefix_len: int, span: int,
                   cfg: GriffinConfig) -> tuple[Array, GriffinState]:
    """Prefills packed segments (model/packed.py) that all continue `prefix` (a 1-row state;
    an empty one for none) and writes each row's state into `state` (the rows were set to a
    copy of the prefix before, by the engine). `prefix_len` and `span` are static bounds on the
    prefix's and on a segment's length. Returns (logits [N, V] float32, the new state)."""
    embed = params["embed"]
    x = embed[pack.tokens][None] * jnp.asarray(embed_scale(cfg.d_model), embed.dtype)
    new_state = []
    for kind, p, st, pre in zip(cfg.block_types, params["layers"], state, prefix):
        hn = rms_norm(x, p["temporal_norm"], cfg.rms_eps)
        if kind == "recurrent":
            y, st = _recurrent_packed(p, hn, pack, st, pre, cfg)
        else:
            y, st = _attention_packed(p, hn, pack, st, pre, prefix_len, span, cfg)
        x = x + y
        x = x + mlp(p, rms_norm(x, p["channel_norm"], cfg.rms_eps))
        new_state.append(st)
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    return unembed(x, embed, cfg.final_softcap)[0], tuple(new_state)
