"""Generation-state memory: RecurrentGemma's fixed-size state vs Gemma's growing KV cache.

1. For reference, the bytes of the generation state of recurrentgemma-2b and gemma-2b shapes
   (bfloat16 caches; the RG-LRU state is float32) at 1K..32K tokens, batch 1 and 32, from
   `jax.eval_shape` (nothing allocated, no weights needed). RecurrentGemma's row is flat by
   construction (`init_state` ignores the length), so it decides nothing.
2. Measured, and what `target_met` is gated on: real generation (`Model.generate`, the engine's
   bucketed prefill in chunks of 512 and its on-device decode loop) of B rows of N tokens
   (N - 16 prompt tokens + 16 generated) at N = 1K and 8K, each in a fresh process, for tiny
   RecurrentGemma and a tiny Gemma of the same width (global attention, as gemma-2b), random
   weights. Around every decode call the bench records the bytes of the state the engine
   actually carries, of its slot bookkeeping (which holds an int32 [B, L] buffer of generated
   tokens) and of all live device buffers (params + state + slots + outputs), keeping the
   largest; plus the process's peak RSS.

    python bench/memory.py            # ~2 min on 2 CPU cores

Prints the CPU, two tables and, as its last line, one JSON object. Target: RecurrentGemma's
measured state and live bytes at 8K are <= 1.1x those at 1K, while the same measurement shows
Gemma's growing (>= 2x), so it can tell the two apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import machine, machine_line

LENGTHS = (1024, 2048, 4096, 8192, 32_768)
BATCHES = (1, 32)
MEASURED = (1024, 8192)
CHUNK = 512
DECODE = 16


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def state_bytes(name: str, batch: int, length: int) -> int:
    """Generation-state bytes of preset `name` for `batch` rows of `length` tokens (eval_shape)."""
    import jax
    import jax.numpy as jnp

    from model.config import PRESETS
    from model.family import family_of

    cfg = PRESETS[name]
    shapes = jax.eval_shape(lambda: family_of(cfg).init_state(cfg, batch, length, jnp.bfloat16))
    return _tree_bytes(shapes)


def tiny_configs():
    """tiny-recurrentgemma and a Gemma (global attention, as gemma-2b) of the same width."""
    from model.config import PRESETS, GemmaConfig

    rg = PRESETS["tiny-recurrentgemma"].replace(max_seq_len=65_536)  # the state ignores it
    gm = GemmaConfig(family="gemma", vocab_size=rg.vocab_size, d_model=rg.d_model,
                     num_layers=rg.num_layers, num_heads=rg.num_heads, num_kv_heads=1,
                     head_dim=rg.head_dim, ffw_dim=rg.ffw_dim,
                     layer_types=("global",) * rg.num_layers, query_pre_attn_scalar=rg.head_dim,
                     max_seq_len=65_536)
    return {"tiny-recurrentgemma": rg, "tiny-gemma(same width)": gm}


def measure(model: str, length: int, batch: int) -> dict:
    """Real generation of `batch` rows of `length` tokens; the largest state and live bytes
    seen around the engine's decode calls, and the peak RSS."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.api import Model
    from model.engine import Buckets, Engine
    from model.family import family_of

    cfg = tiny_configs()[model]
    m = Model(model, cfg, family_of(cfg).init_params(cfg, jax.random.PRNGKey(0), jnp.float32),
              None)
    # Buckets that fit exactly: cache length N, B slots, 512-token prefill chunks.
    m.engine = Engine(m.family, cfg, m.params,
                      buckets=Buckets(batch=(batch,), length=(length,), chunk=(CHUNK,)))
    seen = {"state_bytes": 0, "slots_bytes": 0, "live_bytes": 0, "decode_calls": 0}
    decode = m.engine.decode

    def live() -> int:
        return int(sum(a.nbytes for a in jax.live_arrays()))

    def observed_decode(state, slots, *args, **kw):
        seen["state_bytes"] = max(seen["state_bytes"], _tree_bytes(state))
        seen["slots_bytes"] = max(seen["slots_bytes"], _tree_bytes(slots))
        seen["live_bytes"] = max(seen["live_bytes"], live())
        out = jax.block_until_ready(decode(state, slots, *args, **kw))
        seen["live_bytes"] = max(seen["live_bytes"], live())
        seen["decode_calls"] += 1
        return out

    m.engine.decode = observed_decode
    rng = np.random.RandomState(0)
    prompts = [[2] + rng.randint(4, cfg.vocab_size, length - DECODE - 1).tolist()
               for _ in range(batch)]
    gens = m.generate(prompts, max_new_tokens=DECODE, stop_token_ids=[], max_batch=batch)
    if any(g.output_tokens != DECODE for g in gens):
        raise SystemExit(f"{model} at {length}: expected {DECODE} new tokens per row")
    return {"model": model, "tokens": length, "batch": batch, **seen,
            "param_bytes": _tree_bytes(m.params),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="rows generated in the measured runs")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "TOKENS", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    mach = machine()
    print(machine_line(mach))

    table = {}
    print("Generation state by construction (jax.eval_shape; bfloat16 caches, float32 RG-LRU "
          "state), MiB")
    print(f"{'model':<20}{'batch':>6}" + "".join(f"{n // 1024:>9}K" for n in LENGTHS)
          + f"{'8K/1K':>8}")
    for name in ("recurrentgemma-2b", "gemma-2b"):
        for b in BATCHES:
            row = [state_bytes(name, b, n) for n in LENGTHS]
            table[f"{name}/b{b}"] = dict(zip(map(str, LENGTHS), row))
            print(f"{name:<20}{b:>6}" + "".join(f"{_mib(x):>10}" for x in row)
                  + f"{row[3] / row[0]:>8.2f}")

    print(f"\nMeasured in real generation: {args.batch} rows of N tokens ({DECODE} generated), "
          "fresh process each (MiB; largest around a decode call)")
    print(f"{'model':<24}{'tokens':>7}{'state':>10}{'slots':>10}{'live':>10}{'params':>10}"
          f"{'peak RSS':>10}")
    runs = []
    for model in tiny_configs():
        for n in MEASURED:
            out = subprocess.run([sys.executable, __file__, "--child", model, str(n),
                                  str(args.batch)], capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                raise SystemExit(f"measuring {model} at {n} tokens failed: "
                                 f"{out.stderr.strip().splitlines()[-1:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(f"{model:<24}{n:>7}{_mib(r['state_bytes']):>10}{_mib(r['slots_bytes']):>10}"
                  f"{_mib(r['live_bytes']):>10}{_mib(r['param_bytes']):>10}"
                  f"{_mib(r['peak_rss_bytes']):>10}")

    by = {(r["model"], r["tokens"]): r for r in runs}
    lo, hi = MEASURED

    def grow(model: str, key: str) -> float:
        return by[(model, hi)][key] / by[(model, lo)][key]

    rg, gm = "tiny-recurrentgemma", "tiny-gemma(same width)"
    summary = {
        "bench": "memory", **mach, "batch": args.batch,
        "rg_state_8k_over_1k": grow(rg, "state_bytes"),
        "rg_live_8k_over_1k": grow(rg, "live_bytes"),
        "rg_rss_8k_over_1k": grow(rg, "peak_rss_bytes"),
        # What grows besides the state: the engine's slot bookkeeping holds an int32 [B, L]
        # buffer of generated tokens, sized by the cache length L.
        "rg_live_growth_bytes": by[(rg, hi)]["live_bytes"] - by[(rg, lo)]["live_bytes"],
        "rg_slots_growth_bytes": by[(rg, hi)]["slots_bytes"] - by[(rg, lo)]["slots_bytes"],
        "gemma_state_8k_over_1k": grow(gm, "state_bytes"),
        "gemma_live_8k_over_1k": grow(gm, "live_bytes"),
        "gemma_rss_8k_over_1k": grow(gm, "peak_rss_bytes"),
        "eval_shape_rg_2b_state_8k_over_1k":
            table["recurrentgemma-2b/b1"]["8192"] / table["recurrentgemma-2b/b1"]["1024"],
        "eval_shape_gemma_2b_kv_mib_b1_8k": table["gemma-2b/b1"]["8192"] / 2**20,
    }
    sees_growth = summary["gemma_state_8k_over_1k"] >= 2 and summary["gemma_live_8k_over_1k"] >= 2
    summary["measurement_sees_growth"] = sees_growth
    summary["target_met"] = bool(sees_growth and summary["rg_state_8k_over_1k"] <= 1.1
                                 and summary["rg_live_8k_over_1k"] <= 1.1)
    summary["state_bytes"], summary["measured"] = table, runs
    print(f"\nmeasured 8K/1K: RecurrentGemma state {summary['rg_state_8k_over_1k']:.2f}x, live "
          f"{summary['rg_live_8k_over_1k']:.2f}x, peak RSS {summary['rg_rss_8k_over_1k']:.2f}x; "
          f"Gemma state {summary['gemma_state_8k_over_1k']:.2f}x, live "
          f"{summary['gemma_live_8k_over_1k']:.2f}x, peak RSS "
          f"{summary['gemma_rss_8k_over_1k']:.2f}x (target RecurrentGemma <= 1.1x while Gemma "
          f">= 2x: {'met' if summary['target_met'] else 'MISSED'}); {machine_line(mach)}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
