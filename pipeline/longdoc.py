"""Documents longer than the usable context, summarised by map-reduce: split at token boundaries
(paragraph breaks preferred, then line and sentence breaks, then words) into chunks that overlap
by `OVERLAP_TOKENS`, summarise each chunk, join the summaries and summarise them again, level by
level, until they fit one prompt. The chunk rows go through the same engine (the same slots) as
ordinary rows; the document gets one output row.

Usable context: the prompt limit (min(model context, max_input_tokens) - max_new_tokens, and at
most max_prompt_tokens) minus the prompt's frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from pipeline.prompts import PromptBuilder, clean_text

OVERLAP_TOKENS = 32  # tokens a chunk repeats from the end of the one before (at most a quarter)
MIN_CHUNK_TOKENS = 64  # text tokens a chunk needs at least
MAX_LEVELS = 8  # reduce levels at most (each must shrink the text)
_MARGIN = 8  # tokens of slack for re-tokenising a chunk's text inside the frame
# Cut scores: the better the break after a token, the higher.
_PARAGRAPH, _LINE, _SENTENCE, _WORD = 4, 3, 2, 1
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

Generate = Callable[[list[list[int]], list[int]], Awaitable[list[Any]]]


def _piece_text(tokenizer: Any, t: int) -> str:
    """A token's text as it reads inside a document (its leading space kept)."""
    try:
        piece = tokenizer.id_to_piece(int(t))
    except (AttributeError, IndexError, ValueError, RuntimeError):
        return tokenizer.decode([int(t)])
    if (m := _BYTE_PIECE.fullmatch(piece)) is not None:
        return chr(int(m.group(1), 16))
    return piece.replace("\u2581", " ")


def cut_scores(tokenizer: Any, ids: Sequence[int]) -> np.ndarray:
    """int8 [N]: how good a chunk boundary after each token is (see the scores above)."""
    cache: dict[int, str] = {}
    for t in set(int(t) for t in ids):
        cache[t] = _piece_text(tokenizer, t)
    texts = [cache[int(t)] for t in ids]
    out = np.zeros((len(ids),), np.int8)
    for i, s in enumerate(texts):
        prev = texts[i - 1] if i else ""
        nxt = texts[i + 1] if i + 1 < len(texts) else " "
        if "\n\n" in s or (s.startswith("\n") and prev.endswith("\n")):
            out[i] = _PARAGRAPH
        elif s.endswith("\n"):
            out[i] = _LINE
        elif s.rstrip().endswith((".", "!", "?", "\u3002", "\uff01", "\uff1f")):
            out[i] = _SENTENCE
        elif s.endswith(" ") or nxt.startswith((" ", "\n")):
            out[i] = _WORD
    return out


def plan_chunks(scores: np.ndarray, budget: int, overlap: int = OVERLAP_TOKENS
                ) -> list[tuple[int, int]]:
    """Token ranges [start, end) of at most `budget` tokens covering all N tokens: each ends at
    the best break in the last half of its window (the latest of the best), and the next starts
    `overlap` tokens (at most budget // 4) before it ends."""
    n = len(scores)
    if budget < 8:
        raise ValueError(f"a chunk budget of {budget} tokens is too small to split a document")
    overlap = min(overlap, budget // 4)
    chunks: list[tuple[int, int]] = []
    start = 0
    while n - start > budget:
        lo, hi = start + budget // 2, start + budget  # candidate ends
        window = scores[lo - 1:hi]  # the break after token e-1 ends a chunk at e
        best = lo + int(len(window) - 1 - np.argmax(window[::-1]))
        chunks.append((start, best))
        start = best - overlap
    chunks.append((start, n))
    return chunks


@dataclasses.dataclass
class Summary:
    """A long document's result: the final generation and what it took."""

    final: Any  # model.engine.Generation of the last reduce
    chunks: int  # chunks of the document (leaves of the reduce tree)
    levels: int  # map + reduce levels
    input_tokens: int  # prompt tokens of every call made for the document


class LongDocumentError(Exception):
    """A long document that could not be summarised (its row's error)."""


def usable_tokens(builder: PromptBuilder) -> int:
    """Text tokens one prompt can hold under this builder's limit."""
    return builder.s.max_prompt_tokens - builder.frame_tokens - _MARGIN


async def map_reduce(text: str, builder: PromptBuilder, generate: Generate, seed: int
                     ) -> Summary:
    """Summarises `text` (longer than one prompt) by map-reduce; `generate(prompts, keys)`
    returns a Generation or an exception per prompt (`keys` key each call's random draws).
    Raises LongDocumentError (one line) when a chunk fails or the summaries stop shrinking."""
    tok = builder.tok
    budget = usable_tokens(builder)
    if budget < MIN_CHUNK_TOKENS:
        raise LongDocumentError(
            f"the prompt's frame leaves {max(budget, 0)} of the {builder.s.max_prompt_tokens} "
            f"prompt tokens for text, under the {MIN_CHUNK_TOKENS} a chunk needs; raise "
            "max_input_tokens or lower max_new_tokens")
    ids = tok.encode(clean_text(text) or "")
    chunks = levels = used = 0
    while True:
        spans = plan_chunks(cut_scores(tok, ids), budget)
        chunks = chunks or len(spans)
        prompts = [_prompt(builder, tok.decode(ids[a:b])) for a, b in spans]
        keys = [_key(seed, levels, k) for k in range(len(spans))]
        gens = await generate(prompts, keys)
        levels += 1
        used += sum(len(p) for p in prompts)
        for k, g in enumerate(gens):
            if isinstance(g, BaseException):
                raise LongDocumentError(
                    f"chunk {k + 1} of {len(spans)} (level {levels}) failed: "
                    f"{type(g).__name__}: {' '.join(str(g).split())[:200]}") from g
        joined = "\n\n".join(g.text.strip() for g in gens)
        final = builder.build(joined)
        if final.ids is not None:
            (g,) = await generate([final.ids], [_key(seed, levels, 0)])
            if isinstance(g, BaseException):
                raise LongDocumentError(f"the final summary failed: {type(g).__name__}: "
                                        f"{' '.join(str(g).split())[:200]}") from g
            return Summary(g, chunks, levels + 1, used + len(final.ids))
        nxt = tok.encode(joined)
        if len(nxt) >= len(ids) or levels >= MAX_LEVELS:
            raise LongDocumentError(
                f"the chunk summaries ({len(nxt)} tokens at level {levels}) do not shrink the "
                f"document ({len(ids)} tokens) to one prompt of {budget} tokens; raise "
                "max_input_tokens or lower max_new_tokens")
        ids = nxt


def _prompt(builder: PromptBuilder, text: str) -> list[int]:
    """The summarize prompt of a chunk; a chunk whose text re-tokenises a little longer is cut
    to fit."""
    p = builder.build(text)
    if p.ids is None and p.error_kind == "too_long":
        p = _cut(builder, text)
    if p.ids is None:
        raise LongDocumentError(f"a chunk could not be prompted: {p.error}")
    return p.ids


def _cut(builder: PromptBuilder, text: str) -> Any:
    ids = builder.tok.encode(text)
    for drop in (_MARGIN, 4 * _MARGIN, 16 * _MARGIN):
        p = builder.build(builder.tok.decode(ids[:max(1, len(ids) - drop)]))
        if p.ids is not None:
            return p
    return p


def _key(seed: int, level: int, k: int) -> int:
    h = hashlib.blake2b(f"{seed}:{level}:{k}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF
