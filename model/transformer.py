"""Gemma 1 / 2 / 3 (text) decoder in plain JAX.

Implements the `Family` protocol (model/family.py), as `model.griffin` does:
  init_params(cfg, key, dtype) -> params
  init_state(cfg, batch, max_len, dtype) -> KVState
  forward(params, tokens, positions, state, cfg, vocab_major=False) -> (logits, new_state)

The KV cache is position-tagged: every slot remembers the position it holds (-1 = empty), so
one masking rule serves prefill, decode, ring buffers and slot reuse:
  a query at position p sees a key at position q  iff  0 <= q <= p  (and p - q < window on local
  layers). Global layers hold `max_len` slots (slot = position); local (sliding-window) layers hold
  a ring of `min(window, max_len)` slots (slot = position % window), so their memory does not grow
  with the sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from model import packed
from model.config import GemmaConfig
from model.kernels import decode_attention
from model.layers import (dot, gelu_tanh, rms_norm, rope, scatter_slots, softcap, unembed,
                          write_slots)
from model.quant import DecodeWeights, QWeight

Array = jax.Array
Params = dict[str, Any]

_NEG = -1e30  # mask value for attention scores (float32)
# Decode steps of up to this many rows read `DecodeWeights` (quantized) when given; more rows
# make the products compute-bound, where XLA's float32 GEMM is the faster one.
QUANT_MAX_ROWS = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVState:
    """Per-layer K/V caches and the positions their slots hold.

    k: per layer [B, S_l, K, Dh]; S_l = max_len on global layers, the ring size on local ones.
    v: per layer [B, K, Dh, S_l] (slots last: both attention products then read the caches in
      place; with [B, S, K, Dh] XLA's CPU dot copies V transposed every step, which made decode
      attention 3-5x slower).
    pos_global: [B, max_len] int32 position held by each global slot (-1 = empty).
    pos_local: [B, ring] int32 position held by each local ring slot (-1 = empty).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    pos_global: Array
    pos_local: Array


# Logical axes of every parameter and state leaf, by its name (model/sharding.py maps them onto
# the mesh with LOGICAL_AXIS_RULES).
FIXED_STATE = False  # see model/family.py
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),  # [V, D]
    "final_norm": ("embed",), "attn_norm": ("embed",), "ffw_norm": ("embed",),
    "post_attn_norm": ("embed",), "post_ffw_norm": ("embed",),
    "q": ("embed", "heads", "head_dim"),  # [D, H, Dh]
    "k": ("embed", "kv_heads", "head_dim"),  # [D, K, Dh]
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),  # [H, Dh, D]
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    # MLP weights [out, in], contracted on their last axis (as checkpoints store them): XLA's CPU
    # dots run decode's few-row products ~25% faster that way than on [in, out].
    "gate": ("mlp", "embed"), "up": ("mlp", "embed"),  # [F, D]
    "down": ("embed", "mlp"),  # [D, F]
}
STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("batch", "cache_len", "kv_heads", "head_dim"),  # [B, S, K, Dh]
    "v": ("batch", "kv_heads", "head_dim", "cache_len"),  # [B, K, Dh, S]
    "pos_global": ("batch", "cache_len"), "pos_local": ("batch", "cache_len"),
}


def _ring_size(cfg: GemmaConfig, max_len: int) -> int:
    return min(cfg.sliding_window or max_len, max_len)


