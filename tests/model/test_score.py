"""Token log-probabilities from the engine against one full causal forward (`Model.logits`):
the decode loop's per-token `logprobs`, and continuation scores (model/engine/score.py) with and
without end ids, for Gemma 1/2/3 and RecurrentGemma, prompts shorter and longer than the
sliding window."""

from __future__ import annotations

import numpy as np
import pytest

from model import load_model
from model.engine import choice_probs, continuation_logprobs, generate

FAMILIES = ["tiny-gemma3", "tiny-gemma2", "tiny-recurrentgemma"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_model(request.param)


@pytest.mark.parametrize("prompt_len", [12, 150])
def test_continuation_logprobs_match_full_forward(model, prompt_len):
    rng = np.random.default_rng(prompt_len)
    v = model.config.vocab_size
    prompt = [2] + [int(t) for t in rng.integers(3, v, prompt_len - 1)]
    conts = [[int(t) for t in rng.integers(3, v, n)] for n in (1, 4, 9)]
    ends = [1, 7]
    got = continuation_logprobs(model.engine, prompt, conts)
    got_end = continuation_logprobs(model.engine, prompt, conts, ends)
    for i, c in enumerate(conts):
        lsm = _log_softmax(model.logits(np.array([prompt + c]))[0])
        want = sum(lsm[len(prompt) - 1 + j, t] for j, t in enumerate(c))
        end = np.log(np.exp(lsm[-1, ends]).sum())
        assert got[i] == pytest.approx(want, abs=1e-4)
        assert got_end[i] == pytest.approx(want + end, abs=1e-4)


def test_decode_logprobs_match_full_forward(model):
    rng = np.random.default_rng(1)
    prompts = [[2] + [int(t) for t in rng.integers(3, model.config.vocab_size, n)]
               for n in (5, 40, 90)]
    gens = generate(model.engine, prompts, None, max_new_tokens=7, stop_token_ids=[],
                    logprobs=True, temperature=[0.0, 0.8, 0.0], seed=3)
    for p, g in zip(prompts, gens):
        assert len(g.logprobs) == len(g.tokens) == 7
        lsm = _log_softmax(model.logits(np.array([p + g.tokens]))[0])
        want = [lsm[len(p) - 1 + j, t] for j, t in enumerate(g.tokens)]
        np.testing.assert_allclose(g.logprobs, want, atol=1e-4)
    plain = generate(model.engine, prompts, None, max_new_tokens=7, stop_token_ids=[],
                     temperature=[0.0, 0.8, 0.0], seed=3)
    assert [g.tokens for g in plain] == [g.tokens for g in gens]  # asking changes nothing else
    assert all(g.logprobs is None for g in plain)


def test_choice_probs_normalise_and_use_end_ids_for_prefix_choices(model):
    prompt = [2, 11, 12, 13, 14]
    distinct = [[20], [21, 22], [23, 24, 25]]
    p = choice_probs(model.engine, prompt, distinct, [1])
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    lp = continuation_logprobs(model.engine, prompt, distinct)
    np.testing.assert_allclose(p, np.exp(lp) / np.exp(lp).sum(), rtol=1e-6)
    nested = [[20], [20, 22]]  # the first begins the second: scored with an end id after each
    q = choice_probs(model.engine, prompt, nested, [1])
    lp = continuation_logprobs(model.engine, prompt, nested, [1])
    np.testing.assert_allclose(q, np.exp(lp) / np.exp(lp).sum(), rtol=1e-6)
