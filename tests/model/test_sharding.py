"""Sharding: on 8 simulated CPU devices (one subprocess, shard_check.py) sharded logits equal
one device's within 1e-5 and greedy generation with refills gives identical tokens on meshes
(1, 8), (2, 4), (8, 1), with the same compiled programs, and the parameters really are split;
in this process (one device): the mesh-shape arithmetic, the rules table, every preset's
logical-axes description, and the refusals of a bad mesh_shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from model import PRESETS, load_model, sharding
from model.family import family_of

ROOT = Path(__file__).resolve().parents[2]
MESHES = ("1x8", "2x4", "8x1")
GB = 10**9


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    """shard_check.py's report, from its own process with 8 CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # shard_check.py adds its device count to XLA_FLAGS (the suite's own flags stay).
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("shard_check.py"))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sharded_logits_equal_one_device(eight_devices):
    configs = eight_devices["configs"]
    assert set(configs) == {"gemma1-h8-kv8", "gemma2-h6-kv3", "gemma3-h3-kv1-v388",
                            "recurrentgemma-h3-lru48"}
    for name, c in configs.items():
        assert set(c["meshes"]) == set(MESHES)
        for mesh, r in c["meshes"].items():
            assert r["max_abs_diff"] <= 1e-5, (name, mesh, r["max_abs_diff"])
            d, m = map(int, mesh.split("x"))
            assert r["info"]["mesh"] == r["engine_mesh"] == {"data": d, "model": m}


def test_greedy_generation_with_refills_is_identical_with_the_same_programs(eight_devices):
    for name, c in eight_devices["configs"].items():
        ref = c["ref_programs"]
        if c["window"]:  # local layers: rows outgrow their ring, which wraps
            assert c["longest"] > c["window"], name
        packed = [p for p in ref if p.startswith("packed B=8")]
        if name.startswith("gemma3"):  # stop strings ended rows (on device: one-byte strings)
            assert c["stopped"] > 0, name
        # 11 rows through 8 slots: the initial fill and refills, packed
        assert packed, (name, ref)
        for mesh, r in c["meshes"].items():
            assert r["tokens_equal"] and r["finish_equal"], (name, mesh)
            assert r["n_tokens"] > 11
            assert r["programs"] == ref, (name, mesh)  # compile once per bucket, as unsharded


def test_parameters_are_really_split(eight_devices):
    configs = eight_devices["configs"]
    for name, c in configs.items():
        for mesh, r in c["meshes"].items():
            m = int(mesh.split("x")[1])
            split = r["split"]
            # The MLP width (128 or 192) divides every model axis: those matrices are split.
            for w in ("gate", "up", "down"):
                assert split[w]["device"] * m == split[w]["whole"], (name, mesh, w)
            vocab_divides = split["embed"]["whole"] % m == 0 and name != "gemma3-h3-kv1-v388"
            if vocab_divides or m == 1:
                assert split["embed"]["device"] * m == split["embed"]["whole"]
            elif m == 8:  # 388 rows do not divide 8: replicated, not a crash
                assert split["embed"]["device"] == split["embed"]["whole"]
    # Gemma 1 MHA: every matrix splits, so a device holds ~1/model of the parameters.
    for mesh, r in configs["gemma1-h8-kv8"]["meshes"].items():
        m = int(mesh.split("x")[1])
        assert all(s["device"] * m == s["whole"] for s in r["split"].values()), mesh
        per = r["info"]["param_bytes_per_device"]
        assert r["param_bytes"] / m <= per <= 1.02 * r["param_bytes"] / m, (mesh, per)
    # 3 heads / 1 kv head do not divide: attention stays whole, the rest is split.
    g3 = configs["gemma3-h3-kv1-v388"]["meshes"]["2x4"]["split"]
    assert g3["q"]["device"] == g3["q"]["whole"] and g3["embed"]["device"] * 4 == g3["embed"][
        "whole"]
    rg = configs["recurrentgemma-h3-lru48"]["meshes"]["1x8"]["split"]
    assert rg["linear_x"]["device"] * 8 == rg["linear_x"]["whole"]  # RG-LRU width 48 over 8
    assert rg["input_gate"]["device"] == rg["input_gate"]["whole"]  # 3 gate blocks: whole


def test_state_is_placed_over_data_and_model(eight_devices):
    specs = {n: {mesh: set(r["state_specs"]) for mesh, r in c["meshes"].items()}
             for n, c in eight_devices["configs"].items()}
    # KV caches [B, S, K, Dh] / [B, K, Dh, S]: slots over data, 8 kv heads over model.
    assert specs["gemma1-h8-kv8"]["2x4"] == {"P('data', None, 'model')", "P('data', 'model')",
                                             "P('data',)"}
    assert specs["gemma2-h6-kv3"]["1x8"] == {"P()"}  # 3 kv heads, 1 data: all whole
    # RG-LRU state [B, L] and conv tail [B, W-1, L]: width over model.
    assert "P(None, 'model')" in specs["recurrentgemma-h3-lru48"]["1x8"]
    assert all(s == {"P('data',)"} for c in specs.values() for m, s in c.items() if m == "8x1")