def init_params(cfg: GemmaConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters with the real tree and shapes (for tests, benchmarks and tiny presets)."""
    d, h, k, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffw_dim
    keys = iter(jax.random.split(key, 4 + 16 * cfg.num_layers))

    def normal(shape, fan_in):
        return (jax.random.normal(next(keys), shape) / math.sqrt(fan_in)).astype(dtype)

    def norm(n):  # around 0 so that (1 + w) is near 1 but not exactly
        return (0.1 * jax.random.normal(next(keys), (n,))).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = {
            "attn_norm": norm(d),
            "q": normal((d, h, dh), d),
            "k": normal((d, k, dh), d),
            "v": normal((d, k, dh), d),
            "o": normal((h, dh, d), h * dh),
            "ffw_norm": norm(d),
            "gate": normal((d, f), d).T,  # [F, D]: drawn as [D, F] (same values as before)
            "up": normal((d, f), d).T,
            "down": normal((f, d), f).T,  # [D, F]
        }
        if cfg.qk_norm:
            layer["q_norm"], layer["k_norm"] = norm(dh), norm(dh)
        if cfg.post_norms:
            layer["post_attn_norm"], layer["post_ffw_norm"] = norm(d), norm(d)
        layers.append(layer)
    return {
        "embed": normal((cfg.vocab_size, d), d),
        "final_norm": norm(d),
        "layers": layers,
    }


def init_state(cfg: GemmaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVState:
    """Empty caches for `batch` rows of up to `max_len` positions."""
    ring = _ring_size(cfg, max_len)
    sizes = [ring if t == "local" else max_len for t in cfg.layer_types]
    k, dh = cfg.num_kv_heads, cfg.head_dim
    return KVState(
        k=tuple(jnp.zeros((batch, s, k, dh), dtype) for s in sizes),
        v=tuple(jnp.zeros((batch, k, dh, s), dtype) for s in sizes),
        pos_global=jnp.full((batch, max_len), -1, jnp.int32),
        pos_local=jnp.full((batch, ring), -1, jnp.int32),
    )


def _scatter_last(cache: Array, slots: Array, values: Array) -> Array:
    """cache[b, ..., slots[b, t]] = values[b, t] for a slots-last cache [B, K, Dh, S]."""
    b, t = slots.shape
    rows = jnp.broadcast_to(jnp.arange(b, dtype=slots.dtype)[:, None], (b, t))
    return _scatter_rows_last(cache, rows.reshape(-1), slots.reshape(-1),
                              values.reshape((b * t,) + values.shape[2:]))


def _mat(spec: str, x: Array, layer: Params, name: str, ql: dict[str, QWeight]) -> Array:
    """x times the layer's matrix `name` (einsum `spec` on the float32 weight), or through its
    quantized copy in `ql` when there is one (same product, same output shape)."""
    w = layer[name]
    qw = ql.get(name)
    if qw is None:
        return dot(spec, x, w)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    return qw.dot(x).astype(x.dtype).reshape(out_shape)


def _qkv(cfg: GemmaConfig, layer: Params, x: Array, positions: Array, local: bool,
         ql: dict[str, QWeight] | None = None) -> tuple[Array, Array, Array]:
    """Queries [B, T, H, Dh] (RoPE'd and scaled), keys [B, T, K, Dh] (RoPE'd) and values."""
    ql = ql or {}
    if "qkv" in ql:  # q, k and v stacked: one product
        b, t, _ = x.shape
        h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = jnp.split(ql["qkv"].dot(x).astype(x.dtype), [h * dh, (h + kh) * dh], axis=-1)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kh, dh), v.reshape(b, t, kh, dh)
    else:
        q = _mat("btd,dhk->bthk", x, layer, "q", ql)  # [B, T, H, Dh]
        k = _mat("btd,dnk->btnk", x, layer, "k", ql)  # [B, T, K, Dh]
        v = _mat("btd,dnk->btnk", x, layer, "v", ql)
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.rms_eps)
        k = rms_norm(k, layer["k_norm"], cfg.rms_eps)
    base = cfg.rope_base_local if local else cfg.rope_base_global
    scale = 1.0 if local else cfg.rope_scale_global
    q = rope(q, positions, base, scale)
    k = rope(k, positions, base, scale)
    return q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, q.dtype), k, v


def _residual(cfg: GemmaConfig, layer: Params, x: Array, h: Array,
              ql: dict[str, QWeight] | None = None) -> Array:
    """The rest of a decoder block after attention output h: (post-norm), residual, the MLP
    on the normalised sum, (post-norm), residual."""
    if cfg.post_norms:
        h = rms_norm(h, layer["post_attn_norm"], cfg.rms_eps)
    x = x + h
    h = _mlp(layer, rms_norm(x, layer["ffw_norm"], cfg.rms_eps), ql or {})
    if cfg.post_norms:
        h = rms_norm(h, layer["post_ffw_norm"], cfg.rms_eps)
    return x + h


def _attention(cfg: GemmaConfig, layer: Params, x: Array, positions: Array, local: bool,
               cache: tuple[Array, Array, Array] | None, write_at: Array | None,
               ql: dict[str, QWeight] | None = None, native: bool = False
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """Self-attention of one layer.

    Args:
      x: [B, T, D] normalised input.
      positions: [B, T] (-1 = padding).
      cache: (k [B,S,K,Dh], v [B,K,Dh,S], slot positions [B,S] after resets) or None.
      write_at: [B, T] slot per token for this layer's cache (S = drop).
      ql: this layer's quantized matrices (`DecodeWeights.layers[i]`), or None.
      native: a one-token step over float32 caches runs its attention core in the native
        kernel (`kernels.decode_attention`).
    Returns:
      ([B, T, D] output, (new k, new v) or None).
    """
    b, t, _ = x.shape
    ql = ql or {}
    q, k, v = _qkv(cfg, layer, x, positions, local, ql)

    v_t = jnp.transpose(v, (0, 2, 3, 1))  # [B, K, Dh, T]: the V cache layout
    new_kv = None
    if cache is None:
        keys, values, key_pos = k, v_t, positions
    else:
        ck, cv, cpos = cache
        ck, cv = scatter_slots(ck, write_at, k), _scatter_last(cv, write_at, v)
        new_kv = (ck, cv)
        if t == 1:
            # One token: writing first is safe (it only evicts a slot the query cannot see).
            keys, values, key_pos = ck, cv, scatter_slots(cpos, write_at, positions)
        else:
            # A chunk may overwrite ring slots its own early queries still need: attend to the
            # old cache plus the chunk itself.
            keys = jnp.concatenate([cache[0], k.astype(cache[0].dtype)], axis=1)
            values = jnp.concatenate([cache[1], v_t.astype(cache[1].dtype)], axis=3)
            key_pos = jnp.concatenate([cpos, positions], axis=1)

    if native and t == 1 and cache is not None and keys.dtype == jnp.float32:
        out = decode_attention(q[:, 0].astype(jnp.float32), keys, values, key_pos,
                               positions[:, 0], cfg.sliding_window if local else None,
                               cfg.attn_softcap)  # [B, H, Dh]
        out = out.reshape(b, 1, cfg.num_heads * cfg.head_dim).astype(x.dtype)
    else:
        out = _attention_core(cfg, q, keys, values, positions, key_pos, local)
        out = out.astype(x.dtype)
    if "o" in ql:  # [H*Dh -> D]
        return ql["o"].dot(out).astype(x.dtype), new_kv
    o = layer["o"].reshape(cfg.num_heads * cfg.head_dim, -1)  # one contracting axis: a plain GEMM
    return dot("btf,fd->btd", out, o), new_kv


def _attention_core(cfg: GemmaConfig, q: Array, keys: Array, values: Array, positions: Array,
                    key_pos: Array, local: bool) -> Array:
    """Queries q [B, T, H, Dh] against keys [B, S, K, Dh] and values [B, K, Dh, S] held at
    key_pos [B, S] -> [B, T, H*Dh]."""
    b, t = positions.shape
    kh, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    # Keys-major layouts: scores [B, K, S, G, T] and output [B, K, Dh, G, T] let XLA's CPU dots
    # read K [B, S, K, Dh] and V [B, K, Dh, S] as stored (no per-step copy of the caches).
    qg = q.reshape(b, t, kh, g, cfg.head_dim)  # [B, T, K, G, Dh]
    # The products run in the cache's dtype (float32 caches for bf16 models on CPU: no
    # per-step conversion of the whole cache).
    scores = jnp.einsum("btkgd,bskd->bksgt", qg.astype(keys.dtype), keys,
                        preferred_element_type=jnp.float32)  # [B, K, S, G, T]
    scores = softcap(scores, cfg.attn_softcap)
    qp, kp = positions[:, None, :], key_pos[:, :, None]  # [B, 1, T], [B, S, 1]
    mask = (kp >= 0) & (kp <= qp)  # [B, S, T]
    if local:
        mask &= qp - kp < cfg.sliding_window
    scores = jnp.where(mask[:, None, :, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=2).astype(values.dtype)
    out = dot("bksgt,bkds->bkdgt", probs, values)  # [B, K, Dh, G, T]
    out = jnp.transpose(out, (0, 4, 1, 3, 2))  # [B, T, K, G, Dh]
    return out.reshape(b, t, cfg.num_heads * cfg.head_dim)


def _mlp(layer: Params, x: Array, ql: dict[str, QWeight]) -> Array:
    if "gate_up" in ql:  # gate and up stacked: one product
        gate, up = jnp.split(ql["gate_up"].dot(x).astype(x.dtype), 2, axis=-1)  # [B, T, F] each
    else:
        gate, up = (_mat("btd,fd->btf", x, layer, n, ql) for n in ("gate", "up"))  # [B, T, F]
    return _mat("btf,df->btd", gelu_tanh(gate) * up, layer, "down", ql)


def forward(params: Params, tokens: Array, positions: Array, state: KVState | None,
            cfg: GemmaConfig, vocab_major: bool = False,
            head: tuple[Array, Array] | DecodeWeights | None = None
            ) -> tuple[Array, KVState | None]:
    """Runs the decoder over a chunk of tokens.

    Args:
      params: the parameter tree.
      tokens: [B, T] int32.
      positions: [B, T] int32, -1 for padding; a row containing position 0 starts a new sequence
        (its cached entries are dropped first).
      state: caches from `init_state`, or None for a full causal forward without cache.
      cfg: static config.
      vocab_major: return decode logits as [V, B] (T must be 1; see `layers.unembed`).
      head: `layers.split_head(params["embed"])` for vocab-major logits; or `DecodeWeights`,
        whose quantized matrices a step of one token for up to QUANT_MAX_ROWS rows reads; or None.
    Returns:
      (logits [B, T, V] float32, updated state or None).
    """
    quant = _step_weights(tokens, positions, head)
    x, new_state = _decoder(params, tokens, positions, state, cfg, quant)
    if quant is not None and quant.embed is not None:
        logits = quant.embed.dot(x[:, 0], vocab_major)  # [V, B] or [B, V]
        logits = softcap(logits if vocab_major else logits[:, None], cfg.final_softcap)
    else:
        logits = unembed(x, params["embed"], cfg.final_softcap, vocab_major,
                         None if isinstance(head, DecodeWeights) else head)
    return logits, new_state


def greedy_next(params: Params, tokens: Array, positions: Array, state: KVState,
                cfg: GemmaConfig, head: DecodeWeights) -> tuple[Array, KVState]:
    """One decode step (tokens / positions [B, 1]) straight to each row's greedy next token,
    int32 [B]: the first index of the maximum of the logits `forward(..., head=head)` gives,
    found by the head's `ArgmaxTiles` (`head.argmax`) without computing them all. Needs
    `greedy_head(cfg, head, B)`; rows at position -1 give 0."""
    quant = _step_weights(tokens, positions, head)
    x, new_state = _decoder(params, tokens, positions, state, cfg, quant)
    return head.argmax.next_token(quant.embed, x[:, 0]), new_state


def greedy_head(cfg: GemmaConfig, head: Any, b: int) -> bool:
    """Whether `greedy_next` can run B rows with `head` (once given its tiles, `with_argmax`):
    a quantized tied head that serves B rows, and no final soft-cap (its tanh can round
    distinct logits to a tie that the raw logits do not have)."""
    return (isinstance(head, DecodeWeights) and head.embed is not None
            and b <= QUANT_MAX_ROWS and cfg.final_softcap is None)


def _step_weights(tokens: Array, positions: Array, head: Any) -> DecodeWeights | None:
    """`head`'s quantized matrices for this call when it is a decode step they serve (one token
    for up to QUANT_MAX_ROWS rows), limited to the rows at a position (free slots: skipped)."""
    b, t = tokens.shape
    if not isinstance(head, DecodeWeights) or t != 1 or b > QUANT_MAX_ROWS:
        return None
    return head.for_rows(positions[:, 0] >= 0)


def _decoder(params: Params, tokens: Array, positions: Array, state: KVState | None,
             cfg: GemmaConfig, quant: DecodeWeights | None) -> tuple[Array, KVState | None]:
    """The layers and the final norm: (x [B, T, D], updated state or None)."""
    dtype = params["embed"].dtype
    x = params["embed"][tokens]  # [B, T, D]
    x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)

    new_k, new_v = [], []
    if state is not None:
        restart = jnp.any(positions == 0, axis=1, keepdims=True)  # [B, 1]
        pos_g = jnp.where(restart, -1, state.pos_global)
        pos_l = jnp.where(restart, -1, state.pos_local)
        slots_g = write_slots(positions, pos_g.shape[1], ring=False)
        slots_l = write_slots(positions, pos_l.shape[1], ring=True)

    for i, layer in enumerate(params["layers"]):
        local = cfg.layer_types[i] == "local"
        cache = slots = None
        if state is not None:
            cache = (state.k[i], state.v[i], pos_l if local else pos_g)
            slots = slots_l if local else slots_g
        h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
        ql = quant.layers[i] if quant is not None else None
        h, kv = _attention(cfg, layer, h, positions, local, cache, slots, ql,
                           quant is not None and quant.attention and cfg.head_dim % 8 == 0)
        x = _residual(cfg, layer, x, h, ql)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])

    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    if state is None:
        return x, None
    new_state = KVState(
        k=tuple(new_k), v=tuple(new_v),
        pos_global=scatter_slots(pos_g, slots_g, positions),
        pos_local=scatter_slots(pos_l, slots_l, positions),
    )
    return x, new_state


def _scatter_rows_last(cache: Array, rows: Array, slots: Array, values: Array) -> Array:
    """cache[rows[n], :, :, slots[n]] = values[n] for a slots-last cache [B, K, Dh, S]
    (values [N, K, Dh]; out-of-range rows or slots are dropped)."""
    idx = jnp.stack([rows, slots], axis=-1)  # [N, 2]: (row, slot)
    # A direct scatter on the slots-last layout: `cache.at[rows, :, :, slots]` would scatter into
    # a transposed view and copy the whole cache back every step.
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=(0, 3),
        scatter_dims_to_operand_dims=(0, 3))
    return jax.lax.scatter(cache, idx, values.astype(cache.dtype), dims,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
                           unique_indices=False, indices_are_sorted=False)


def forward_packed(params: Params, pack: packed.Pack, state: KVState, prefix: KVState,
                   prefix_len: int, span: int, cfg: GemmaConfig) -> tuple[Array, KVState]:
    """Prefills packed segments (model/packed.py) that all continue `prefix`.

    Args:
      pack: N tokens of several rows; each segment's positions continue the prefix.
      state: caches of B rows; each token's K/V is written into row `pack.row` (the rows were
        set to a copy of the prefix before, by the engine).
      prefix: a 1-row KVState holding the shared prefix (an empty state: no prefix).
      prefix_len: static bound on the prefix's length (which cache slots it can occupy).
      span: static bound on a segment's length in this pack.
    Returns:
      (logits [N, V] float32, garbage at padding; the updated state).
    """
    dtype = params["embed"].dtype
    pos = pack.positions
    x = params["embed"][pack.tokens][None] * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    kh, g, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    size_g, size_l = state.pos_global.shape[1], state.pos_local.shape[1]
    slot_g = write_slots(pack.positions, size_g, ring=False)
    slot_l = write_slots(pack.positions, size_l, ring=True, last=pack.last)
    new_k, new_v = list(state.k), list(state.v)
    for i, layer in enumerate(params["layers"]):
        local = cfg.layer_types[i] == "local"
        h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
        q, k, v = (a[0] for a in _qkv(cfg, layer, h, pos[None], local))  # [N, H|K, Dh]
        ppos = prefix.pos_local[0] if local else prefix.pos_global[0]
        c = packed.ctx_slots(ppos.shape[0], prefix_len)
        ctx_k = prefix.k[i][0, :c]  # [C, K, Dh]
        ctx_v = jnp.transpose(prefix.v[i][0, :, :, :c], (2, 0, 1))
        out = packed.attention(q.reshape(-1, kh, g, dh), k, v, pack, ctx_k, ctx_v, ppos[:c],
                               span, cfg.sliding_window if local else None, cfg.attn_softcap)
        out = out.reshape(1, -1, cfg.num_heads * dh).astype(x.dtype)
        o = layer["o"].reshape(cfg.num_heads * dh, -1)
        x = _residual(cfg, layer, x, dot("btf,fd->btd", out, o))
        slot = slot_l if local else slot_g
        new_k[i] = new_k[i].at[pack.row, slot].set(k.astype(new_k[i].dtype), mode="drop")
        new_v[i] = _scatter_rows_last(new_v[i], pack.row, slot, v)
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    logits = unembed(x, params["embed"], cfg.final_softcap)[0]
    new_state = KVState(
        k=tuple(new_k), v=tuple(new_v),
        pos_global=state.pos_global.at[pack.row, slot_g].set(pos, mode="drop"),
        pos_local=state.pos_local.at[pack.row, slot_l].set(pos, mode="drop"))
    return logits, new_state
