"""This machine's CPU, read once from /proc/cpuinfo: its model name (calibration tables, bench
output) and its feature flags, from which speed paths that help on one CPU and hurt on another
are chosen (bench/ prints the same flags beside its ratios)."""

from __future__ import annotations

import functools
import platform

# x86 flags of native bfloat16 dot products (AVX512-BF16, AMX). Without them XLA's bf16 CPU
# products are emulated: on an AVX2-only EPYC the 270M's split bf16 head (layers.split_head_logits)
# took 153 ms per 8-row decode step against 65 ms for the float32 head; 30 vs 45 ms on an AMX Xeon.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(first model name, first CPU's flags) from /proc/cpuinfo; ("", {}) where it is missing."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (else the platform's processor or machine name)."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing or has none)."""
    return _cpuinfo()[1]


def fast_bf16() -> bool:
    """Whether the CPU has native bfloat16 dot products (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & BF16_FLAGS)
