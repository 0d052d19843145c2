"""Per-row sampling settings: input columns (`sampling_columns`) that override the job's
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed` and `stop` row by row.

Read tasks pass each such value as JSON text in a hidden column (`__param_<name>`); the actor
parses and checks it per row, so a bad value makes its row an explained error, not a failed job.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError

PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
PREFIX = "__param_"
MAX_NEW_TOKENS = 8192  # as the spec's own bound


def param_columns(configured: dict[str, str] | None, input_names: list[str]) -> dict[str, str]:
    """{setting: input column} of a job: the spec's `sampling_columns`, or by default every
    input column named like a setting. InputError for a configured column no shard has."""
    if configured is None:
        return {p: p for p in PARAMS if p in input_names}
    missing = [c for c in configured.values() if c not in input_names]
    if missing:
        raise InputError(f"sampling_columns names {missing[0]!r}, which no input shard has; "
                         "fix sampling_columns or add the column")
    return dict(configured)


def encode(values: list[Any]) -> pa.Array:
    """One column's values -> JSON text per row (null stays null)."""
    return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                    pa.string())


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], "
                         f"got {v}")
    return v


def _float(name: str, v: Any, lo: float, hi: float, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if v < lo or v > hi or (open_lo and v == lo):
        raise ValueError(f"{name} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
    return float(v)


def parse(raw: dict[str, str | None], defaults: dict[str, Any]) -> dict[str, Any]:
    """A row's settings: `defaults` (the job's) with the row's non-null values; ValueError
    naming the column's setting and the value when one is unusable."""
    out = dict(defaults)
    for name, text in raw.items():
        if text is None:
            continue
        v = json.loads(text)
        if v is None:
            continue
        if name == "max_new_tokens":
            out[name] = _int(name, v, 1, MAX_NEW_TOKENS)
        elif name == "temperature":
            out[name] = _float(name, v, 0.0, 10.0)
        elif name == "top_k":
            out[name] = _int(name, v, 1)
        elif name == "top_p":
            out[name] = _float(name, v, 0.0, 1.0, open_lo=True)
        elif name == "seed":
            out[name] = _int(name, v, -(2 ** 63), 2 ** 63 - 1)
        elif name == "stop":
            stops = [v] if isinstance(v, str) else v
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise ValueError(f"stop must be a string or a list of strings, got {v!r}")
            out[name] = tuple(s for s in stops if s)
    return out
