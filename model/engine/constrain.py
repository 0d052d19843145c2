"""Output formats as token automata: a regex, a JSON Schema or a list of choices, compiled once per
job into tables the decode loop can read on device.

outlines-core turns a JSON Schema into a regex and a regex into a token-level index over the
model's vocabulary (state -> {token: next state}). Here that index becomes two dense tables:
tokens that act alike in every state share a class, so the transition table is [S, C] rather than
[S, V] (a JSON schema's ~100 states over Gemma's 262K tokens fit in a few MB):

  token_class [V] int32   the class of each token
  next_sc     [S, C] int32  the next state after a token of class c in state s; -1: not allowed

State 0 is the start. A state is final when the format is complete there; the stop tokens are
allowed (and keep the state) only in final states. A decode step masks a row's logits to the
tokens allowed in its state and moves it along the token it picked, without leaving the device.

Legend: S = automaton states, V = vocabulary, C = token classes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TABLE_BUDGET_BYTES = 64 << 20  # device tables (token_class + next_sc + final), at most
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class FormatError(ValueError):
    """A format that cannot be compiled (bad pattern or schema, or tables too large)."""


@dataclasses.dataclass(frozen=True)
class Format:
    """An output format: `kind` json (`spec` a JSON Schema dict), regex (a pattern) or choice
    (a list of strings); `prefix`: a regex the output may begin with (e.g. " ?")."""

    kind: Literal["json", "regex", "choice"]
    spec: Any
    prefix: str = ""

    def regex(self) -> str:
        """The format as a regex (outlines-core's dialect)."""
        return f"{self.prefix}({self._body()})" if self.prefix else self._body()

    def _body(self) -> str:
        if self.kind == "regex":
            return str(self.spec)
        if self.kind == "choice":
            choices = [str(c) for c in self.spec]
            if not choices or any(not c for c in choices):
                raise FormatError("a choice format needs at least one choice, none empty")
            return "(" + "|".join(escape(c) for c in choices) + ")"
        from outlines_core.json_schema import build_regex_from_schema

        try:
            return build_regex_from_schema(json.dumps(self.spec))
        except Exception as e:  # noqa: BLE001 - the library raises its own types
            raise FormatError(f"the JSON schema cannot be compiled: {e}") from None


def escape(text: str) -> str:
    """`text` as a regex that matches it literally."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes | None]:
    """Each token's bytes as generated text (None: a control, unknown or unused id, never
    allowed). Pieces: '▁' is a space, '<0xNN>' one byte."""
    out: list[bytes | None] = []
    for i in range(vocab_size):
        try:
            piece = tokenizer.id_to_piece(i) if tokenizer.is_text(i) else None
        except (IndexError, ValueError, RuntimeError):  # ids past the tokenizer's vocabulary
            piece = None
        if not piece:
            out.append(None)
        elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


@dataclasses.dataclass(frozen=True)
class Automaton:
    """A format's device tables (see the module docstring)."""

    regex: str
    token_class: np.ndarray  # int32 [V]
    next_sc: np.ndarray  # int32 [S, C]; -1: not allowed
    final: np.ndarray  # bool [S]

    @property
    def states(self) -> int:
        return int(self.next_sc.shape[0])

    @property
    def classes(self) -> int:
        return int(self.next_sc.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.token_class.nbytes + self.next_sc.nbytes + self.final.nbytes)

    def allowed(self, state: int) -> np.ndarray:
        """bool [V]: the tokens allowed in `state`."""
        return self.next_sc[state][self.token_class] >= 0

    def step(self, state: int, token: int) -> int:
        """The state after `token` (-1: not allowed)."""
        return int(self.next_sc[state, self.token_class[token]])


