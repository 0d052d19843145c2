"""Sampling strategies against their definitions, with a numpy reference on fixed logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.engine import sampling


def ref_probs(logits: np.ndarray, temperature: float, top_k: int = 0,
              top_p: float = 1.0) -> np.ndarray:
    """Reference: softmax(logits / t), keep the top k, renormalise, keep the top-p nucleus."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, bool)
    k = len(x) if top_k <= 0 else min(top_k, len(x))
    keep[order[:k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if top_p < 1.0:
        mass = 0.0
        nucleus = np.zeros(x.shape, bool)
        for i in order[:k]:
            nucleus[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = p * nucleus
        p /= p.sum()
    return p


# Distinct values, a few near the top, so top-k / top-p cut in the middle of the vocabulary.
LOGITS = np.array([2.0, -1.0, 0.5, 3.1, 1.2, -0.3, 2.9, 0.0, -2.5, 1.9, 0.7, -0.8], np.float32)


def _jax_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    one = lambda v, dt: jnp.full((1,), v, dt)  # noqa: E731
    x = sampling.filter_logits(jnp.asarray(logits)[None], one(t, jnp.float32),
                               one(k, jnp.int32), one(p, jnp.float32))
    return np.asarray(jax.nn.softmax(x, axis=-1))[0]


@pytest.mark.parametrize("t,k,p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (2.5, 0, 1.0),  # temperature only
    (1.0, 3, 1.0), (0.5, 1, 1.0), (1.0, 100, 1.0),  # top-k
    (1.0, 0, 0.5), (1.0, 0, 0.9), (0.6, 0, 0.75), (1.0, 0, 0.01),  # top-p
    (1.3, 5, 0.8), (0.8, 4, 0.99),  # top-k then top-p
])
def test_filtered_distribution_matches_numpy_reference(t, k, p):
    np.testing.assert_allclose(_jax_probs(LOGITS, t, k, p), ref_probs(LOGITS, t, k, p),
                               atol=1e-6)


def test_top_p_keeps_the_token_that_crosses_p():
    # probs 0.5, 0.3, 0.2: p=0.6 needs the first two; p=0.5 only the first.
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    assert (_jax_probs(logits, 1.0, 0, 0.6) > 0).tolist() == [True, True, False]
    assert (_jax_probs(logits, 1.0, 0, 0.5) > 0).tolist() == [True, False, False]


def test_sample_frequencies_follow_the_filtered_distribution():
    n = 20_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    keys = sampling.row_keys(jnp.zeros((n,), jnp.uint32), jnp.arange(n), jnp.zeros((n,)))
    t, k, p = 0.9, 6, 0.85
    tokens = sampling.TopP(p, t, k).sample(logits, keys)
    freq = np.bincount(np.asarray(tokens), minlength=LOGITS.size) / n
    expected = ref_probs(LOGITS, t, k, p)
    assert np.all(freq[expected == 0] == 0), "drew a token outside top-k / top-p"
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_k_1_equals_greedy_and_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 300)).astype(np.float32))
    keys = sampling.row_keys(jnp.full((64,), 3, jnp.uint32), jnp.arange(64), jnp.zeros((64,)))
    greedy = np.asarray(sampling.Greedy().sample(logits, keys))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(np.asarray(sampling.TopK(1, 1.5).sample(logits, keys)), greedy)
    # ...and temperature sampling does differ from greedy somewhere (the test can fail).
    assert (np.asarray(sampling.Temperature(1.0).sample(logits, keys)) != greedy).any()


def _argmax_cases(v: int, rows: int = 6) -> np.ndarray:
    """Random logits [rows, v] with ties, a maximum in the last chunk and an all-equal row."""
    x = np.random.default_rng(v).normal(size=(rows, v)).astype(np.float32)
    x[1, [7, v - 3]] = 50.0  # ties: the first index wins
    x[2, v - 1] = 60.0  # in the padded last chunk
    x[3, :] = -1.0  # all equal
    return x


@pytest.mark.parametrize("v", [300, 4096, 5000])
def test_argmax_is_the_first_index_of_the_max(v):
    x = _argmax_cases(v)
    np.testing.assert_array_equal(np.asarray(sampling.argmax(jnp.asarray(x))),
                                  np.argmax(x, axis=-1))


@pytest.mark.parametrize("v", [50, 4096, 5000 + 7, 262144])
def test_vocab_major_argmax_and_sampling_match_row_major(v):
    x = _argmax_cases(v)
    np.testing.assert_array_equal(
        np.asarray(sampling.argmax(jnp.asarray(x.T), axis=0)), np.argmax(x, axis=-1))
    # Mixed greedy / sampled rows: [V, B] input gives exactly the [B, V] draws.
    keys = sampling.row_keys(jnp.arange(6, dtype=jnp.uint32), jnp.arange(6), jnp.zeros((6,)))
    temp = jnp.asarray([0.0, 1.0, 0.7, 1.0, 0.0, 1.3])
    top_k = jnp.asarray([0, 0, 5, 0, 3, 0])
    top_p = jnp.asarray([1.0, 1.0, 1.0, 0.9, 1.0, 1.0])
    row_major = sampling.sample_rows(jnp.asarray(x), keys, temp, top_k, top_p)
    vocab_major = sampling.sample_rows(jnp.asarray(x.T), keys, temp, top_k, top_p,
                                       vocab_major=True)
    np.testing.assert_array_equal(np.asarray(vocab_major), np.asarray(row_major))


def test_mixed_rows_use_their_own_settings():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(6, 50)).astype(np.float32))
    keys = sampling.row_keys(jnp.arange(6, dtype=jnp.uint32), jnp.arange(6), jnp.zeros((6,)))
    temp = jnp.asarray([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    top_k = jnp.asarray([0, 1, 0, 0, 5, 0])
    top_p = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 1e-6])
    out = np.asarray(sampling.sample_rows(logits, keys, temp, top_k, top_p))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    # greedy rows (0, 2, 4: top_k ignored at t=0), top-k 1 (row 1), tiny top-p (row 5)
    np.testing.assert_array_equal(out[[0, 1, 2, 4, 5]], argmax[[0, 1, 2, 4, 5]])


def test_row_keys_depend_on_seed_row_and_step_not_batch_position():
    seeds = jnp.asarray([5, 5, 6], jnp.uint32)
    ids = jnp.asarray([10, 11, 10])
    steps = jnp.asarray([0, 0, 0])
    a = np.asarray(sampling.row_keys(seeds, ids, steps))
    b = np.asarray(sampling.row_keys(seeds[::-1], ids[::-1], steps[::-1]))[::-1]
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in a}) == 3
    c = np.asarray(sampling.row_keys(seeds, ids, steps + 1))
    assert not (a == c).all(axis=1).any()


def test_make_strategy_and_bad_values():
    assert sampling.make_strategy(0.0) == sampling.Greedy()
    assert sampling.make_strategy(0.0, top_k=1) == sampling.Greedy()
    assert sampling.make_strategy(0.7) == sampling.Temperature(0.7)
    assert sampling.make_strategy(0.7, top_k=40) == sampling.TopK(40, 0.7)
    assert sampling.make_strategy(0.7, top_k=40, top_p=0.9) == sampling.TopP(0.9, 0.7, 40)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling.make_strategy(-1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sampling.make_strategy(1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        sampling.TopK(0)
    with pytest.raises(ValueError, match="need temperature > 0"):
        sampling.make_strategy(0.0, top_p=0.5)
