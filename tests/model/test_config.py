"""Presets: published sizes, shapes of the real parameter trees (no allocation), config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from model.family import family_of
from model.config import PRESETS, PUBLISHED_SIZES, GemmaConfig, get_preset


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_preset_parameter_count_matches_published(name):
    n = PRESETS[name].num_params()
    assert abs(n / PUBLISHED_SIZES[name] - 1) < 0.01, f"{name}: {n:,} params"


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if isinstance(c, GemmaConfig)])
def test_gemma_param_tree_size_matches_formula(name):
    cfg = PRESETS[name]
    from model import transformer

    shapes = jax.eval_shape(lambda k: transformer.init_params(cfg, k, jnp.bfloat16),
                            jax.random.PRNGKey(0))
    total = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert total == cfg.num_params()


def test_gemma3_layer_pattern_and_rope():
    c = get_preset("gemma3-4b")
    assert c.layer_types[:6] == ("local",) * 5 + ("global",)
    assert (c.rope_base_local, c.rope_base_global, c.rope_scale_global) == (1e4, 1e6, 8.0)
    assert get_preset("gemma3-1b").rope_scale_global == 1.0
    g2 = get_preset("gemma2-9b")
    assert g2.layer_types[:2] == ("local", "global") and g2.attn_softcap == 50.0
    assert get_preset("gemma-2b").num_kv_heads == 1 and get_preset("gemma-7b").num_kv_heads == 16


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="gemma3-270m"):
        get_preset("gemma-1000b")


def test_config_validation():
    with pytest.raises(ValueError, match="layer_types"):
        GemmaConfig(family="gemma", vocab_size=8, d_model=8, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=4, ffw_dim=8, layer_types=("global",))
    with pytest.raises(ValueError, match="multiple"):
        GemmaConfig(family="gemma", vocab_size=8, d_model=8, num_layers=1, num_heads=3,
                    num_kv_heads=2, head_dim=4, ffw_dim=8, layer_types=("global",))


def test_family_dispatch():
    from model import transformer

    assert family_of(PRESETS["gemma3-270m"]) is transformer
