"""Sharded generation: tokens/s on meshes (1, 8), (2, 4), (8, 1) against one device, on 8
simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, in a subprocess).

One worker process with 8 devices holds the same random weights four ways: on device 0 alone
(no mesh) and on the three meshes (model.sharding), and times greedy `Model.generate` of the same
prompts on each, interleaved (A B C D, D C B A, ...), after one warm-up call each (compiles).
It checks that every side generated the same tokens. A second worker in a plain 1-device process
times the same work alone, to show what the in-process one-device figure is worth.

    python bench/shard.py --quick     # tiny-gemma3, seconds
    python bench/shard.py             # gemma3-270m shapes, random float32 weights (~10 GB RAM)

Informative only: the 8 CPU "devices" share this machine's cores (2 here), so a mesh cannot be
faster than one device by having more silicon; the ratios show what the collectives and the
split programs cost. Prints the CPU, a table of medians and ranges, and one JSON line last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import interleaved, machine, machine_line, spread

MESHES = ((1, 8), (2, 4), (8, 1))
ONE = "1 device"


def _worker(args: argparse.Namespace) -> None:
    """Builds the sides, warms them up, times them interleaved; prints one JSON line."""
    import jax
    import numpy as np

    from model import sharding
    from model.api import Model
    from model.config import get_preset
    from model.family import family_of
    from model.tokenizer import ByteTokenizer

    cfg = get_preset(args.model)
    host = jax.device_get(family_of(cfg).init_params(cfg, jax.random.PRNGKey(0)))
    tok = ByteTokenizer(cfg.vocab_size)
    rng = np.random.default_rng(0)
    prompts = [[2] + rng.integers(4, min(cfg.vocab_size, 300), args.prompt_len - 1).tolist()
               for _ in range(args.rows)]
    models = {ONE: Model(args.model, cfg, jax.device_put(host, jax.devices()[0]), tok)}
    if not args.single:
        for d, m in MESHES:
            models[f"mesh {d}x{m}"] = Model(args.model, cfg, host, tok,
                                            mesh=sharding.make_mesh((d, m)))

    def run(model: Model) -> list[list[int]]:
        outs = model.generate(prompts, max_new_tokens=args.new, max_batch=args.batch,
                              stop_token_ids=[])
        return [g.tokens for g in outs]

    first = {name: run(m) for name, m in models.items()}  # warm-up: compiles every program
    n_tokens = sum(map(len, first[ONE]))
    secs, _ = interleaved({name: (lambda m=m: run(m)) for name, m in models.items()},
                          args.repeats)
    print(json.dumps({
        "devices": len(jax.devices()), "tokens": n_tokens,
        "digest": hashlib.sha256(json.dumps(first[ONE]).encode()).hexdigest()[:16],
        "tokens_equal": all(t == first[ONE] for t in first.values()),
        "sides": {name: {**spread(secs[name], n_tokens), "mesh": m.info["mesh"],
                         "param_bytes_per_device": m.info["param_bytes_per_device"],
                         "programs": m.engine.compile_log.count,
                         "compile_s": round(m.engine.compile_log.seconds, 2)}
                  for name, m in models.items()}}))


def _spawn(args: argparse.Namespace, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]))
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--rows", str(args.rows),
           "--prompt-len", str(args.prompt_len), "--new", str(args.new), "--batch",
           str(args.batch), "--repeats", str(args.repeats)] + (["--single"] if devices == 1
                                                                else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"bench/shard.py: the {devices}-device worker failed:\n"
                         f"{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m", help="preset whose shapes to use "
                    "(random weights)")
    ap.add_argument("--rows", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--batch", type=int, default=16, help="decode slots (max_batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny-gemma3, 16 rows, 16 new tokens")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    if args.quick:
        args.model, args.prompt_len, args.new = "tiny-gemma3", 24, 16

    m = machine()
    print(machine_line(m))
    print(f"{args.model} (random float32 weights), {args.rows} prompts of {args.prompt_len} "
          f"tokens, {args.new} new each, {args.batch} slots, {args.repeats} interleaved repeats")
    eight = _spawn(args, 8)
    alone = _spawn(args, 1)
    base = eight["sides"][ONE]["median"]
    print(f"\n{'side':<22}{'tok/s median':>13}{'range':>20}{'vs 1 device':>13}"
          f"{'param MB/device':>17}")
    rows = [(name, s) for name, s in eight["sides"].items()]
    rows.append(("1 device, own process", alone["sides"][ONE]))
    ratios = {}
    for name, s in rows:
        ratios[name] = s["median"] / base
        span = f"{s['min']:.1f}-{s['max']:.1f}"
        print(f"{name:<22}{s['median']:>13.1f}{span:>20}{ratios[name]:>12.2f}x"
              f"{s['param_bytes_per_device'] / 1e6:>17.2f}")
    same = eight["tokens_equal"] and eight["digest"] == alone["digest"]
    print(f"\ngreedy tokens identical on every side: {same}; programs compiled "
          f"per side: {sorted({s['programs'] for s in eight['sides'].values()})}")
    print("(8 simulated devices share the machine's cores: informative, not a speed-up claim)")
    print(json.dumps({"bench": "shard", "machine": m, "model": args.model, "rows": args.rows,
                      "prompt_len": args.prompt_len, "new_tokens": args.new,
                      "batch": args.batch, "repeats": args.repeats,
                      "tokens_equal": same,
                      "tok_s": {name: round(s["median"], 2) for name, s in rows},
                      "ratio_vs_one_device": {k: round(v, 3) for k, v in ratios.items()},
                      "sides": dict(rows)}))


if __name__ == "__main__":
    main()
