"""RecurrentGemma (Griffin): RG-LRU recurrent blocks and local multi-query attention, in JAX.

Pure functions over an explicit parameter tree and an explicit, fixed-size state (the `Family`
protocol, model/family.py):
  init_params(cfg, key, dtype) -> params
  init_state(cfg, batch, max_len, dtype) -> state     (its size does not depend on max_len)
  forward(params, tokens, positions, state, cfg, vocab_major=False) -> (logits, new_state)

Dimension letters: B batch, T chunk time, S ring slots (= attention_window), D d_model,
L lru_width, H query heads, K key/value heads, G = H // K, Dh head dim, F MLP width,
V vocabulary, W conv1d width, N blocks of the block-diagonal RG-LRU gates (= H), I = L // N.

Parameter tree (norm weights stored as HF stores them; the scale applied is 1 + w):
  {"embed": [V, D], "final_norm": [D], "layers": [block, ...]} where every block has
  "temporal_norm" [D], "channel_norm" [D], and the GeGLU MLP "gate" [F, D], "gate_b" [F],
  "up" [F, D], "up_b" [F], "down" [D, F], "down_b" [D] ([out, in], as in model/transformer.py);
  a recurrent block adds
  "linear_x" [D, L], "linear_x_b" [L], "linear_y" [D, L], "linear_y_b" [L],
  "linear_out" [L, D], "linear_out_b" [D], "conv_w" [W, L] (conv_w[W-1] multiplies the
  current step), "conv_b" [L], "input_gate" [N, I, I], "input_gate_b" [N, I],
  "a_gate" [N, I, I], "a_gate_b" [N, I], "a_param" [L];
  an attention block adds "q" [D, H, Dh], "k" [D, K, Dh], "v" [D, K, Dh], "o" [H, Dh, D],
  "o_b" [D].

Semantics of `positions` ([B, T] int32): valid tokens of a row have consecutive positions and
are contiguous in the chunk (padding, -1, may sit on the left and/or the right); padding
neither changes the state nor affects other tokens; a row whose chunk holds position 0
starts a new sequence (its state is discarded first). Local attention lets a query at
position p see keys at positions p - attention_window < q <= p, as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import GriffinConfig
from model.griffin_blocks import (Array, AttentionState, GriffinState, Params, RecurrentState,
                                  embed_scale, mlp, rg_lru)
from model.griffin_packed import forward_packed  # noqa: F401 - the Family's packed prefill
from model.layers import dot, gelu_tanh, rms_norm, rope, scatter_slots, unembed, write_slots

_NEG = -1e30  # finite "minus infinity": a fully masked (padding) query gives garbage, not NaN


# Logical axes of every parameter and state leaf, by its name (model/sharding.py maps them onto
# the mesh with LOGICAL_AXIS_RULES).
FIXED_STATE = True  # see model/family.py
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),  # [V, D]
    "final_norm": ("embed",), "temporal_norm": ("embed",), "channel_norm": ("embed",),
    "gate": ("mlp", "embed"), "up": ("mlp", "embed"),  # [F, D]
    "gate_b": ("mlp",), "up_b": ("mlp",),
    "down": ("embed", "mlp"), "down_b": ("embed",),  # [D, F]
    "linear_x": ("embed", "lru_width"), "linear_y": ("embed", "lru_width"),  # [D, L]
    "linear_x_b": ("lru_width",), "linear_y_b": ("lru_width",),
    "linear_out": ("lru_width", "embed"), "linear_out_b": ("embed",),  # [L, D]
    "conv_w": ("conv", "lru_width"), "conv_b": ("lru_width",),  # [W, L]
    "input_gate": ("lru_heads", None, None), "a_gate": ("lru_heads", None, None),  # [N, I, I]
    "input_gate_b": ("lru_heads", None), "a_gate_b": ("lru_heads", None),  # [N, I]
    "a_param": ("lru_width",),
    "q": ("embed", "heads", "head_dim"),  # [D, H, Dh]
    "k": ("embed", "kv_heads", "head_dim"), "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"), "o_b": ("embed",),  # [H, Dh, D]
}
STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "rg_lru": ("batch", "lru_width"),  # [B, L]
    "conv": ("batch", "conv", "lru_width"),  # [B, W-1, L]
    "k": ("batch", "cache_len", "kv_heads", "head_dim"),  # [B, S, K, Dh]
    "v": ("batch", "cache_len", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_len"),  # [B, S]
}


# ----------------------------------------------------------------------------- params


def init_params(cfg: GriffinConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters with the reference initialisation scales.

    Args:
      cfg: model config.
      key: PRNG key.
      dtype: parameter dtype.
    Returns:
      The parameter tree described in the module docstring.
    """
    d, lw, f, h, k, dh = (cfg.d_model, cfg.lru_width, cfg.ffw_dim, cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim)
    n, i_w, w = h, cfg.lru_width // cfg.num_heads, cfg.conv1d_width
    final_var = 2.0 / cfg.num_layers
    if isinstance(key, jax.core.Tracer):  # under jit / eval_shape: draw with jax.random
        keys = iter(jax.random.split(key, 16 * cfg.num_layers + 2))

        def draw(shape: tuple[int, ...], uniform: bool = False) -> Any:
            fn = jax.random.uniform if uniform else jax.random.normal
            return fn(next(keys), shape, jnp.float32)
        xp: Any = jnp
    else:  # host RNG seeded from `key`: one threefry program per shape compiles for seconds
        kd = key if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.key_data(key)
        rng = np.random.default_rng(np.asarray(kd, np.uint32).ravel().tolist())

        def draw(shape: tuple[int, ...], uniform: bool = False) -> Any:
            return rng.random(shape, np.float32) if uniform else rng.standard_normal(
                shape, np.float32)
        xp = np

    def normal(shape: tuple[int, ...], std: float) -> Array:
        return jnp.asarray(std * draw(shape), dtype)

    def zeros(*shape: int) -> Array:
        return jnp.zeros(shape, dtype)

    def a_param_init(shape: tuple[int, ...]) -> Array:
        # |a| uniform (by area) on the ring [0.9, 0.999], stored through softplus^-1.
        u = draw(shape, uniform=True)
        log_a = 0.5 * xp.log(u * (0.999**2 - 0.9**2) + 0.9**2 + 1e-8)
        return jnp.asarray(xp.log(xp.exp(-log_a) - 1.0), dtype)

    layers = []
    for kind in cfg.block_types:
        p: Params = {
            "temporal_norm": zeros(d), "channel_norm": zeros(d),
            "gate": normal((d, f), d**-0.5).T, "gate_b": zeros(f),  # drawn [D, F], kept [F, D]
            "up": normal((d, f), d**-0.5).T, "up_b": zeros(f),
            "down": normal((f, d), math.sqrt(final_var / f)).T, "down_b": zeros(d),
        }
        if kind == "recurrent":
            p.update({
                "linear_x": normal((d, lw), d**-0.5), "linear_x_b": zeros(lw),
                "linear_y": normal((d, lw), d**-0.5), "linear_y_b": zeros(lw),
                "linear_out": normal((lw, d), math.sqrt(final_var / lw)),
                "linear_out_b": zeros(d),
                "conv_w": normal((w, lw), math.sqrt(0.01 / w)), "conv_b": zeros(lw),
                "input_gate": normal((n, i_w, i_w), i_w**-0.5), "input_gate_b": zeros(n, i_w),
                "a_gate": normal((n, i_w, i_w), i_w**-0.5), "a_gate_b": zeros(n, i_w),
                "a_param": a_param_init((lw,)),
            })
        else:
            p.update({
                "q": normal((d, h, dh), d**-0.5), "k": normal((d, k, dh), d**-0.5),
                "v": normal((d, k, dh), d**-0.5),
                "o": normal((h, dh, d), math.sqrt(final_var / (h * dh))), "o_b": zeros(d),
            })
        layers.append(p)
    return {"embed": normal((cfg.vocab_size, d), d**-0.5), "final_norm": zeros(d),
            "layers": layers}


