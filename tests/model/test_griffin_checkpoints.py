"""RecurrentGemma loaders: HF safetensors (sharded, bad inputs) and the Flax/Orbax layout of
google-deepmind's `recurrentgemma` package (parity against that package)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import griffin
from model.checkpoints import hf_griffin, orbax_griffin
from model.config import GriffinConfig
from model.errors import CheckpointError


def tiny_hf_model(seed: int):
    """A tiny transformers RecurrentGemma (window 16) with every weight perturbed."""
    torch.manual_seed(seed)
    hc = transformers.RecurrentGemmaConfig(
        vocab_size=384, hidden_size=48, intermediate_size=192, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, lru_width=48, attention_window_size=16,
        conv1d_width=4, logits_soft_cap=30.0, attn_implementation="eager")
    m = transformers.RecurrentGemmaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p) + 0.02)
    return m

_fwd = jax.jit(griffin.forward, static_argnames="cfg")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_rg_ck")
    tiny_hf_model(seed=1).save_pretrained(d, safe_serialization=True)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def _cfg(d):
    return GriffinConfig.from_hf(json.loads((d / "config.json").read_text()))


def test_sharded_checkpoint_loads_the_same(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    tiny_hf_model(seed=1).save_pretrained(sharded, safe_serialization=True,
                                          max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = hf_griffin.load_params(hf_dir, _cfg(hf_dir))
    b = hf_griffin.load_params(sharded, _cfg(sharded))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_block_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    f = d / "model.safetensors"
    tensors = {k: v for k, v in load_file(f).items() if not k.startswith("model.layers.4.")}
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\..* is missing"):
        hf_griffin.load_params(d, _cfg(d))


def test_window_mismatch_is_refused(hf_dir):
    cfg = _cfg(hf_dir).replace(attention_window=32)
    with pytest.raises(CheckpointError, match="attention_window mismatch.*16.*32"):
        hf_griffin.load_params(hf_dir, cfg)


def test_conv_width_mismatch_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["conv1d_width"] = 3
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError,
                       match=r"conv_1d\.weight has shape \(48, 1, 4\), expected \(48, 1, 3\)"):
        hf_griffin.load_params(d, _cfg(d))


def test_bad_config_json_fields_are_named():
    with pytest.raises(CheckpointError, match="hidden_size"):
        GriffinConfig.from_hf({"model_type": "recurrent_gemma", "num_attention_heads": 4})
    with pytest.raises(CheckpointError, match="partial_rotary_factor"):
        GriffinConfig.from_hf({"hidden_size": 48, "num_attention_heads": 4,
                                   "num_hidden_layers": 3, "vocab_size": 10,
                                   "intermediate_size": 96, "partial_rotary_factor": 1.0})


# ---------------------------------------------------------------- Flax / Orbax layout


def _flax_tree(params: dict, cfg) -> dict:
    """Our params written back in the recurrentgemma package's Flax names and layouts."""
    n = np.asarray
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    tree = {"embedder": {"input_embedding": n(params["embed"])},
            "final_norm": {"scale": n(params["final_norm"])}}
    for i, (kind, p) in enumerate(zip(cfg.block_types, params["layers"])):
        blk = {"temporal_pre_norm": {"scale": n(p["temporal_norm"])},
               "channel_pre_norm": {"scale": n(p["channel_norm"])},
               "mlp_block": {
                   "ffw_up": {"w": np.stack([n(p["gate"]).T, n(p["up"]).T]),
                              "b": np.stack([n(p["gate_b"]), n(p["up_b"])])[:, None, None]},
                   "ffw_down": {"kernel": n(p["down"]).T, "bias": n(p["down_b"])}}}
        if kind == "recurrent":
            blk["recurrent_block"] = {
                **{nm: {"kernel": n(p[nm]), "bias": n(p[nm + "_b"])}
                   for nm in ("linear_x", "linear_y", "linear_out")},
                "conv_1d": {"w": n(p["conv_w"]), "b": n(p["conv_b"])},
                "rg_lru": {"a_param": n(p["a_param"]),
                           "input_gate": {"w": n(p["input_gate"]), "b": n(p["input_gate_b"])},
                           "a_gate": {"w": n(p["a_gate"]), "b": n(p["a_gate_b"])}}}
        else:
            blk["attention_block"] = {
                "proj_q": {"kernel": n(p["q"]).reshape(d, h * dh)},
                "proj_k": {"kernel": n(p["k"]).reshape(d, dh)},
                "proj_v": {"kernel": n(p["v"]).reshape(d, dh)},
                "proj_final": {"kernel": n(p["o"]).reshape(h * dh, d), "bias": n(p["o_b"])}}
        tree[f"blocks.{i}"] = blk
    return tree


def _save_orbax(path, tree):
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path.resolve(), {"params": tree})


@pytest.fixture(scope="module")
def hf_params(hf_dir):
    cfg = _cfg(hf_dir)
    return cfg, hf_griffin.load_params(hf_dir, cfg)


