"""Decode speed vs context: RecurrentGemma stays flat, a same-width Gemma slows down.

A tiny-but-not-trivial RecurrentGemma (d_model 256, 6 blocks, 2048-token attention window, as
the real models) and a Gemma of the same width (6 global-attention layers, MQA, as gemma-2b).
For each (model, context) point: a chunked prefill fills the state with that many tokens and
one jitted decode step (batch B, one token per row) is compiled and warmed up. Then every point
is timed over a window of N steps (block_until_ready), the points in alternating order, for
`--repeats` rounds; each window restarts at the context's position, so every window does the
same work, and the median rate (with its range) is reported. Gemma's cache is sized
context + N + slack, as a generator would size it.

    python bench/griffin_speed.py          # ~3 min on 2 CPU cores
    python bench/griffin_speed.py --steps 64 --batch 16 --contexts 1024 8192 16384

Prints the CPU, a table, the 8K/1K ratios (of medians), and as its last line one JSON object.
Target: RecurrentGemma's 8K rate >= 0.95x its 1K rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np
from harness import machine, machine_line

from model import griffin, transformer
from model.config import GemmaConfig, GriffinConfig

CHUNK = 1024


def configs(window: int) -> dict[str, GemmaConfig | GriffinConfig]:
    rg = GriffinConfig(vocab_size=384, d_model=256, num_layers=6, lru_width=256, num_heads=4,
                       num_kv_heads=1, head_dim=64, ffw_dim=768, attention_window=window,
                       max_seq_len=65_536, end_of_turn_id=None)
    gm = GemmaConfig(family="gemma", vocab_size=384, d_model=256, num_layers=6, num_heads=4,
                     num_kv_heads=1, head_dim=64, ffw_dim=768, layer_types=("global",) * 6,
                     query_pre_attn_scalar=64.0, max_seq_len=65_536, end_of_turn_id=None)
    return {"recurrentgemma": rg, "gemma(same width)": gm}


class Point:
    """One (model, context) point: params, a state filled with `context` tokens, a decode step."""

    def __init__(self, cfg, context: int, batch: int, steps: int):
        self.context, self.batch, self.steps = context, batch, steps
        fam = griffin if isinstance(cfg, GriffinConfig) else transformer
        self.params = fam.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
        self.state = fam.init_state(cfg, batch, context + steps + 8, jnp.float32)
        fwd = jax.jit(lambda p, t, pos, s: fam.forward(p, t, pos, s, cfg), donate_argnums=3)
        rng = np.random.RandomState(0)
        chunk = jnp.asarray(rng.randint(3, 256, (batch, CHUNK)), jnp.int32)
        for start in range(0, context, CHUNK):
            pos = jnp.broadcast_to(jnp.arange(start, start + CHUNK, dtype=jnp.int32),
                                   (batch, CHUNK))
            logits, self.state = fwd(self.params, chunk, pos, self.state)

        @functools.partial(jax.jit, donate_argnums=3)  # the state is updated in place
        def step(p, tok, pos, s):
            lg, s = fam.forward(p, tok, pos, s, cfg)
            return jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)[:, None], pos + 1, s

        self.step = step
        self.tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        self.window()  # compile + warm up

    def window(self) -> float:
        """Seconds of `steps` decode steps from position `context` (the same work each time)."""
        tok, state = self.tok, self.state
        pos = jnp.full((self.batch, 1), self.context, jnp.int32)
        jax.block_until_ready((tok, pos))
        t0 = time.perf_counter()
        for _ in range(self.steps):
            tok, pos, state = self.step(self.params, tok, pos, state)
        jax.block_until_ready((tok, state))
        dt = time.perf_counter() - t0
        self.tok, self.state = tok, state
        return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed window")
    ap.add_argument("--repeats", type=int, default=5, help="timed windows per point (median)")
    ap.add_argument("--window", type=int, default=2048)
    args = ap.parse_args()
    mach = machine()
    print(f"{machine_line(mach)}; device {jax.devices()[0].device_kind}; batch {args.batch}; "
          f"{args.repeats} x {args.steps} timed steps per point, interleaved", flush=True)
    points = {(name, n): Point(cfg, n, args.batch, args.steps)
              for name, cfg in configs(args.window).items() for n in args.contexts}
    secs: dict[tuple[str, int], list[float]] = {k: [] for k in points}
    order = list(points)
    for r in range(args.repeats):  # every point once per round, the order alternating
        for k in (order if r % 2 == 0 else order[::-1]):
            secs[k].append(points[k].window())
    print(f"{'model':<20}{'context':>9}{'tok/s':>10}{'range':>18}{'ms/step':>10}")
    res: dict[str, list[dict]] = {}
    for (name, n), ss in secs.items():
        rates = sorted(args.batch * args.steps / s for s in ss)
        med = statistics.median(rates)
        res.setdefault(name, []).append({
            "context": n, "tokens_per_s": med, "tokens_per_s_range": [rates[0], rates[-1]],
            "ms_per_step": 1e3 * statistics.median(ss) / args.steps})
        print(f"{name:<20}{n:>9}{med:>10.1f}{f'{rates[0]:.1f}-{rates[-1]:.1f}':>18}"
              f"{1e3 * statistics.median(ss) / args.steps:>10.2f}")
    lo, hi = min(args.contexts), max(args.contexts)

    def ratio(name: str) -> float:
        by = {r["context"]: r["tokens_per_s"] for r in res[name]}
        return by[hi] / by[lo]

    rg, gm = ratio("recurrentgemma"), ratio("gemma(same width)")
    print(f"median rate at {hi} / at {lo}: recurrentgemma {rg:.2f}x (target >= 0.95x: "
          f"{'met' if rg >= 0.95 else 'MISSED'}), gemma {gm:.2f}x; {machine_line(mach)}")
    print(json.dumps({"bench": "griffin_speed", **mach, "device": jax.devices()[0].device_kind,
                      "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                      "rg_rate_ratio": rg, "gemma_rate_ratio": gm, "target_met": rg >= 0.95,
                      "results": res}))


if __name__ == "__main__":
    main()
