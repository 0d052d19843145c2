"""Decode speed vs context: RecurrentGemma stays flat, a same-width Gemma slows down.

A tiny-but-not-trivial RecurrentGemma (d_model 256, 6 blocks, 2048-token attention window, as
the real models) and a Gemma of the same width (6 global-attention layers, MQA, as gemma-2b).
For each context length: a chunked prefill fills the state with that many tokens, then one
jitted decode step (batch B, one token per row) is warmed up and timed over N steps with
block_until_ready. Gemma's cache is sized context + N, as a generator would size it.

    python bench/griffin_speed.py          # ~2 min on 2 CPU cores
    python bench/griffin_speed.py --steps 64 --batch 16 --contexts 1024 8192 16384

Prints a table, the 8K/1K ratios, and as its last line one JSON object. Target: RecurrentGemma's
8K rate >= 0.9x its 1K rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import griffin, transformer  # noqa: E402
from model.config import GemmaConfig, GriffinConfig  # noqa: E402

CHUNK = 1024


def configs(window: int) -> dict[str, GemmaConfig | GriffinConfig]:
    rg = GriffinConfig(vocab_size=384, d_model=256, num_layers=6, lru_width=256, num_heads=4,
                       num_kv_heads=1, head_dim=64, ffw_dim=768, attention_window=window,
                       max_seq_len=65_536, end_of_turn_id=None)
    gm = GemmaConfig(family="gemma", vocab_size=384, d_model=256, num_layers=6, num_heads=4,
                     num_kv_heads=1, head_dim=64, ffw_dim=768, layer_types=("global",) * 6,
                     query_pre_attn_scalar=64.0, max_seq_len=65_536, end_of_turn_id=None)
    return {"recurrentgemma": rg, "gemma(same width)": gm}


def decode_rate(cfg, context: int, batch: int, steps: int) -> dict:
    """Tokens/s of the decode step after `context` tokens of prefill."""
    fam = griffin if isinstance(cfg, GriffinConfig) else transformer
    params = fam.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    state = fam.init_state(cfg, batch, context + steps + 8, jnp.float32)
    fwd = jax.jit(lambda p, t, pos, s: fam.forward(p, t, pos, s, cfg), donate_argnums=3)
    rng = np.random.RandomState(0)
    chunk = jnp.asarray(rng.randint(3, 256, (batch, CHUNK)), jnp.int32)
    for start in range(0, context, CHUNK):
        pos = jnp.broadcast_to(jnp.arange(start, start + CHUNK, dtype=jnp.int32), (batch, CHUNK))
        logits, state = fwd(params, chunk, pos, state)

    @functools.partial(jax.jit, donate_argnums=3)  # the state is updated in place
    def step(p, tok, pos, s):
        lg, s = fam.forward(p, tok, pos, s, cfg)
        return jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)[:, None], pos + 1, s

    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    pos = jnp.full((batch, 1), context, jnp.int32)
    for _ in range(3):  # compile + warm up
        tok, pos, state = step(params, tok, pos, state)
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok, pos, state = step(params, tok, pos, state)
    jax.block_until_ready((tok, state))
    dt = time.perf_counter() - t0
    return {"context": context, "tokens_per_s": batch * steps / dt, "ms_per_step": 1e3 * dt / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--window", type=int, default=2048)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}; {args.steps} timed steps")
    print(f"{'model':<20}{'context':>9}{'tok/s':>10}{'ms/step':>10}")
    res: dict[str, list[dict]] = {}
    for name, cfg in configs(args.window).items():
        res[name] = []
        for n in args.contexts:
            r = decode_rate(cfg, n, args.batch, args.steps)
            res[name].append(r)
            print(f"{name:<20}{n:>9}{r['tokens_per_s']:>10.1f}{r['ms_per_step']:>10.2f}",
                  flush=True)
    lo, hi = min(args.contexts), max(args.contexts)

    def ratio(name: str) -> float:
        by = {r["context"]: r["tokens_per_s"] for r in res[name]}
        return by[hi] / by[lo]

    rg, gm = ratio("recurrentgemma"), ratio("gemma(same width)")
    print(f"rate at {hi} / rate at {lo}: recurrentgemma {rg:.2f}x (target >= 0.9x: "
          f"{'met' if rg >= 0.9 else 'MISSED'}), gemma {gm:.2f}x")
    print(json.dumps({"device": jax.devices()[0].device_kind, "batch": args.batch,
                      "rg_rate_ratio": rg, "gemma_rate_ratio": gm, "target_met": rg >= 0.9,
                      "results": res}))


if __name__ == "__main__":
    main()