def param_shapes(cfg: GriffinConfig) -> Params:
    """The expected shape of every parameter (same tree as `init_params`), no allocation."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.float32))
    return jax.tree.map(lambda s: tuple(s.shape), tree)


def init_state(cfg: GriffinConfig, batch: int, max_len: int = 0,
               dtype: Any = jnp.float32) -> GriffinState:
    """An empty generation state; its size depends on the batch, never on `max_len`.

    Args:
      cfg: model config.
      batch: rows B.
      max_len: accepted for interface parity with the transformer; unused.
      dtype: dtype of the conv tail and of the attention ring (the RG-LRU state is float32).
    Returns:
      A tuple with one RecurrentState or AttentionState per block.
    """
    del max_len
    s, k, dh = cfg.attention_window, cfg.num_kv_heads, cfg.head_dim
    out = []
    for kind in cfg.block_types:
        if kind == "recurrent":
            out.append(RecurrentState(
                rg_lru=jnp.zeros((batch, cfg.lru_width), jnp.float32),
                conv=jnp.zeros((batch, cfg.conv1d_width - 1, cfg.lru_width), dtype)))
        else:
            out.append(AttentionState(
                k=jnp.zeros((batch, s, k, dh), dtype), v=jnp.zeros((batch, s, k, dh), dtype),
                pos=jnp.full((batch, s), -1, jnp.int32)))
    return tuple(out)


# ----------------------------------------------------------------------------- blocks


def _recurrent_block(p: Params, x: Array, pos: Array, st: RecurrentState | None,
                     reset: Array, n_valid: Array,
                     cfg: GriffinConfig) -> tuple[Array, RecurrentState | None]:
    """Griffin recurrent block on a compacted chunk (valid tokens first in each row).

    Args:
      x: [B, T, D] normalised input.
      pos: [B, T] positions, valid ones left-aligned.
      st: state before the chunk, or None (fresh sequence, no state returned).
      reset: [B] rows whose chunk starts a new sequence.
      n_valid: [B] valid tokens per row.
    Returns:
      [B, T, D] output and the new state.
    """
    b, t, _ = x.shape
    wc = cfg.conv1d_width
    y = gelu_tanh(dot("btd,dl->btl", x, p["linear_y"]) + p["linear_y_b"])  # [B, T, L]
    u = dot("btd,dl->btl", x, p["linear_x"]) + p["linear_x_b"]  # [B, T, L]
    if st is None:
        tail = jnp.zeros((b, wc - 1, u.shape[-1]), u.dtype)
        h0 = None
    else:
        tail = jnp.where(reset[:, None, None], 0, st.conv).astype(u.dtype)
        h0 = jnp.where(reset[:, None], 0.0, st.rg_lru)
    ext = jnp.concatenate([tail, u], axis=1)  # [B, W-1+T, L]
    conv = p["conv_b"].astype(u.dtype)
    for j in range(wc):  # conv_w[j] multiplies the input (W-1-j) steps back
        conv = conv + ext[:, j:j + t] * p["conv_w"][j].astype(u.dtype)
    h = rg_lru(p, conv, pos, h0, cfg)  # [B, T, L] float32
    r, h_last = h.astype(conv.dtype), h[:, -1]
    out = dot("btl,ld->btd", (r * y).astype(x.dtype), p["linear_out"]) + p["linear_out_b"]
    if st is None:
        return out, None
    # The last W-1 inputs of valid tokens: ext[n : n + W-1] (old tail if the row had none).
    new_tail = jax.vmap(lambda e, n: jax.lax.dynamic_slice_in_dim(e, n, wc - 1, axis=0))(
        ext, n_valid)
    return out, RecurrentState(rg_lru=h_last, conv=new_tail.astype(st.conv.dtype))


def _attention_block(p: Params, x: Array, pos: Array, st: AttentionState | None,
                     reset: Array, cfg: GriffinConfig) -> tuple[Array, AttentionState | None]:
    """Local multi-query attention over the ring (earlier tokens) plus the chunk.

    Queries are processed in blocks of Q = min(T, S) tokens; block j sees the S + Q keys
    ring ++ chunk[jQ - S : jQ + Q], which holds its whole window, so long chunks cost
    O(T * S), not O(T^2).

    Args:
      x: [B, T, D] normalised input; pos: [B, T] positions (valid ones left-aligned and
        consecutive); st: ring before the chunk or None; reset: [B] rows starting anew.
    Returns:
      [B, T, D] output and the new ring.
    """
    b, t, _ = x.shape
    s, h, k, dh = cfg.attention_window, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // k
    q_ = dot("btd,dhe->bthe", x, p["q"])  # [B, T, H, Dh]
    k_ = dot("btd,dke->btke", x, p["k"])  # [B, T, K, Dh]
    v_ = dot("btd,dke->btke", x, p["v"])
    q_ = rope(q_, pos, cfg.rope_base, rotary_dims=dh // 2)
    k_ = rope(k_, pos, cfg.rope_base, rotary_dims=dh // 2)

    if st is None:
        ring_k = jnp.zeros((b, s, k, dh), k_.dtype)
        ring_v = ring_k
        ring_pos = jnp.full((b, s), -1, jnp.int32)
    else:
        # Attend in the ring's dtype (float32 rings for bf16 models on CPU: no per-step cast).
        ring_k, ring_v = st.k, st.v
        q_, k_, v_ = (a.astype(st.k.dtype) for a in (q_, k_, v_))
        ring_pos = jnp.where(reset[:, None], -1, st.pos)

    qb = min(t, s)  # queries per block
    nb = -(-t // qb)  # blocks
    tp = nb * qb
    padt = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    all_k = jnp.concatenate([ring_k, jnp.pad(k_, padt)], axis=1)  # [B, S+Tp, K, Dh]
    all_v = jnp.concatenate([ring_v, jnp.pad(v_, padt)], axis=1)
    pos_p = jnp.pad(pos, ((0, 0), (0, tp - t)), constant_values=-1)  # [B, Tp]
    all_pos = jnp.concatenate([ring_pos, pos_p], axis=1)  # [B, S+Tp]
    if nb == 1:  # decode and short chunks: every query sees the whole ring + chunk
        kb, vb, kpos = all_k[:, None], all_v[:, None], all_pos[:, None]  # [B, 1, S+T, ...]
    else:
        idx = jnp.arange(nb)[:, None] * qb + jnp.arange(s + qb)[None, :]  # [nb, S+Q]
        kb, vb, kpos = all_k[:, idx], all_v[:, idx], all_pos[:, idx]  # [B, nb, S+Q, ...]
    qq = jnp.pad(q_, padt).reshape(b, nb, qb, k, g, dh)  # [B, nb, Q, K, G, Dh]
    qpos = pos_p.reshape(b, nb, qb)  # [B, nb, Q]

    logits = jnp.einsum("bjqkgd,bjskd->bjkgqs", qq, kb,
                        preferred_element_type=jnp.float32) * dh**-0.5
    dist = qpos[..., :, None] - kpos[..., None, :]  # [B, nb, Q, S+Q]
    mask = (kpos[..., None, :] >= 0) & (dist >= 0) & (dist < s)
    logits = jnp.where(mask[:, :, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(vb.dtype)
    enc = jnp.einsum("bjkgqs,bjskd->bjqkgd", probs, vb).reshape(b, tp, h * dh)[:, :t]
    o = p["o"].reshape(h * dh, -1)
    out = dot("btf,fd->btd", enc.astype(x.dtype), o) + p["o_b"]
    if st is None:
        return out, None

    # Write the last S valid tokens of each row into slots pos % S (others are dropped).
    slot = write_slots(pos, s, ring=True)  # [B, T]
    new = AttentionState(k=scatter_slots(st.k, slot, k_), v=scatter_slots(st.v, slot, v_),
                         pos=scatter_slots(ring_pos, slot, pos))
    return out, new


# ----------------------------------------------------------------------------- model


def forward(params: Params, tokens: Array, positions: Array, state: GriffinState | None,
            cfg: GriffinConfig, vocab_major: bool = False,
            head: tuple[Array, Array] | None = None) -> tuple[Array, GriffinState | None]:
    """Runs the model over a chunk of tokens, carrying the state.

    Args:
      params: parameter tree.
      tokens: [B, T] int32.
      positions: [B, T] int32, consecutive along a row, -1 for padding; a row holding
        position 0 starts a new sequence.
      state: state from `init_state` / a previous call, or None for a full causal forward
        without a cache.
      cfg: model config (static under jit).
      vocab_major: return decode logits as [V, B] (T must be 1; see `layers.unembed`).
      head: `layers.split_head(params["embed"])` for vocab-major logits, or None.
    Returns:
      logits [B, T, V] float32 (garbage at padding) and the new state (None if state is None).
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(f"griffin.forward: tokens {tokens.shape} and positions "
                         f"{positions.shape} must both be [batch, time]")
    if state is not None and len(state) != cfg.num_layers:
        raise ValueError(f"griffin.forward: state has {len(state)} blocks, the model "
                         f"{cfg.num_layers}; make it with griffin.init_state(cfg, ...)")
    b, t = tokens.shape
    positions = positions.astype(jnp.int32)
    valid = positions >= 0
    shift = None
    if t > 1:
        # Left-align each row's valid tokens (a roll), so padding only ever trails.
        shift = jnp.argmax(valid, axis=1).astype(jnp.int32)  # [B] leading padding
        gather = (jnp.arange(t)[None, :] + shift[:, None]) % t  # [B, T]
        tokens = jnp.take_along_axis(tokens, gather, axis=1)
        positions = jnp.take_along_axis(positions, gather, axis=1)
        valid = positions >= 0
    reset = jnp.any(positions == 0, axis=1)  # [B]
    n_valid = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]

    embed = params["embed"]
    x = embed[tokens] * jnp.asarray(embed_scale(cfg.d_model), embed.dtype)  # [B, T, D]
    new_state = []
    for i, (kind, p) in enumerate(zip(cfg.block_types, params["layers"])):
        st = None if state is None else state[i]
        hn = rms_norm(x, p["temporal_norm"], cfg.rms_eps)
        if kind == "recurrent":
            y, st = _recurrent_block(p, hn, positions, st, reset, n_valid, cfg)
        else:
            y, st = _attention_block(p, hn, positions, st, reset, cfg)
        x = x + y
        x = x + mlp(p, rms_norm(x, p["channel_norm"], cfg.rms_eps))
        new_state.append(st)
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    if shift is not None:  # undo the roll
        back = (jnp.arange(t)[None, :] - shift[:, None]) % t
        x = jnp.take_along_axis(x, back[..., None], axis=1)
    logits = unembed(x, embed, cfg.final_softcap, vocab_major, head)
    return logits, (None if state is None else tuple(new_state))


def state_bytes(cfg: GriffinConfig, batch: int, dtype: Any = jnp.float32) -> int:
    """Bytes of the generation state for `batch` rows (computed with eval_shape)."""
    shapes = jax.eval_shape(lambda: init_state(cfg, batch, 0, dtype))
    return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(shapes)))
