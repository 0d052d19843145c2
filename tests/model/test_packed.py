"""Packed prefill (model/packed.py): several prompts in one sequence give the logits and the
state of each prompt run alone, for Gemma 1/2/3 (rings included) and RecurrentGemma."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import griffin, packed, transformer
from model.config import GemmaConfig, get_preset

GEMMA1 = GemmaConfig(family="gemma", vocab_size=384, d_model=64, num_layers=3, num_heads=4,
                     num_kv_heads=1, head_dim=32, ffw_dim=128, layer_types=("global",) * 3,
                     query_pre_attn_scalar=32.0, max_seq_len=4096)
CONFIGS = {"gemma1": GEMMA1, "gemma2": get_preset("tiny-gemma2"),
           "gemma3": get_preset("tiny-gemma3"), "recurrentgemma": get_preset("tiny-recurrentgemma")}
L = 256  # cache length of the rows' state
TOL = 1e-5


def _setup(name):
    cfg = CONFIGS[name]
    fam = griffin if name == "recurrentgemma" else transformer
    params = fam.init_params(cfg, jax.random.PRNGKey(3), jnp.float32)
    return cfg, fam, params


_JIT: dict = {}


def _jit(fn, **static):
    key = (fn, tuple(sorted(static)))
    if key not in _JIT:
        _JIT[key] = jax.jit(fn, static_argnames=tuple(static))
    return functools.partial(_JIT[key], **static)


def _full(fam, params, cfg, seq, width=160):
    """Logits of one causal forward over seq alone, no cache: [T, V] (right padding to a fixed
    width cannot change a causal forward's logits, and keeps one compiled program)."""
    toks = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
    pos = jnp.arange(width, dtype=jnp.int32)[None]
    return np.asarray(_jit(fam.forward, cfg=cfg)(params, toks, pos, None)[0][0, :len(seq)])


def _prefill(fam, params, cfg, state, prefix, plen, segments, n, span):
    pk = packed.pack_arrays(segments, n, len(segments), state_rows(state))
    pk = packed.Pack(*(jnp.asarray(a) for a in pk))
    fn = _jit(fam.forward_packed, prefix_len=plen, span=span, cfg=cfg)
    return fn(params, pk, state, prefix)


def state_rows(state):
    return jax.tree_util.tree_leaves(state)[0].shape[0]


def _copy_prefix(state, prefix, rows):
    """Rows of `state` set to the 1-row prefix (its leading slots; the rest emptied)."""
    empty = jax.tree_util.tree_map(lambda x: x, state)

    def put(leaf, pre):
        fill = -1 if leaf.dtype == jnp.int32 else 0
        leaf = leaf.at[rows].set(fill)
        idx = (rows,) + tuple(slice(0, d) for d in pre.shape[1:])
        return leaf.at[idx].set(jnp.broadcast_to(pre, (len(rows),) + pre.shape[1:]))

    return jax.tree_util.tree_map(put, empty, prefix)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prefix_len,n,span", [(0, 224, 256), (11, 224, 128), (21, 256, 128)])
def test_packed_prefill_equals_one_prompt_at_a_time(name, prefix_len, n, span):
    cfg, fam, params = _setup(name)
    rng = np.random.default_rng(prefix_len + 1)
    prefix = [2] + rng.integers(4, 300, size=max(prefix_len - 1, 0)).tolist()
    prefix = prefix[:prefix_len]
    # Segments shorter and longer than the window (16): rings of the rows wrap inside a segment,
    # and with a prefix the segments start past the prefix's positions.
    lengths = [5, 40, 1, 17, 128, 9]
    segs = [rng.integers(4, 300, size=k).tolist() for k in lengths]
    if not prefix:
        segs = [[2] + s for s in segs]
    b = 8
    state = fam.init_state(cfg, b, L, jnp.float32)
    # The prefix itself, packed alone into a 1-row state from an empty prefix.
    pre_state = fam.init_state(cfg, 1, L, jnp.float32)
    if prefix:
        logits_p, pre_state = _prefill(fam, params, cfg, pre_state,
                                       fam.init_state(cfg, 1, L, jnp.float32), 0,
                                       [(0, 0, prefix)], 64, 64)
        np.testing.assert_allclose(logits_p[:len(prefix)], _full(fam, params, cfg, prefix),
                                   atol=TOL, rtol=TOL)
    rows = [6, 0, 3, 1, 7, 2]  # segment i goes to state row rows[i]
    state = _copy_prefix(state, pre_state, jnp.asarray(rows))
    # Span 256 >= n: one dense block; span 128: query blocks of 32 (n = 224) or 64 (n = 256), each
    # seeing the 128 packed tokens before it (the longest segment is 128: the window's edge).
    segments = [(r, len(prefix), s) for r, s in zip(rows, segs)]
    logits, state = _prefill(fam, params, cfg, state, pre_state, len(prefix), segments, n, span)
    i = 0
    for r, s in zip(rows, segs):
        want = _full(fam, params, cfg, prefix + s)
        got = np.asarray(logits[i:i + len(s)])
        np.testing.assert_allclose(got, want[len(prefix):], atol=TOL, rtol=TOL)
        i += len(s)
    # The state each row was left with continues it exactly: one decode step per row.
    nxt = rng.integers(4, 300, size=b).tolist()
    pos = np.full((b, 1), -1, np.int32)
    for r, s in zip(rows, segs):
        pos[r, 0] = len(prefix) + len(s)
    step, _ = _jit(fam.forward, cfg=cfg)(params, jnp.asarray(nxt, jnp.int32)[:, None],
                                         jnp.asarray(pos), state)
    for r, s in zip(rows, segs):
        want = _full(fam, params, cfg, prefix + s + [nxt[r]])[-1]
        np.testing.assert_allclose(np.asarray(step[r, 0]), want, atol=TOL, rtol=TOL)


def test_pack_arrays_layout():
    pk = packed.pack_arrays([(3, 10, [7, 8]), (1, 10, []), (0, 10, [5])], 8, 4, 9)
    assert pk.tokens.tolist() == [7, 8, 5, 0, 0, 0, 0, 0]
    assert pk.positions.tolist() == [10, 11, 10, -1, -1, -1, -1, -1]
    assert pk.row.tolist() == [3, 3, 0, 9, 9, 9, 9, 9]
    assert pk.offset.tolist()[:3] == [0, 1, 0] and pk.last.tolist()[:3] == [11, 11, 10]
    assert pk.row_end.tolist() == [1, -1, 2, -1]
    with pytest.raises(ValueError, match="cannot hold"):
        packed.pack_arrays([(0, 0, [1] * 9)], 8, 1, 9)
