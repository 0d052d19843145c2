"""RecurrentGemma (model/griffin.py) against transformers, and its fixed-size state semantics.

A tiny random `RecurrentGemmaForCausalLM` (weights perturbed so no norm is 1 and no bias 0;
attention window 16 < 64 tokens; batch 2) is saved with safetensors and read by our loader.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model import griffin
from model.checkpoints import hf_griffin
from model.config import PRESETS, PUBLISHED_SIZES, GriffinConfig

WINDOW = 16
T = 64
_fwd = jax.jit(griffin.forward, static_argnames="cfg")


def tiny_hf_model(seed: int = 0, window: int = WINDOW):
    """A tiny transformers RecurrentGemma with every weight perturbed."""
    torch.manual_seed(seed)
    hc = transformers.RecurrentGemmaConfig(
        vocab_size=384, hidden_size=48, intermediate_size=192, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, lru_width=48,
        attention_window_size=window, conv1d_width=4, logits_soft_cap=30.0,
        attn_implementation="eager")
    m = transformers.RecurrentGemmaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p) + 0.02)
    m.generation_config.eos_token_id = None  # greedy runs the full length
    return m


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(HF model, our cfg, our params, tokens [2, T], HF logits [2, T, V])."""
    m = tiny_hf_model()
    d = tmp_path_factory.mktemp("hf_rg")
    m.save_pretrained(d, safe_serialization=True)
    cfg = GriffinConfig.from_hf(json.loads((d / "config.json").read_text()))
    params = hf_griffin.load_params(d, cfg, jnp.float32)
    toks = np.random.RandomState(0).randint(3, 384, size=(2, T)).astype(np.int32)
    with torch.no_grad():
        logits = m(torch.tensor(toks, dtype=torch.long), use_cache=False).logits.numpy()
    return m, cfg, params, toks, logits


def _pos(b: int, start: int, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (b, n))


def _run_chunks(params, cfg, toks, chunks, state=None, start=0):
    """Feeds toks in chunks, carrying the state; returns (logits [B, sum, V], state)."""
    state = griffin.init_state(cfg, toks.shape[0], 0) if state is None else state
    outs, i = [], 0
    for c in chunks:
        lg, state = _fwd(params, jnp.asarray(toks[:, i:i + c]), _pos(toks.shape[0], start + i, c),
                         state, cfg=cfg)
        outs.append(np.asarray(lg))
        i += c
    return np.concatenate(outs, axis=1), state


def test_config_from_hf(ref):
    _, cfg, _, _, _ = ref
    assert (cfg.d_model, cfg.num_layers, cfg.lru_width, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.ffw_dim, cfg.attention_window, cfg.conv1d_width) == (
        48, 6, 48, 4, 1, 12, 96, WINDOW, 4)
    assert cfg.block_types == ("recurrent", "recurrent", "attention") * 2
    assert griffin.embed_scale(48) != 48**0.5  # the bf16-rounded sqrt(D) is exercised


def test_logits_match_transformers(ref):
    _, cfg, params, toks, want = ref
    full, none = _fwd(params, jnp.asarray(toks), _pos(2, 0, T), None, cfg=cfg)
    assert none is None
    assert np.abs(np.asarray(full) - want).max() <= 1e-4
    assert np.abs(want).max() > 3.0  # logits are not trivially small
    prefill, state = _fwd(params, jnp.asarray(toks), _pos(2, 0, T), griffin.init_state(cfg, 2),
                          cfg=cfg)
    assert np.abs(np.asarray(prefill) - want).max() <= 1e-4


def test_greedy_continuation_matches_transformers(ref):
    m, cfg, params, toks, _ = ref
    prompt, n_new = toks[:, :20], 32
    with torch.no_grad():
        want = m.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=n_new,
                          do_sample=False).numpy()[:, prompt.shape[1]:]
    lg, state = _fwd(params, jnp.asarray(prompt), _pos(2, 0, 20), griffin.init_state(cfg, 2),
                     cfg=cfg)
    cur = jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)
    got = [cur]
    for i in range(n_new - 1):
        lg, state = _fwd(params, cur[:, None], _pos(2, 20 + i, 1), state, cfg=cfg)
        cur = jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)
        got.append(cur)
    got = np.stack([np.asarray(g) for g in got], axis=1)
    np.testing.assert_array_equal(got, want)
    assert len(set(got[0].tolist())) > 5  # a real continuation, not one repeated token
    assert 20 + n_new > 2 * WINDOW  # decoded well past the window


def test_token_by_token_decode_equals_full_forward(ref):
    _, cfg, params, toks, want = ref
    got, _ = _run_chunks(params, cfg, toks, [1] * T)
    assert np.abs(got - want).max() <= 1e-4


def test_uneven_chunks_equal_full_forward(ref):
    _, cfg, params, toks, want = ref
    chunks = [7, 1, 20, 36]  # 36 > 2 * window: blocked attention over the ring + chunk
    got, state = _run_chunks(params, cfg, toks, chunks)
    assert np.abs(got - want).max() <= 1e-4
    ring = next(s for s in state if isinstance(s, griffin.AttentionState))
    assert sorted(np.asarray(ring.pos[0]).tolist()) == list(range(T - WINDOW, T))


