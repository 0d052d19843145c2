"""A row's result: `Generation`, built from its generated ids (stop tokens and stop strings
cut), and the stop-token table the decode loop checks on device."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model.engine.prefill import Row


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    Attributes:
      tokens: generated ids; a stop token that ended the row is not included, and with a stop
        string the ids end with the one that completed it.
      text: decoded `tokens`, cut before the first stop string.
      finish_reason: "stop" (stop token or stop string) or "length" (max_new_tokens reached).
      prompt_tokens / output_tokens: token counts (output_tokens == len(tokens)).
      complete: with an output format, whether the text is a whole match of it (False: cut
        by max_new_tokens before the format was complete); None without one.
      logprobs: with logprobs asked for, each of `tokens`' log-probability under the model's
        raw logits (before temperature, filters or a format's mask); None otherwise.
    """

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    complete: bool | None = None
    logprobs: list[float] | None = None


def stop_string_tokens(tokenizer: Any, stop_strings: Sequence[str],
                       vocab_size: int | None = None) -> frozenset[int]:
    """Ids whose text alone contains a stop string (cached per tokenizer and strings, in memory
    and, for a tokenizer with a `fingerprint`, on disk).

    A token decoded alone can only lose a leading space against its text in context, so a
    token listed here completes the stop string wherever it appears; stop strings that span
    tokens are still found by the host's text check, and so is a string held by more than
    `MAX_STOP_TOKENS` tokens (" " or "e": a table that size would cost every decode step).

    Decoding the 262K-piece vocabulary takes 0.3 s alone but 3 s or more in an actor starting
    beside Ray's other processes on 2 cores, holding the GIL (so the engine's thread) meanwhile:
    the disk cache makes every later process's table a file read.
    """
    if tokenizer is None or not stop_strings:
        return frozenset()
    cache = getattr(tokenizer, "_stop_string_tokens", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._stop_string_tokens = cache
        except AttributeError:  # a tokenizer that takes no attributes: computed every call
            pass
    n = getattr(tokenizer, "vocab_size", None) or vocab_size or 0
    key = (tuple(stop_strings), n)
    if key not in cache:
        file = _stop_tokens_file(tokenizer, key)
        found = _read_ids(file)
        if found is None:
            found = _find_stop_tokens(tokenizer, stop_strings, n)
            if file is not None:
                _write_ids(file, found)
        cache[key] = found
    return cache[key]


def _find_stop_tokens(tokenizer: Any, stop_strings: Sequence[str], n: int) -> frozenset[int]:
    each = getattr(tokenizer, "decode_each", None)
    texts = each(range(n)) if each else [tokenizer.decode([i]) for i in range(n)]
    found: set[int] = set()
    for stop in stop_strings:
        ids = [i for i, t in enumerate(texts) if stop in t]
        if len(ids) <= MAX_STOP_TOKENS:
            found.update(ids)
    return frozenset(found)


def _stop_tokens_file(tokenizer: Any, key: tuple[tuple[str, ...], int]) -> Path | None:
    """The disk cache entry of (stop strings, vocabulary size) for this tokenizer, or None for a
    tokenizer without a `fingerprint` (cheap to decode: the byte tokenizer)."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not fingerprint:
        return None
    from model.paths import cache_dir

    digest = hashlib.sha256(json.dumps([fingerprint, *key]).encode()).hexdigest()[:24]
    return cache_dir() / "stop-tokens" / f"{digest}.json"


def _read_ids(file: Path | None) -> frozenset[int] | None:
    if file is None or not file.exists():
        return None
    try:
        return frozenset(int(i) for i in json.loads(file.read_text())["ids"])
    except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is computed again
        return None


def _write_ids(file: Path, ids: frozenset[int]) -> None:
    from model.paths import atomic_write

    try:
        atomic_write(file, lambda tmp: tmp.write_text(json.dumps({"ids": sorted(ids)})))
    except OSError:  # a read-only cache: computed again next time
        pass


MAX_STOP_TOKENS = 1024


def stop_table(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 8 (so the table size rarely changes shape)."""
    n = max(8, -(-len(stop_ids) // 8) * 8)
    table = np.full((n,), -1, np.int32)
    table[: len(stop_ids)] = list(stop_ids)
    return table


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)) if tokenizer is not None else ""


def finish(row: Row, out: list[int], tokenizer: Any, stop_set: frozenset[int],
           stop_strings: Sequence[str], logp: Sequence[float] | None = None) -> Generation:
    """Builds a row's result from its raw generated ids (and their log-probabilities)."""
    reason = "length"
    if out and out[-1] in stop_set:
        out = out[:-1]
        reason = "stop"
    text = decode_text(tokenizer, out)
    if stop_strings:
        cut = first_stop(text, stop_strings)
        if cut >= 0:
            # Keep ids up to the one that completed the first stop string.
            n = len(out)
            for i in range(1, len(out) + 1):
                if first_stop(decode_text(tokenizer, out[:i]), stop_strings) >= 0:
                    n = i
                    break
            out, text, reason = out[:n], text[:cut], "stop"
    return Generation(tokens=[int(x) for x in out], text=text, finish_reason=reason,
                      prompt_tokens=len(row.prompt), output_tokens=len(out),
                      logprobs=None if logp is None else [float(x) for x in logp[:len(out)]])
