"""What every benchmark shares: the machine it ran on (CPU model, SIMD flags) and interleaved,
repeated timing with medians, so that two sides are measured under the same load.

A ratio is only meaningful next to the CPU it was measured on (an AVX-512-BF16 machine and an
AVX2 one rank float32/bfloat16 and us/llama.cpp differently), and a shared VM's speed drifts
from minute to minute: time the sides in alternation (A B B A A B ...), repeat, and compare
medians, reporting the range.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from model.cpu import cpu_flags, cpu_model

# The SIMD features that decide which kernels XLA, torch and llama.cpp can use.
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
        "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
        "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def machine() -> dict[str, Any]:
    """CPU model, core count and SIMD flags of this machine (model/cpu.py: /proc/cpuinfo)."""
    model, flags = cpu_model(), cpu_flags()
    return {"cpu": model, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "simd": [f for f in SIMD if f in flags]}


def machine_line(m: dict[str, Any] | None = None) -> str:
    """One line for a benchmark's output: 'CPU: <model>, <n> cores, SIMD: avx2 fma ...'."""
    m = m or machine()
    return f"CPU: {m['cpu']}, {m['cpu_count']} cores, SIMD: {' '.join(m['simd']) or 'none'}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times every side `repeats` times, alternating their order each round (A B, B A, ...).

    Returns (seconds per side, one list of `repeats` walls; each side's first result).
    """
    names = list(sides)
    secs: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, Any] = {}
    for r in range(max(1, repeats)):
        for n in (names if r % 2 == 0 else names[::-1]):
            dt, out = timed(sides[n])
            secs[n].append(dt)
            first.setdefault(n, out)
    return secs, first


def spread(secs: list[float], work: float = 1.0) -> dict[str, Any]:
    """Median and range of `work / seconds` over repeats (e.g. tokens/s), plus the walls."""
    rates = sorted(work / s for s in secs)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "walls_s": [round(s, 4) for s in secs]}


def joined_documents(docs: list[str], count: int, min_tokens: int, encode: Callable) -> list[str]:
    """`count` documents of at least `min_tokens` tokens each (by `encode`), made by joining
    `docs` in turn (a long-document corpus from the demo's short ones)."""
    out, i = [], 0
    while len(out) < count:
        text = ""
        while len(encode(text)) < min_tokens:
            text += (" " if text else "") + docs[i % len(docs)]
            i += 1
        out.append(text)
    return out
