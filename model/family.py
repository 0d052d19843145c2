"""The `Family` protocol every architecture module implements (model.transformer, model.griffin),
and `family_of(cfg)`, the one place that maps a config to its module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from model.config import GriffinConfig, ModelConfig

if TYPE_CHECKING:
    import jax

Params = Any  # the family's parameter tree (nested dicts / lists of arrays)
State = Any  # the family's generation state: a pytree whose leaves each have one batch axis


class Family(Protocol):
    """Pure functions over explicit parameter and state trees (the engine needs nothing else).

    Dimension letters: B batch, T chunk time, V vocabulary (see model/layers.py).
    """

    __name__: str
    # Logical axes (names in model/sharding.py's LOGICAL_AXIS_RULES) of each parameter and state
    # leaf, keyed by the leaf's name in the tree.
    PARAM_AXES: dict[str, tuple[str | None, ...]]
    STATE_AXES: dict[str, tuple[str | None, ...]]
    # The state's size does not depend on the sequence length (RecurrentGemma): a prompt of any
    # length can be fed through it in chunks.
    FIXED_STATE: bool

    def init_params(self, cfg: Any, key: jax.Array, dtype: Any = ...) -> Params:
        """Random parameters with the real tree and shapes."""

    def init_state(self, cfg: Any, batch: int, max_len: int, dtype: Any = ...) -> State:
        """An empty generation state for `batch` rows of up to `max_len` positions."""

    def forward(self, params: Params, tokens: jax.Array, positions: jax.Array,
                state: State | None, cfg: Any, vocab_major: bool = ...,
                head: Any = ...) -> tuple[jax.Array, State | None]:
        """tokens / positions int32 [B, T] (-1 = padding; position 0 starts a new sequence)
        -> (logits float32 [B, T, V], or [V, B] with `vocab_major` and T = 1, from `head`'s
        bf16 halves when given (`layers.split_head`); new state)."""

    # Optional (model.transformer has them): `greedy_next(params, tokens, positions, state, cfg,
    # head) -> (int32 [B] next tokens, new state)`, a decode step straight to the greedy tokens,
    # and `greedy_head(cfg, head, b) -> bool`, where it applies (see Engine.greedy_applies).

    def forward_packed(self, params: Params, pack: Any, state: State, prefix: State,
                       prefix_len: int, span: int, cfg: Any) -> tuple[jax.Array, State]:
        """Packed prefill (model/packed.py): N tokens of several rows, each segment continuing
        the 1-row `prefix`, written into rows `pack.row` of `state`
        -> (logits float32 [N, V], new state)."""


def family_of(cfg: ModelConfig) -> Family:
    """The module implementing `cfg`'s architecture (imported on first use)."""
    if isinstance(cfg, GriffinConfig):
        from model import griffin

        return griffin
    from model import transformer

    return transformer
