"""Run by tests/model/test_sharding.py in its own process with 8 simulated CPU devices: for tiny
Gemma 1/2/3 and RecurrentGemma configs (head, kv-head and vocabulary sizes that do and do not
divide the mesh axes) it compares every mesh against one device and prints one JSON line.

Per config and mesh: the largest |logit difference| (same weights, same tokens), whether greedy
generation with refills (11 prompts through 8 slots) gave identical tokens, both engines'
compile counts, and how the parameters were split. Not a test module itself (no test_ prefix).
"""

from __future__ import annotations

import json
import os
import sys

if "jax" in sys.modules:
    raise SystemExit("shard_check.py must start its own process: XLA_FLAGS is read once")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from model import load_model, sharding
from model.api import Model
from model.config import PRESETS, gemma2_layer_types
from model.engine import Buckets, Engine, generate
from model.family import family_of
from model.tokenizer import ByteTokenizer

MESHES = [(1, 8), (2, 4), (8, 1)]
TB = Buckets(batch=(1, 2, 4, 8), length=(64,), chunk=(16,))  # few programs; prompts > 17 chunk
G2, G3, RG = PRESETS["tiny-gemma2"], PRESETS["tiny-gemma3"], PRESETS["tiny-recurrentgemma"]
CONFIGS = {
    # Gemma 1, MHA: heads, kv heads, MLP width and vocabulary all divide 8.
    "gemma1-h8-kv8": G2.replace(family="gemma", num_layers=2, layer_types=("global",) * 2,
                                sliding_window=None, attn_softcap=None, final_softcap=None,
                                post_norms=False, num_heads=8, num_kv_heads=8),
    # Gemma 2: 6 heads over 3 kv heads divide neither 8 nor 4.
    "gemma2-h6-kv3": G2.replace(num_heads=6, num_kv_heads=3, layer_types=gemma2_layer_types(4)),
    # Gemma 3: 3 heads, MQA, and a vocabulary of 388 (divides 4, not 8).
    "gemma3-h3-kv1-v388": G3.replace(num_heads=3, num_kv_heads=1, vocab_size=388),
    # RecurrentGemma: 3 heads and RG-LRU blocks (do not divide), lru_width 48 (divides 8).
    "recurrentgemma-h3-lru48": RG.replace(num_heads=3, lru_width=48),
}


def prompts_of(n: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(7)
    lengths = [3 + (5 * i) % 19 for i in range(n)]  # 3..21 tokens: one or two prefill chunks
    prompts = [[2] + rng.integers(4, min(vocab, 300), size=k - 1).tolist() for k in lengths]
    return prompts, [3 + i for i in range(n)]  # rows finish one by one: refills of 2 rows


def split_report(params: object) -> dict:
    """Per parameter name with >= 2 dims (the last layer's): whole bytes, bytes on device 0."""
    out: dict[str, dict[str, int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if leaf.ndim < 2:
            continue
        name = sharding._leaf_name(path)
        shard = leaf.addressable_shards[0].data
        out[name] = {"whole": int(leaf.nbytes), "device": int(shard.nbytes)}
    return out


def programs(engine: Engine) -> list[str]:
    """The engine's compiled programs, as "name shapes", sorted."""
    return sorted(f"{r.program} {r.shapes}" for r in engine.compile_log.records)


def check(name: str, cfg: object) -> dict:
    family = family_of(cfg)
    host = jax.device_get(family.init_params(cfg, jax.random.PRNGKey(3)))
    tok = ByteTokenizer(cfg.vocab_size)
    ref = Model(name, cfg, jax.device_put(host, jax.devices()[0]), tok)
    tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, (8, 20))
    want = ref.logits(tokens)
    prompts, max_new = prompts_of(11, cfg.vocab_size)
    # One config also stops rows on strings its greedy rows produce (one byte: on device).
    stop = ["7", "r", "\x08"] if name.startswith("gemma3") else None
    e0 = Engine(ref.family, cfg, ref.params, buckets=TB)
    gen0 = generate(e0, prompts, tok, max_new_tokens=max_new, max_batch=8, stop_token_ids=[],
                    stop_strings=stop)
    window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_window", None)
    res: dict = {"ref_programs": programs(e0), "meshes": {}, "window": window,
                 "stopped": sum(g.finish_reason == "stop" for g in gen0),
                 "longest": max(len(p) + n for p, n in zip(prompts, max_new))}
    for shape in MESHES:
        m = Model(name, cfg, host, tok, mesh=sharding.make_mesh(shape))
        got = m.logits(tokens)
        e1 = Engine(m.family, cfg, m.params, buckets=TB)
        gen1 = generate(e1, prompts, tok, max_new_tokens=max_new, max_batch=8,
                        stop_token_ids=[], stop_strings=stop)
        state = e1.init_state(8, 64)
        res["meshes"][f"{shape[0]}x{shape[1]}"] = {
            "max_abs_diff": float(np.max(np.abs(got - want))),
            "tokens_equal": [g.tokens for g in gen1] == [g.tokens for g in gen0],
            "finish_equal": [g.finish_reason for g in gen1] == [g.finish_reason for g in gen0],
            "n_tokens": sum(len(g.tokens) for g in gen1),
            "programs": programs(e1),
            "engine_mesh": sharding.mesh_dict(e1.mesh),
            "info": m.info,
            "param_bytes": sharding.tree_bytes(m.params),
            "split": split_report(m.params),
            "state_specs": sorted({str(leaf.sharding.spec)
                                   for leaf in jax.tree_util.tree_leaves(state)}),
        }
    return res


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    out: dict = {"configs": {name: check(name, cfg) for name, cfg in CONFIGS.items()}}
    auto = load_model("tiny-recurrentgemma")  # mesh chosen: fits one device -> data-parallel
    given = load_model("tiny-gemma2", mesh_shape=(2, 4))
    out["load_model"] = {"auto": auto.info["mesh"], "given": given.info["mesh"],
                         "given_engine": sharding.mesh_dict(given.engine.mesh)}
    try:
        load_model("tiny-gemma2", mesh_shape=(4, 4))
        out["load_model"]["bad"] = None
    except ValueError as e:
        out["load_model"]["bad"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
