"""The position-tagged KV cache: chunked prefill and step decode equal one full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.config import PRESETS

_fwd = jax.jit(transformer.forward, static_argnames="cfg")


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma2"])
@pytest.mark.parametrize("chunks", [[50], [1] * 50, [7, 20, 1, 1, 21], [17, 33]])
def test_chunked_forward_equals_full(name, chunks):
    cfg = PRESETS[name]
    params = transformer.init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    rng = np.random.RandomState(0)
    toks = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, sum(chunks))), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
    full, _ = _fwd(params, toks, pos, None, cfg=cfg)
    state = transformer.init_state(cfg, 2, 64, jnp.float32)
    outs, start = [], 0
    for c in chunks:
        lg, state = _fwd(params, toks[:, start:start + c], pos[:, start:start + c], state,
                         cfg=cfg)
        outs.append(lg)
        start += c
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5)
    assert sum(chunks) > 2 * cfg.sliding_window  # the local ring wrapped


def test_padding_is_ignored_and_position_zero_resets():
    cfg = PRESETS["tiny-gemma3"]
    params = transformer.init_params(cfg, jax.random.PRNGKey(2), jnp.float32)
    rng = np.random.RandomState(1)
    a = rng.randint(0, cfg.vocab_size, (1, 30)).astype(np.int32)
    b = rng.randint(0, cfg.vocab_size, (1, 20)).astype(np.int32)
    ref_b, _ = _fwd(params, jnp.asarray(b), jnp.arange(20)[None], None, cfg=cfg)
    state = transformer.init_state(cfg, 1, 48, jnp.float32)
    # Fill the row with sequence a, then start sequence b in the same slot, right-padded.
    _, state = _fwd(params, jnp.asarray(a), jnp.arange(30)[None], state, cfg=cfg)
    toks = np.concatenate([b, np.zeros((1, 12), np.int32)], axis=1)
    pos = np.concatenate([np.arange(20), -np.ones(12)])[None].astype(np.int32)
    lg, state = _fwd(params, jnp.asarray(toks), jnp.asarray(pos), state, cfg=cfg)
    np.testing.assert_allclose(np.asarray(lg[:, :20]), np.asarray(ref_b), atol=2e-5)
    assert int(state.pos_global.max()) == 19  # padding wrote nothing, sequence a is gone