def test_load_model_on_eight_devices(eight_devices):
    r = eight_devices["load_model"]
    assert r["auto"] == {"data": 8, "model": 1}  # a tiny model fits one device: data-parallel
    assert r["given"] == r["given_engine"] == {"data": 2, "model": 4}
    assert r["bad"].startswith("mesh_shape (4, 4) must be two positive ints whose product is "
                               "the 8 visible devices")


# ----------------------------------------------------------------------------------------------
# One device: arithmetic, tables, refusals.


def test_chips_needed_and_mesh_shape_numbers():
    assert sharding.PARAM_MEMORY_FRACTION == 0.75
    assert sharding.chips_needed(10 * GB, None) == 1  # CPU: memory unknown, treated as fitting
    assert sharding.chips_needed(12 * GB, 16 * GB) == 1  # exactly 3/4 of one device
    assert sharding.chips_needed(12 * GB + 1, 16 * GB) == 2
    assert sharding.chips_needed(54 * GB, 16 * GB) == 5  # Gemma 2 27B bf16 on 16 GB chips
    assert sharding.choose_mesh_shape(8, 1 * GB, 16 * GB) == (8, 1)
    assert sharding.choose_mesh_shape(8, 20 * GB, 16 * GB) == (4, 2)
    assert sharding.choose_mesh_shape(8, 40 * GB, 16 * GB) == (2, 4)
    assert sharding.choose_mesh_shape(8, 54 * GB, 16 * GB) == (1, 8)  # 5 -> next divisor 8
    assert sharding.choose_mesh_shape(6, 30 * GB, 16 * GB) == (2, 3)
    assert sharding.choose_mesh_shape(8, 10**15, None) == (8, 1)
    assert sharding.choose_mesh_shape(1, 1 * GB, 16 * GB) == (1, 1)
    with pytest.raises(ValueError, match=r"need 5 devices of 16\.0 GB, but only 4"):
        sharding.choose_mesh_shape(4, 54 * GB, 16 * GB)
    # The preflight's call: a config's parameter count x dtype bytes, no weights, no devices.
    need = sharding.chips_needed(PRESETS["gemma2-27b"].num_params() * 2, 16 * 2**30)
    assert need == 5


def test_mesh_arithmetic_needs_no_jax():
    code = ("import sys\nfrom model.sharding import chips_needed, choose_mesh_shape\n"
            "assert chips_needed(54 * 10**9, 16 * 10**9) == 5\n"
            "assert choose_mesh_shape(8, 54 * 10**9, 16 * 10**9) == (1, 8)\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_check_mesh_shape_refusals():
    assert sharding.check_mesh_shape((2, 4), 8) == (2, 4)
    for bad in [(4, 4), (0, 8), (-1, -8), (8,), "2x4", None]:
        with pytest.raises(ValueError, match="mesh_shape"):
            sharding.check_mesh_shape(bad, 8)


def test_partition_spec_replicates_what_does_not_divide():
    mesh = {"data": 2, "model": 4}
    assert sharding.partition_spec((384, 64), ("vocab", "embed"), mesh) == P("model")
    assert sharding.partition_spec((390, 64), ("vocab", "embed"), mesh) == P()
    assert sharding.partition_spec((8, 64, 3, 32), ("batch", "cache_len", "kv_heads",
                                                    "head_dim"), mesh) == P("data")
    assert sharding.partition_spec((4, 8, 32), ("heads", "kv_heads", None), mesh) == P("model")
    assert sharding.partition_spec((64, 128), ("embed", "mlp"), {"data": 8, "model": 1}) == P()
    with pytest.raises(ValueError, match="no rule"):
        sharding.partition_spec((4,), ("nonsense",), mesh)
    assert {axis for _, axis in sharding.LOGICAL_AXIS_RULES} <= {"data", "model", None}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_leaf_has_logical_axes(name):
    cfg = PRESETS[name]
    fam = family_of(cfg)
    params = jax.eval_shape(lambda: fam.init_params(cfg, jax.random.PRNGKey(0)))
    state = jax.eval_shape(lambda: fam.init_state(cfg, 2, 64))
    n_params = len(jax.tree_util.tree_leaves(params))
    assert len(jax.tree_util.tree_leaves(
        sharding.logical_axes(params, fam.PARAM_AXES, "parameter"))) == n_params
    assert len(jax.tree_util.tree_leaves(
        sharding.logical_axes(state, fam.STATE_AXES, "state"))) == len(
            jax.tree_util.tree_leaves(state))


def test_one_device_is_unchanged_and_bad_meshes_are_refused():
    m = load_model("tiny-gemma3")
    assert m.info["mesh"] == {"data": 1, "model": 1} and m.engine.mesh is None
    assert m.info["param_bytes_per_device"] == sharding.tree_bytes(m.params)
    assert m.mesh is not None and m.mesh.size == 1
    with pytest.raises(ValueError, match=r"mesh_shape \(2, 1\) must be two positive ints whose "
                                         r"product is the 1 visible devices"):
        load_model("tiny-gemma3", mesh_shape=(2, 1))
    with pytest.raises(ValueError, match="mesh_shape"):
        load_model("tiny-gemma3", mesh_shape=(0, 1))
