"""The decode head of big float32 CPU models (model/layers.py `split_head`, model/engine/rows.py
`decode_head`): the tied embedding as two bf16 halves, whose three bf16 products give the
vocab-major logits within ~1e-5 of their scale. That greedy decoding with it stays identical to
transformers is asserted on the embedded 270M in test_gguf.py (its engine uses this head there on
every CPU; jobs use it only where the CPU has native bf16 dot products)."""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np

from model.cpu import cpu_flags, fast_bf16
from model.engine.rows import decode_head
from model.layers import split_head, split_head_logits, unembed


def test_split_head_logits_match_the_float32_product():
    rng = np.random.default_rng(0)
    embed = (rng.standard_normal((65536, 640)) * 0.05).astype(np.float32)
    x = (rng.standard_normal((8, 640)) * 3).astype(np.float32)
    exact = embed.astype(np.float64) @ x.astype(np.float64).T  # [V, B]
    hi, lo = split_head(jnp.asarray(embed))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    got = np.asarray(jax.jit(split_head_logits)(jnp.asarray(x), hi, lo))
    f32 = np.asarray(unembed(jnp.asarray(x)[:, None], jnp.asarray(embed), None, True))
    scale = np.abs(exact).max()
    assert np.abs(got - exact).max() <= 1e-5 * scale, np.abs(got - exact).max() / scale
    assert np.abs(f32 - exact).max() <= 1e-6 * scale  # the float32 product, for comparison
    np.testing.assert_array_equal(got.argmax(0), exact.argmax(0))
    # Through `unembed` with the halves: the same numbers, soft-capped like the float32 head.
    capped = np.asarray(unembed(jnp.asarray(x)[:, None], jnp.asarray(embed), 30.0, True,
                                (hi, lo)))
    np.testing.assert_allclose(capped, 30.0 * np.tanh(got / 30.0), rtol=1e-6, atol=1e-5)


def test_halves_hold_the_embedding_to_16_bits():
    e = jnp.asarray(np.random.default_rng(1).standard_normal((1024, 64)), jnp.float32)
    hi, lo = split_head(e)
    back = np.asarray(hi, np.float32) + np.asarray(lo, np.float32)
    assert np.all(np.abs(back - np.asarray(e)) <= 2.0**-16 * np.abs(np.asarray(e)))


def test_decode_head_only_for_big_float32_heads_on_one_cpu_device_with_bf16_dots():
    big = jnp.zeros((4096, 4096), jnp.float32)  # 2^24 entries: the smallest split head
    hi, lo = decode_head({"embed": big}, None, bf16_dots=True)
    assert hi.shape == lo.shape == big.shape and hi.dtype == jnp.bfloat16
    assert decode_head({"embed": big}, None, bf16_dots=False) is None  # emulated bf16: slower
    assert decode_head({"embed": big[:4095]}, None, True) is None  # small heads stay exact
    assert decode_head({"embed": big.astype(jnp.bfloat16)}, None, True) is None
    assert decode_head({"embed": big}, object(), True) is None  # on a mesh: the float32 head
    # By default this CPU decides: AVX512-BF16 / AMX flags in /proc/cpuinfo.
    assert (decode_head({"embed": big}, None) is not None) == fast_bf16()


def test_cpu_flags_name_this_machine():
    flags = cpu_flags()
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert {"sse2", "avx2"} <= flags  # every CPU these jobs run on has them
    assert fast_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