def test_orbax_roundtrip_from_documented_layout(hf_params, tmp_path):
    cfg, params = hf_params
    _save_orbax(tmp_path / "ck", _flax_tree(params, cfg))
    cfg2, params2 = orbax_griffin.load(tmp_path / "ck", jnp.float32, attention_window=16)
    # The Orbax layout carries no config: every field is derived from tensor shapes or is the
    # documented default (eps 1e-6, soft cap 30, RoPE 10K, no end-of-turn id off the 256K vocab).
    want = GriffinConfig(vocab_size=384, d_model=48, num_layers=6, lru_width=48, num_heads=4,
                         num_kv_heads=1, head_dim=12, ffw_dim=96, attention_window=16,
                         conv1d_width=4, block_pattern=("recurrent", "recurrent", "attention"),
                         final_softcap=30.0, rope_base=10_000.0, rms_eps=1e-6, max_seq_len=8192,
                         bos_id=2, eos_id=1, pad_id=0, end_of_turn_id=None)
    assert cfg2 == want
    assert cfg == want  # the HF loader reads the same model to the same config
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_missing_block_and_bad_conv_are_refused(hf_params, tmp_path):
    cfg, params = hf_params
    tree = _flax_tree(params, cfg)
    del tree["blocks.3"]
    _save_orbax(tmp_path / "a", tree)
    with pytest.raises(CheckpointError, match=r"block blocks\.3 is missing"):
        orbax_griffin.load(tmp_path / "a")
    tree = _flax_tree(params, cfg)
    w = tree["blocks.4"]["recurrent_block"]["conv_1d"]["w"]
    tree["blocks.4"]["recurrent_block"]["conv_1d"]["w"] = w[1:]  # width 3 in one block only
    _save_orbax(tmp_path / "b", tree)
    with pytest.raises(CheckpointError, match=r"blocks\.4/recurrent_block/conv_1d/w has shape"
                                              r" \(3, 48\), expected \(4, 48\)"):
        orbax_griffin.load(tmp_path / "b")
    with pytest.raises(CheckpointError, match="cannot read it as an Orbax checkpoint"):
        orbax_griffin.load(tmp_path / "nothing-here")


def test_parity_with_recurrentgemma_package(tmp_path):
    """The deepmind package makes + saves a random tree; we load it and match its outputs."""
    from recurrentgemma import common
    from recurrentgemma import jax as rg
    from recurrentgemma.jax import utils

    r, a = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
    dcfg = common.GriffinConfig(
        vocab_size=384, width=48, mlp_expanded_width=96, num_heads=4, lru_width=48,
        block_types=(r, r, a) * 2, embeddings_scale_by_sqrt_dim=True, attention_window_size=16,
        logits_soft_cap=30.0, scan_type=common.ScanType.ASSOCIATIVE_NATIVE)
    ref = rg.Griffin(dcfg, gradient_checkpointing=False)
    toks = jnp.asarray(np.random.RandomState(3).randint(3, 384, (2, 64)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    # The package's own parameter tree (names, shapes), filled with host random numbers
    # (its initialisers would take seconds to compile here).
    shapes = jax.eval_shape(ref.init, jax.random.PRNGKey(0), toks[:, :8], pos[:, :8])["params"]
    rng = np.random.RandomState(1)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.randn(*s.shape) + 0.02, jnp.float32), shapes)
    utils.save_parameters(str((tmp_path / "ck").resolve()), params)
    # The package lets a query see window + 1 keys; ours (like transformers) sees `window`.
    cfg, ours = orbax_griffin.load(tmp_path / "ck", jnp.float32, attention_window=17)
    apply = jax.jit(ref.apply, static_argnames="return_cache")
    want, _ = apply({"params": params}, toks, pos, return_cache=False)
    got, _ = _fwd(ours, toks, pos, None, cfg=cfg)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
    # Greedy: the package's prefill + cached decode vs ours, 32 tokens, well past the window.
    lg, cache = apply({"params": params}, toks[:, :20], pos[:, :20], None)
    lo, state = _fwd(ours, toks[:, :20], pos[:, :20], griffin.init_state(cfg, 2), cfg=cfg)
    cw, co = jnp.argmax(lg[:, -1], -1), jnp.argmax(lo[:, -1], -1)
    gw, go = [cw], [co]
    for i in range(31):
        p1 = jnp.full((2, 1), 20 + i, jnp.int32)
        lg, cache = apply({"params": params}, cw[:, None].astype(jnp.int32), p1, cache)
        lo, state = _fwd(ours, co[:, None].astype(jnp.int32), p1, state, cfg=cfg)
        cw, co = jnp.argmax(lg[:, -1], -1), jnp.argmax(lo[:, -1], -1)
        gw.append(cw)
        go.append(co)
    np.testing.assert_array_equal(np.stack(go, 1), np.stack(gw, 1))
    assert len(set(np.asarray(np.stack(go, 1))[0].tolist())) > 5  # not one repeated token


# The published google/recurrentgemma-2b config.json (its fields that matter).
RG2B_CONFIG_JSON = {
    "architectures": ["RecurrentGemmaForCausalLM"], "attention_bias": False,
    "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"],
    "bos_token_id": 2, "conv1d_width": 4, "embeddings_scale_by_sqrt_dim": True,
    "eos_token_id": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2560, "intermediate_size": 15360, "logits_soft_cap": 30.0,
    "lru_width": 2560, "model_type": "recurrent_gemma", "num_attention_heads": 10,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "vocab_size": 256000,
}


def test_published_configs_map_to_the_preset():
    from model.config import PRESETS

    preset = PRESETS["recurrentgemma-2b"]
    assert GriffinConfig.from_hf(RG2B_CONFIG_JSON) == preset
    # A full-size Flax tree made of zero-stride arrays (no memory): shapes alone give the config.
    tree: dict = {}
    for name, shape in orbax_griffin._expected(preset).items():
        node = tree
        *parents, leaf = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.broadcast_to(np.float32(0), shape)
    assert GriffinConfig.from_flax_params(tree) == preset
    del tree["blocks.25"]
    with pytest.raises(CheckpointError, match="25 blocks, but a RecurrentGemma of width 2560 has 26"):
        GriffinConfig.from_flax_params(tree)
