"""What this machine's CPU computes fast, read once from /proc/cpuinfo: speed paths that help on
one CPU and hurt on another are chosen from it (bench/ prints the same flags beside its ratios)."""

from __future__ import annotations

import functools

# x86 flags of native bfloat16 dot products (AVX512-BF16, AMX). Without them XLA's bf16 CPU
# products are emulated: on an AVX2-only EPYC the 270M's split bf16 head (layers.split_head_logits)
# took 153 ms per 8-row decode step against 65 ms for the float32 head; 30 vs 45 ms on an AMX Xeon.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing or has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def fast_bf16() -> bool:
    """Whether the CPU has native bfloat16 dot products (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & BF16_FLAGS)