def test_padding_is_ignored(ref):
    """Left/right padding inside a chunk changes neither outputs nor the state."""
    _, cfg, params, toks, want = ref
    _, state = _run_chunks(params, cfg, toks, [20])
    # Row 0: 4 padding tokens then positions 20..27; row 1: positions 20..29 then 2 padding.
    tk = np.zeros((2, 12), np.int32)
    pos = -np.ones((2, 12), np.int32)
    tk[0, 4:], pos[0, 4:] = toks[0, 20:28], np.arange(20, 28)
    tk[1, :10], pos[1, :10] = toks[1, 20:30], np.arange(20, 30)
    lg, state = _fwd(params, jnp.asarray(tk), jnp.asarray(pos), state, cfg=cfg)
    lg = np.asarray(lg)
    assert np.abs(lg[0, 4:] - want[0, 20:28]).max() <= 1e-4
    assert np.abs(lg[1, :10] - want[1, 20:30]).max() <= 1e-4
    # One more decode step per row (positions 28 and 30) proves the state was right.
    lg, state = _fwd(params, jnp.asarray([[toks[0, 28]], [toks[1, 30]]], jnp.int32),
                     jnp.asarray([[28], [30]], jnp.int32), state, cfg=cfg)
    assert np.abs(np.asarray(lg)[0, 0] - want[0, 28]).max() <= 1e-4
    assert np.abs(np.asarray(lg)[1, 0] - want[1, 30]).max() <= 1e-4
    # A row that is all padding leaves its state bit-for-bit untouched.
    before = jax.tree.map(np.asarray, state)
    _, after = _fwd(params, jnp.asarray([[5], [7]], jnp.int32),
                    jnp.asarray([[29], [-1]], jnp.int32), state, cfg=cfg)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a)[1], b[1])
    assert not np.array_equal(np.asarray(after[0].rg_lru[0]), before[0].rg_lru[0])


def test_position_zero_resets_a_row(ref):
    _, cfg, params, toks, want = ref
    _, state = _run_chunks(params, cfg, toks[:, ::-1].copy(), [30])  # fill with other text
    # Row 0 starts toks[0] anew at position 0; row 1 carries on its own (reversed) sequence.
    tk = np.stack([toks[0, :12], toks[1, ::-1][30:42]])
    pos = np.stack([np.arange(12), np.arange(30, 42)]).astype(np.int32)
    lg, state = _fwd(params, jnp.asarray(tk), jnp.asarray(pos), state, cfg=cfg)
    assert np.abs(np.asarray(lg)[0] - want[0, :12]).max() <= 1e-4
    rev, _ = _fwd(params, jnp.asarray(toks[:, ::-1].copy()), _pos(2, 0, T), None, cfg=cfg)
    assert np.abs(np.asarray(lg)[1] - np.asarray(rev)[1, 30:42]).max() <= 1e-4
    ring = next(s for s in state if isinstance(s, griffin.AttentionState))
    assert int(np.asarray(ring.pos[0]).max()) == 11  # the old sequence is gone from the ring
    # Decode continues row 0 from the new sequence.
    rest, _ = _run_chunks(params, cfg, toks[:, 12:T], [1] * 4, state=state, start=12)
    assert np.abs(rest[0] - want[0, 12:16]).max() <= 1e-4


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_state_after_real_tokens_does_not_grow(ref):
    """The state carried out of 2x and 16x the window of real tokens: same shapes and bytes."""
    _, cfg, params, _, _ = ref
    toks = np.random.RandomState(5).randint(3, 384, size=(2, 16 * WINDOW)).astype(np.int32)
    _, short = _run_chunks(params, cfg, toks[:, :2 * WINDOW], [2 * WINDOW])
    _, long = _run_chunks(params, cfg, toks, [2 * WINDOW] * 8)
    assert jax.tree.map(np.shape, short) == jax.tree.map(np.shape, long)
    assert _tree_bytes(short) == _tree_bytes(long) == griffin.state_bytes(cfg, 2)
    ring = next(s for s in long if isinstance(s, griffin.AttentionState))
    assert int(np.asarray(ring.pos).max()) == 16 * WINDOW - 1  # the long run really went far


def test_preset_state_after_1k_and_32k_tokens_is_the_same_size():
    """recurrentgemma-2b's state out of a forward over 1,024 and 32,768 tokens (eval_shape:
    traced, nothing allocated)."""
    cfg = PRESETS["recurrentgemma-2b"]
    params = jax.eval_shape(lambda: griffin.init_params(cfg, jax.random.PRNGKey(0),
                                                        jnp.bfloat16))

    def state_after(n: int):
        def run(p):
            tokens, pos = jnp.zeros((4, n), jnp.int32), _pos(4, 0, n)
            return griffin.forward(p, tokens, pos, griffin.init_state(cfg, 4, n, jnp.bfloat16),
                                   cfg)[1]
        return jax.eval_shape(run, params)

    short, long = state_after(1024), state_after(32_768)
    assert jax.tree.map(lambda s: s.shape, short) == jax.tree.map(lambda s: s.shape, long)
    assert _tree_bytes(short) == _tree_bytes(long) == griffin.state_bytes(cfg, 4, jnp.bfloat16)
    assert _tree_bytes(long) < 100 * 2**20


@pytest.mark.parametrize("name", ["recurrentgemma-2b", "recurrentgemma-9b"])
def test_preset_parameter_counts(name):
    cfg = PRESETS[name]
    shapes = griffin.param_shapes(cfg)  # eval_shape: nothing is allocated
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert n == cfg.num_params()
    assert abs(n / PUBLISHED_SIZES[name] - 1) < 0.005, f"{name}: {n:,}"


def test_tiny_preset_runs_with_random_weights():
    cfg = PRESETS["tiny-recurrentgemma"]
    params = griffin.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    lg, _ = _fwd(params, jnp.ones((1, 8), jnp.int32), _pos(1, 0, 8), None, cfg=cfg)
    assert lg.shape == (1, 8, cfg.vocab_size) and bool(jnp.isfinite(lg).all())
    assert float(lg.std()) > 1e-3