def compile_format(fmt: Format, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int],
                   budget_bytes: int | None = None) -> Automaton:
    """The format's `Automaton` over this vocabulary; FormatError when the pattern or schema
    is invalid, or its device tables would exceed `budget_bytes` (default TABLE_BUDGET_BYTES)."""
    from outlines_core import Index, Vocabulary

    stops = sorted({int(s) for s in stop_ids if 0 <= int(s) < vocab_size})
    if not stops:
        raise FormatError("a constrained format needs a stop token to end rows on")
    pieces: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tokenizer, vocab_size)):
        if b and i not in stops:
            pieces.setdefault(b, []).append(i)
    pattern = fmt.regex()
    try:
        index = Index(pattern, Vocabulary(stops[0], pieces))
    except Exception as e:  # noqa: BLE001 - the library raises its own types
        raise FormatError(f"the {fmt.kind} format cannot be compiled to a token automaton: "
                          f"{' '.join(str(e).split())[:300]}") from None
    transitions = index.get_transitions()
    start = index.get_initial_state()
    order = [start] + sorted(s for s in transitions if s != start)
    order += sorted({n for m in transitions.values() for n in m.values()} - set(order))
    ids = {s: k for k, s in enumerate(order)}
    n = len(order)
    final = np.zeros((n,), bool)
    final[[ids[s] for s in index.get_final_states() if s in ids]] = True
    # Every stop token ends a complete row (keeping its state), and only a complete one.
    stay = np.where(final, np.arange(n, dtype=np.int32), -1)
    rows = []  # per state: (tokens [M], next states [M])
    for k, s in enumerate(order):
        moves = transitions.get(s, {})
        toks = np.fromiter(moves.keys(), np.int64, len(moves))
        nxt = np.fromiter((ids[m] for m in moves.values()), np.int32, len(moves))
        keep = (toks < vocab_size) & ~np.isin(toks, stops)
        toks, nxt = toks[keep], nxt[keep]
        if stay[k] >= 0:
            toks = np.concatenate([toks, np.asarray(stops, np.int64)])
            nxt = np.concatenate([nxt, np.full((len(stops),), stay[k], np.int32)])
        rows.append((toks, nxt))
    # Token classes: tokens whose next state is the same in every state. A 64-bit hash of each
    # token's column over the states (O(V) memory however many states), checked exactly below.
    h = np.zeros((vocab_size,), np.uint64)
    with np.errstate(over="ignore"):
        for toks, nxt in rows:
            h = h * np.uint64(0x100000001B3) + np.uint64(1)
            h[toks] += (nxt + 1).astype(np.uint64)
    _, token_class = np.unique(h, return_inverse=True)
    token_class = token_class.reshape(-1).astype(np.int32)
    c = int(token_class.max()) + 1
    need = vocab_size * 4 + n * c * 4 + n
    budget_bytes = TABLE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    if need > budget_bytes:
        raise FormatError(
            f"the {fmt.kind} format has {n} automaton states and {c} token classes: its tables "
            f"would need {need / 2**20:.1f} MiB, over the {budget_bytes / 2**20:.0f} MiB bound; "
            "simplify it (fewer fields, shorter patterns, bounded repeats)")
    next_sc = np.full((n, c), -1, np.int32)
    size = np.bincount(token_class, minlength=c)
    for k, (toks, nxt) in enumerate(rows):
        next_sc[k, token_class[toks]] = nxt
        # The hash is exact unless two columns collided: every token of a class moves alike.
        if (np.any(next_sc[k, token_class[toks]] != nxt)
                or size[next_sc[k] >= 0].sum() != len(toks)):
            raise FormatError("token classes collided while compiling the format; please report")
    return Automaton(regex=pattern, token_class=token_class, next_sc=next_sc, final=final)


def mask_to_format(logits: jax.Array, vocab_major: bool, fsm_b: jax.Array,
                   token_class_v: jax.Array, next_sc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits masked to each row's allowed tokens, next_bc [B, C]) for rows in automaton
    states fsm_b [B]; logits are [B, V] ([V, B] when `vocab_major`), V >= the tables' V."""
    next_bc = next_sc[fsm_b]  # [B, C]
    allowed_bv = jnp.take(next_bc, token_class_v, axis=1) >= 0  # [B, V']
    v = logits.shape[0 if vocab_major else 1]
    if v > allowed_bv.shape[1]:  # padded vocabulary rows: never allowed
        allowed_bv = jnp.pad(allowed_bv, ((0, 0), (0, v - allowed_bv.shape[1])))
    mask = allowed_bv.T if vocab_major else allowed_bv
    return jnp.where(mask, logits, jnp.array(-jnp.inf, logits.dtype)), next_bc


def advance(next_bc: jax.Array, token_class_v: jax.Array, tok_b: jax.Array, active_b: jax.Array,
            fsm_b: jax.Array) -> jax.Array:
    """Each active row's automaton state after its token tok_b [B] (next_bc from
    `mask_to_format`); inactive rows keep theirs."""
    cls_b = token_class_v[jnp.minimum(tok_b, token_class_v.shape[0] - 1)]
    return jnp.where(active_b, next_bc[jnp.arange(tok_b.shape[0]), cls_b], fsm_b)
