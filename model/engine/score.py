"""Scoring continuations: how likely the model finds each of a few short continuations of one
prompt (a classification job's choices), from its logits rather than by sampling.

The prompt (all but its last token) is prefilled once into a 1-row state (from a cached shared
prefix when the engine holds one: prefill.py), copied into C rows, and each row is fed the
prompt's last token followed by one continuation; the log-softmax of the logits at each position
gives the continuation's log-probability token by token.

Legend: C = continuations, K = tokens fed per row (the last prompt token + the longest
continuation, rounded up to 8), L = cache length, S = end ids.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import sharding
from model.engine.prefill import ROW_PAD_SETTINGS, Row, assign_prefixes, prefill_rows
from model.engine.programs import Engine
from model.engine.rows import take_rows
from model.family import State

Array = jax.Array


def score_program(engine: Engine, length: int) -> Any:
    """(params, state [1 row, cache L], tokens [C, K], positions [C, K], targets [C, K],
    end_c [C], end_ids [S]) -> float32 [C]: per row, the sum over positions with a target >= 0
    of log softmax(logits)[target], plus, where end_c >= 0, the log of the total probability of
    the end ids at position end_c."""
    family, cfg, axes = engine.family, engine.cfg, engine.axes(length)

    def score(params: Any, state: State, tokens_ck: Array, positions_ck: Array,
              targets_ck: Array, end_c: Array, end_ids_s: Array) -> Array:
        c = tokens_ck.shape[0]
        rows = take_rows(state, axes, jnp.zeros((c,), jnp.int32))
        logits, _ = family.forward(params, tokens_ck, positions_ck, rows, cfg)
        lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [C, K, V]
        picked = jnp.take_along_axis(lsm, jnp.maximum(targets_ck, 0)[..., None], -1)[..., 0]
        total_c = jnp.sum(jnp.where(targets_ck >= 0, picked, 0.0), axis=-1)
        at_end = lsm[jnp.arange(c), jnp.maximum(end_c, 0)]  # [C, V]
        end_lp_c = jax.nn.logsumexp(at_end[:, end_ids_s], axis=-1)
        return total_c + jnp.where(end_c >= 0, end_lp_c, 0.0)

    return score


def continuation_logprobs(engine: Engine, prompt: Sequence[int],
                          continuations: Sequence[Sequence[int]],
                          end_ids: Sequence[int] = ()) -> np.ndarray:
    """float64 [C]: log P(continuation | prompt) per continuation (token ids, the prompt with
    BOS), each followed by one of `end_ids` when those are given (the log of their total
    probability is added)."""
    prompt = [int(t) for t in prompt]
    conts = [[int(t) for t in c] for c in continuations]
    if len(prompt) < 1 or not conts or any(not c for c in conts):
        raise ValueError("scoring needs a non-empty prompt and non-empty continuations")
    bk = engine.buckets
    k = -(-(1 + max(len(c) for c in conts)) // 8) * 8
    length = bk.length_bucket(len(prompt) + k)
    if len(prompt) + k > engine.cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens and continuations of up to {k - 1} "
                         f"exceed the model's {engine.cfg.max_seq_len}-token context")
    state = engine.init_state(1, length)
    if len(prompt) > 1:
        row = Row(-1, prompt, ROW_PAD_SETTINGS)
        assign_prefixes([row], list(engine.prefixes))  # start from a cached frame, if any
        slots = engine.empty_slots(1, bk.out_bucket(1, length))
        state, _ = prefill_rows(engine, state, slots, [(0, row)], length, count=False)
    n, start = len(conts), len(prompt) - 1
    tokens = np.zeros((n, k), np.int32)
    positions = np.full((n, k), -1, np.int32)
    targets = np.full((n, k), -1, np.int32)
    end = np.full((n,), -1 if not end_ids else 0, np.int32)
    for i, c in enumerate(conts):
        fed = [prompt[-1]] + c
        tokens[i, :len(fed)] = fed
        positions[i, :len(fed)] = np.arange(start, start + len(fed))
        targets[i, :len(c)] = c
        if end_ids:
            end[i] = len(c)
    ends = np.asarray(sorted({int(e) for e in end_ids}) or [0], np.int32)
    args = (engine.params, state, *(engine._put(a) for a in (tokens, positions, targets, end,
                                                            ends)))

    def shardings() -> tuple[Any, Any]:
        rep = sharding.replicated(engine.mesh)
        return (engine._param_sh, engine.state_shardings(1, length), rep, rep, rep, rep,
                rep), rep

    key = ("score", length, n, k, len(ends))
    fn = engine.compile_log.get(
        key, "score", f"C={n} K={k} L={length}",
        lambda: engine._compile(key, score_program(engine, length), (), args, shardings))
    return np.asarray(jax.device_get(fn(*args)), np.float64)


def choice_probs(engine: Engine, prompt: Sequence[int], choices: Sequence[Sequence[int]],
                 end_ids: Sequence[int]) -> np.ndarray:
    """float64 [C], summing to 1: each choice's probability as the prompt's continuation,
    normalised over the choices. Where one choice's tokens begin another's, every choice is
    scored followed by an end id (else the shorter would hold the longer's probability)."""
    overlap = any(i != j and len(a) <= len(b) and list(b[:len(a)]) == list(a)
                  for i, a in enumerate(choices) for j, b in enumerate(choices))
    lp = continuation_logprobs(engine, prompt, choices, end_ids if overlap else ())
    lp = lp - lp.max()
    p = np.exp(lp)
    return p / p.sum()
