"""Generation-state memory: RecurrentGemma's fixed-size state vs Gemma's growing KV cache.

1. Bytes of the generation state of recurrentgemma-2b and gemma-2b shapes (bfloat16 caches; the
   RG-LRU state is float32) at 1K..32K tokens, batch 1 and 32, from `jax.eval_shape` (nothing
   is allocated, no weights needed).
2. Measured: a tiny-config run (chunked prefill of N tokens carrying the state, then 16 decode
   steps) at 1K and 8K tokens, each in a fresh process, for tiny RecurrentGemma and a tiny Gemma
   of the same width. Reported: the bytes of live device buffers after the run (params + state +
   outputs), the compiled step's own footprint (XLA memory analysis: arguments + outputs +
   temporaries) and the process's peak RSS.

    python bench/memory.py            # ~1 min on 2 CPU cores

Prints a table and, as its last line, one JSON object. Target: RecurrentGemma's state at 8K is
<= 1.1x its state at 1K.
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

LENGTHS = (1024, 2048, 4096, 8192, 32_768)
BATCHES = (1, 32)
CHUNK = 512
DECODE = 16


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def state_bytes(name: str, batch: int, length: int) -> int:
    """Generation-state bytes of preset `name` for `batch` rows of `length` tokens."""
    import jax
    import jax.numpy as jnp

    from model import griffin, transformer
    from model.config import PRESETS, GriffinConfig

    cfg = PRESETS[name]
    fam = griffin if isinstance(cfg, GriffinConfig) else transformer
    shapes = jax.eval_shape(lambda: fam.init_state(cfg, batch, length, jnp.bfloat16))
    return _tree_bytes(shapes)


def tiny_configs():
    """tiny-recurrentgemma and a Gemma (global attention, as gemma-2b) of the same width."""
    from model.config import PRESETS, GemmaConfig

    rg = PRESETS["tiny-recurrentgemma"]
    gm = GemmaConfig(family="gemma", vocab_size=rg.vocab_size, d_model=rg.d_model,
                     num_layers=rg.num_layers, num_heads=rg.num_heads, num_kv_heads=1,
                     head_dim=rg.head_dim, ffw_dim=rg.ffw_dim,
                     layer_types=("global",) * rg.num_layers, query_pre_attn_scalar=rg.head_dim,
                     max_seq_len=65_536)
    return {"tiny-recurrentgemma": rg, "tiny-gemma(same width)": gm}


def measure(model: str, length: int) -> dict:
    """Runs one tiny model over `length` tokens (chunked prefill + decode); reports memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import griffin, transformer
    from model.config import GriffinConfig

    cfg = tiny_configs()[model]
    fam = griffin if isinstance(cfg, GriffinConfig) else transformer
    params = fam.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    state = fam.init_state(cfg, 1, length + DECODE, jnp.float32)
    step = jax.jit(lambda p, t, pos, s: fam.forward(p, t, pos, s, cfg), donate_argnums=3)
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 256, (1, CHUNK)), jnp.int32)
    chunk_prog = step.lower(params, toks, toks, state).compile().memory_analysis()
    for start in range(0, length, CHUNK):
        pos = jnp.arange(start, start + CHUNK, dtype=jnp.int32)[None]
        logits, state = step(params, toks, pos, state)
    tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    for i in range(DECODE):
        logits, state = step(params, tok, jnp.full((1, 1), length + i, jnp.int32), state)
        tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    jax.block_until_ready(state)
    live = sum(a.nbytes for a in jax.live_arrays())
    prog = None
    if chunk_prog is not None:
        prog = int(chunk_prog.argument_size_in_bytes + chunk_prog.output_size_in_bytes
                   + chunk_prog.temp_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    return {"model": model, "tokens": length, "state_bytes": _tree_bytes(state),
            "live_bytes": int(live), "chunk_program_bytes": prog,
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return

    table = {}
    print("Generation state (bfloat16 caches, float32 RG-LRU state), MiB, via jax.eval_shape")
    print(f"{'model':<20}{'batch':>6}" + "".join(f"{n // 1024:>9}K" for n in LENGTHS)
          + f"{'8K/1K':>8}")
    for name in ("recurrentgemma-2b", "gemma-2b"):
        for b in BATCHES:
            row = [state_bytes(name, b, n) for n in LENGTHS]
            table[f"{name}/b{b}"] = dict(zip(map(str, LENGTHS), row))
            print(f"{name:<20}{b:>6}" + "".join(f"{_mib(x):>10}" for x in row)
                  + f"{row[3] / row[0]:>8.2f}")

    print(f"\nMeasured: tiny configs, chunked prefill ({CHUNK}/chunk) + {DECODE} decode steps, "
          "fresh process each (MiB)")
    print(f"{'model':<24}{'tokens':>7}{'state':>10}{'live':>10}{'program':>10}{'peak RSS':>10}")
    runs = []
    for model in tiny_configs():
        for n in (1024, 8192):
            out = subprocess.run([sys.executable, __file__, "--child", model, str(n)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(f"{model:<24}{n:>7}{_mib(r['state_bytes']):>10}{_mib(r['live_bytes']):>10}"
                  f"{_mib(r['chunk_program_bytes']):>10}{_mib(r['peak_rss_bytes']):>10}")

    rg = table["recurrentgemma-2b/b1"]
    gm = table["gemma-2b/b1"]
    by = {(r["model"], r["tokens"]): r for r in runs}
    tiny_rg = [by[("tiny-recurrentgemma", n)] for n in (1024, 8192)]
    tiny_gm = [by[("tiny-gemma(same width)", n)] for n in (1024, 8192)]
    summary = {
        "rg_state_8k_over_1k": rg["8192"] / rg["1024"],
        "gemma_state_8k_over_1k": gm["8192"] / gm["1024"],
        "rg_2b_state_mib_b1": rg["8192"] / 2**20,
        "gemma_2b_kv_mib_b1_8k": gm["8192"] / 2**20,
        "tiny_rg_live_8k_over_1k": tiny_rg[1]["live_bytes"] / tiny_rg[0]["live_bytes"],
        "tiny_gemma_live_8k_over_1k": tiny_gm[1]["live_bytes"] / tiny_gm[0]["live_bytes"],
        "tiny_rg_rss_8k_over_1k": tiny_rg[1]["peak_rss_bytes"] / tiny_rg[0]["peak_rss_bytes"],
        "target_met": rg["8192"] <= 1.1 * rg["1024"],
        "state_bytes": table, "measured": runs,
    }
    print(f"\nRecurrentGemma-2B state 8K/1K = {summary['rg_state_8k_over_1k']:.2f}x "
          f"(target <= 1.1x: {'met' if summary['target_met'] else 'MISSED'}); "
          f"Gemma-2B KV 8K/1K = {summary['gemma_state_8k_over_1k']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
