"""Sampling strategies: next-token logits -> token ids, one independent draw per row.

Legend: B = rows, V = vocabulary.

Each strategy is a small frozen dataclass with one method, `sample(logits, keys)`. They all reduce
to one kernel, `sample_rows`, whose parameters are per-row arrays: the engine keeps them on device
next to each batch slot, so rows with different settings share a batch and changing a setting
never recompiles anything.

Definitions (the order Hugging Face applies them):
  1. temperature t > 0 divides the logits (t == 0 means greedy: argmax of the raw logits);
  2. top-k keeps the k largest scaled logits (k <= 0 or k >= V: off);
  3. top-p keeps the smallest prefix of the remaining tokens, sorted by probability, whose
     probability mass reaches p (p >= 1: off); the most likely token is always kept.
Tokens tied with the last kept logit are kept too. A row's random key comes from
`row_keys(seed, row_id, step)`, never from its position in the batch, so a seeded row draws the
same tokens whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

Array = jax.Array


def row_keys(seed: Array, row_id: Array, step: Array) -> Array:
    """Per-row PRNG keys derived from (seed, row id, output step) only.

    Args:
      seed: uint32/int32 [B] per-row seeds.
      row_id: int32 [B] the row's own id (its index in the request, or a caller's id).
      step: int32 [B] index of the output token being drawn.
    Returns:
      uint32 [B, 2] raw PRNG keys.
    """

    def one(s: Array, r: Array, t: Array) -> Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), r), t)

    return jax.vmap(one)(seed.astype(jnp.uint32), row_id.astype(jnp.uint32),
                         step.astype(jnp.uint32))


def argmax(logits: Array, axis: int = -1, chunk: int = 512) -> Array:
    """First index of the maximum along `axis` (as jnp.argmax), int32 with `axis` removed.

    XLA's CPU argmax (a variadic (value, index) reduction) is ~40x slower on [16, 262144] than
    this: max per chunk of `chunk` entries, pick the first chunk holding the overall
    max, then argmax inside that chunk only. Small vocabularies use max + min-index. With
    `axis=0` it reads vocabulary-major logits [V, B] as they are, so the [V, B] product of a
    small decode batch never needs transposing for greedy rows.
    """
    a = axis % logits.ndim
    v = logits.shape[a]
    if v < 8 * chunk:
        top = jnp.max(logits, axis=a, keepdims=True)
        iota = jax.lax.broadcasted_iota(jnp.float32, logits.shape, a)  # exact < 2**24
        idx = jnp.min(jnp.where(logits == top, iota, float(v)), axis=a).astype(jnp.int32)
        return jnp.where(idx >= v, 0, idx)
    pad = (-v) % chunk
    x = logits
    if pad:
        widths = [(0, 0)] * logits.ndim
        widths[a] = (0, pad)
        x = jnp.pad(x, widths, constant_values=-jnp.inf)
    # [..., V, ...] -> [..., N, chunk, ...] (N = chunks, at `a`)
    x_nc = x.reshape(x.shape[:a] + ((v + pad) // chunk, chunk) + x.shape[a + 1:])
    best_chunk = jnp.argmax(jnp.max(x_nc, axis=a + 1), axis=a)  # `axis` removed
    rows = jnp.take_along_axis(x_nc, jnp.expand_dims(best_chunk, (a, a + 1)), axis=a)
    rows = jnp.squeeze(rows, axis=a)  # [..., chunk, ...]
    return (best_chunk * chunk + jnp.argmax(rows, axis=a)).astype(jnp.int32)


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf.

    Args:
      logits: float [B, V].
      temperature: float32 [B]; values <= 0 are treated as 1 here (greedy rows ignore this).
      top_k: int32 [B]; <= 0 means off.
      top_p: float32 [B]; >= 1 means off.
    Returns:
      float32 [B, V] filtered, scaled logits (at least one finite entry per row).
    """
    x_bv = logits.astype(jnp.float32)
    v = x_bv.shape[-1]
    t_b = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x_bv = x_bv / t_b[:, None]
    sorted_bv = -jnp.sort(-x_bv, axis=-1)  # descending
    k_b = jnp.where((top_k <= 0) | (top_k > v), v, top_k).astype(jnp.int32)
    rank_v = jnp.arange(v, dtype=jnp.int32)
    in_top_k_bv = rank_v[None, :] < k_b[:, None]
    # Top-p runs on the top-k distribution, renormalised.
    probs_bv = jax.nn.softmax(jnp.where(in_top_k_bv, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    p_b = top_p.astype(jnp.float32)
    keep_bv = in_top_k_bv & ((mass_before_bv < p_b[:, None]) | (p_b[:, None] >= 1.0))
    keep_bv = keep_bv.at[:, 0].set(True)
    n_keep_b = jnp.sum(keep_bv, axis=-1).astype(jnp.int32)  # keep_bv is a prefix
    threshold_b1 = jnp.take_along_axis(sorted_bv, (n_keep_b - 1)[:, None], axis=-1)
    return jnp.where(x_bv >= threshold_b1, x_bv, -jnp.inf)


def sample_rows(logits: Array, keys: Array, temperature: Array, top_k: Array,
                top_p: Array, vocab_major: bool = False) -> Array:
    """Draws one token per row with per-row settings.

    Args:
      logits: float [B, V] (or [V, B] with `vocab_major`).
      keys: uint32 [B, 2] per-row keys (see `row_keys`).
      temperature / top_k / top_p: per-row settings [B] (see `filter_logits`).
      vocab_major: logits are [V, B]; greedy rows read them as they are, and only a batch with
        sampling rows transposes them.
    Returns:
      int32 [B] token ids; rows with temperature <= 0 get the argmax of `logits`.
    """
    logits = logits.astype(jnp.float32)
    greedy_b = argmax(logits, axis=0 if vocab_major else -1)
    sampling_b = temperature > 0
    needs_filter_b = sampling_b & ((top_k > 0) | (top_p < 1.0))

    def rows_bv() -> Array:
        return logits.T if vocab_major else logits

    def draw(x_bv: Array) -> Array:  # Gumbel-max: argmax(x + Gumbel noise) ~ softmax(x)
        noise_bv = jax.vmap(lambda k: jax.random.gumbel(k, x_bv.shape[-1:], jnp.float32))(keys)
        return argmax(x_bv + noise_bv)

    def filtered() -> Array:
        return draw(filter_logits(rows_bv(), temperature, top_k, top_p))

    def scaled_only() -> Array:
        t_b = jnp.where(sampling_b, temperature, 1.0).astype(jnp.float32)
        return draw(rows_bv() / t_b[:, None])

    # The full-vocabulary sort only runs when some row asks for top-k / top-p, and nothing but
    # the argmax runs when every row is greedy.
    sampled_b = jax.lax.cond(
        jnp.any(sampling_b),
        lambda: jax.lax.cond(jnp.any(needs_filter_b), filtered, scaled_only),
        lambda: greedy_b,
    )
    return jnp.where(sampling_b, sampled_b, greedy_b)


def token_logprob(logits: Array, tok_b: Array, vocab_major: bool = False) -> Array:
    """float32 [B]: log softmax(logits) at each row's token tok_b [B] (the model's own
    probability of it: raw logits, before temperature, filters or a format's mask)."""
    x = logits.astype(jnp.float32)
    axis = 0 if vocab_major else -1
    lse_b = jax.nn.logsumexp(x, axis=axis)
    picked_b = (x[tok_b, jnp.arange(tok_b.shape[0])] if vocab_major
                else jnp.take_along_axis(x, tok_b[:, None], axis=-1)[:, 0])
    return picked_b - lse_b


def _rows(value: float | int, logits: Array, dtype) -> Array:
    return jnp.full((logits.shape[0],), value, dtype)


class _Drawn:
    """The `sample` of every drawing strategy: its one (temperature, top_k, top_p) setting for
    every row, through `sample_rows`."""

    def row_params(self) -> tuple[float, int, float]:
        raise NotImplementedError

    def sample(self, logits: Array, keys: Array) -> Array:
        """logits float [B, V], keys uint32 [B, 2] -> int32 [B]."""
        t, k, p = self.row_params()
        return sample_rows(logits, keys, _rows(t, logits, jnp.float32),
                           _rows(k, logits, jnp.int32), _rows(p, logits, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax of the logits."""

    def sample(self, logits: Array, keys: Array) -> Array:
        """logits float [B, V], keys uint32 [B, 2] (unused) -> int32 [B]."""
        del keys
        return argmax(logits)

    def row_params(self) -> tuple[float, int, float]:
        return 0.0, 0, 1.0


@dataclasses.dataclass(frozen=True)
class Temperature(_Drawn):
    """Draws from softmax(logits / temperature)."""

    temperature: float

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {self.temperature}; "
                             "use Greedy() (temperature 0) for argmax decoding")

    def row_params(self) -> tuple[float, int, float]:
        return float(self.temperature), 0, 1.0


@dataclasses.dataclass(frozen=True)
class TopK(_Drawn):
    """Draws among the k most likely tokens, after temperature scaling."""

    k: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.k}")
        Temperature(self.temperature)

    def row_params(self) -> tuple[float, int, float]:
        return float(self.temperature), int(self.k), 1.0


@dataclasses.dataclass(frozen=True)
class TopP(_Drawn):
    """Nucleus sampling: draws among the smallest set of likely tokens holding mass >= p."""

    p: float
    temperature: float = 1.0
    k: int = 0  # optional top-k applied before top-p (0: off)

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.p}")
        if self.k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0 for off), got {self.k}")
        Temperature(self.temperature)

    def row_params(self) -> tuple[float, int, float]:
        return float(self.temperature), int(self.k), float(self.p)


Strategy = Union[Greedy, Temperature, TopK, TopP]


def make_strategy(temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> Strategy:
    """Builds the strategy for `generate`-style arguments; raises ValueError on bad values."""
    if temperature is None or temperature == 0:
        if top_k not in (None, 0, 1) or top_p not in (None, 1.0):
            raise ValueError(
                f"top_k={top_k} / top_p={top_p} need temperature > 0 (temperature=0 is greedy); "
                "set a temperature or drop top_k/top_p")
        return Greedy()
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and top_p < 1.0:
        return TopP(float(top_p), float(temperature), int(top_k or 0))
    if top_k is not None and top_k != 0:
        return TopK(int(top_k), float(temperature))
    if top_p is not None:
        TopP(float(top_p), float(temperature))  # validates the range
    return Temperature(float(temperature))
