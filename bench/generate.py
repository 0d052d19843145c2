"""Generation throughput: ours vs Hugging Face transformers vs llama.cpp, plus a roofline.

Same weights (the embedded Gemma 3 270M GGUF, dequantized to float32 for us and HF; llama.cpp
runs the GGUF itself), same prompts (our token ids), greedy, every row generating exactly
`--max-new` tokens (stop tokens off), the same number of rows decoding together on both sides of
every ratio. Every engine is loaded and warmed up once, then all of them are timed in
alternating rounds (A B C ..., ... C B A, `--repeats` rounds), each timed call covering prefill
through the last token; figures are medians with their range. Prints the CPU model and SIMD
flags, a table and, as its last line, one JSON object with every figure.

    python bench/generate.py --quick      # < 15 min on 2 CPU cores
    python bench/generate.py              # more prompts and tokens

What is measured (B = --batch slots; the single-stream rows run --single prompts one by one):
  * ours: `Model.generate(..., stop_token_ids=[], max_batch=b)` at batch B (all prompts through
    B continuous-batching slots) and batch 1; float32, and the same weights cast to bfloat16 at
    batch B. Compile seconds cold (empty persistent cache) and warm (filled cache), each in a
    fresh subprocess, from the model's `engine.compile_log`, and the number of programs.
  * HF: `generate` (CPU torch, sdpa attention) float32 at batch B and 1, bfloat16 at batch B, on
    the same prompts and tokens as ours (`vs_hf`, `vs_hf_b1`, `vs_hf_bf16`).
  * llama.cpp (llama-cpp-python's low-level API, --llama-threads, default all cores): batched,
    one llama_batch with n_seq_max = B parallel sequences, one per prompt, decoding together
    (`vs_llamacpp_batched`, ours at batch B over it; `vs_llamacpp` is this one), and single
    stream, one sequence at a time (`vs_llamacpp_single`, ours at batch 1 over it); flash
    attention off and on, the faster of the two counts.
  * roofline: this machine's matmul FLOP/s (a large jnp.dot) and memory bandwidth (a large
    reduction, a copy and a matrix-vector product), against our decode step (bytes and FLOPs per
    step from the config): the bandwidth fraction at batch 1 (memory-bound) and the FLOP fraction
    at a large batch (`--large-batch`, compute-bound); `roofline_fraction` is the smaller of the
    two. The peaks are measured next to each decode-step measurement and their median is used
    (they drift with the load of the VM's neighbours). Batch B is reported too.
  * profile: one decode step split into forward, output projection and the rest (loop,
    sampling, bookkeeping).

The model must load: without `--random-weights` a failed load exits non-zero with one line
(random weights are benchmarked only when asked for, and then without llama.cpp, which runs
the real GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import interleaved, machine, machine_line, spread, timed

TEXTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea at night.",
    "Explain in simple words why the sky is blue.",
    "List three uses of copper in modern electronics:",
    "Once upon a time, in a village at the edge of a great forest, there lived an old baker who",
    "Summarize the plot of a detective story in which the butler is innocent.",
    "The main difference between a virus and a bacterium is",
    "Translate to French: The weather is lovely today and we are going to the beach.",
    "Q: What is the capital of Australia? A:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Dear hiring manager, I am writing to apply for the position of",
    "The three laws of thermodynamics can be stated as follows.",
    "A recipe for a simple tomato soup: first,",
    "In 1969, the first humans landed on the Moon. The mission",
    "Photosynthesis is the process by which plants",
    "Here is a list of the planets of the solar system, in order from the Sun:",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- ours


def load_ours(random_weights: bool):
    """The embedded Gemma 3 270M (float32); with --random-weights its config, random weights."""
    import jax
    import jax.numpy as jnp

    from model import Model, load_model, transformer
    from model.config import get_preset
    from model.tokenizer import ByteTokenizer

    if not random_weights:
        try:
            return load_model("gemma3-270m", dtype="float32")
        except Exception as e:  # noqa: BLE001 - any failure: one line, a non-zero exit
            msg = " ".join(str(e).split())
            raise SystemExit(f"bench/generate.py: cannot load gemma3-270m ({type(e).__name__}: "
                             f"{msg}); fix the install, or pass --random-weights to benchmark "
                             "random weights") from None
    cfg = get_preset("gemma3-270m")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    return Model("gemma3-270m-random", cfg, params, ByteTokenizer(cfg.vocab_size))


def our_prompts(model, n: int) -> list[list[int]]:
    tok = model.tokenizer
    out = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)] + ("" if i < len(TEXTS) else f" ({i})")
        ids = tok.encode(text, add_bos=True)
        out.append([min(t, model.config.vocab_size - 1) for t in ids])
    return out


def run_ours(model, prompts, max_new: int, max_batch: int):
    return model.generate(prompts, max_new_tokens=max_new, max_batch=max_batch,
                          stop_token_ids=[])


def compile_probe(args) -> None:
    """Subprocess: compiles the programs the timed runs use (zero weights); prints JSON."""
    import jax
    import jax.numpy as jnp

    from model import Model, transformer
    from model.config import get_preset
    from model.tokenizer import ByteTokenizer

    cfg = get_preset("gemma3-270m")
    shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    lengths = json.loads(args.probe_lengths)
    prompts = [[2] * n for n in lengths]
    t0 = time.perf_counter()
    m = Model("probe", cfg, params, ByteTokenizer(cfg.vocab_size))
    for b, ps in ((args.batch, prompts), (1, prompts[:1])):
        m.generate(ps, max_new_tokens=args.max_new, max_batch=b, stop_token_ids=[])
    log_ = m.engine.compile_log
    print(json.dumps({"compile_s": log_.seconds, "programs": log_.count,
                      "total_s": time.perf_counter() - t0,
                      "records": [(r.program, r.shapes, round(r.seconds, 2))
                                  for r in log_.records]}))


def compile_seconds(args, lengths: list[int], cache_dir: str) -> dict:
    env = dict(os.environ, GEMMA_BATCH_JAX_CACHE=cache_dir, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--probe", "--batch", str(args.batch), "--max-new",
           str(args.max_new), "--probe-lengths", json.dumps(lengths)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log(res.stderr[-2000:])
        return {"compile_s": float("nan"), "programs": -1}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- roofline


def measure_machine() -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda x, y: x @ y)
    dot(a, a).block_until_ready()
    best = min(timed(lambda: dot(a, a).block_until_ready())[0] for _ in range(5))
    flops = 2 * n ** 3 / best
    x = jnp.ones((128 * 1024 * 1024 // 4 * 4,), jnp.float32)  # 512 MiB
    red = jax.jit(jnp.sum)
    red(x).block_until_ready()
    t_red = min(timed(lambda: red(x).block_until_ready())[0] for _ in range(5))
    cp = jax.jit(lambda v: v * 2.0)
    cp(x).block_until_ready()
    t_cp = min(timed(lambda: cp(x).block_until_ready())[0] for _ in range(3))
    # A matrix-vector product streams a 512 MiB matrix with all cores (Eigen's gemv): the
    # access pattern of a batch-1 decode step.
    m = x.reshape(8192, -1)
    vec = jnp.ones((1, 8192), jnp.float32)
    mv = jax.jit(lambda a, b: a @ b)
    mv(vec, m).block_until_ready()
    t_mv = min(timed(lambda: mv(vec, m).block_until_ready())[0] for _ in range(5))
    bw_read = x.nbytes / t_red
    bw_copy = 2 * x.nbytes / t_cp
    bw_gemv = m.nbytes / t_mv
    return {"matmul_flops": flops, "bw_read": bw_read, "bw_copy": bw_copy, "bw_gemv": bw_gemv,
            "bandwidth": max(bw_read, bw_copy, bw_gemv)}


def step_cost(cfg, batch: int, length: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step of `batch` rows with caches of `length` slots."""
    d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.ffw_dim, cfg.vocab_size)
    layer_mats = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f
    mats = cfg.num_layers * layer_mats + v * d  # + output projection (tied embedding)
    slots = sum(min(cfg.sliding_window, length) if t == "local" else length
                for t in cfg.layer_types)
    kv_bytes = batch * slots * k * dh * 2 * 4
    param_bytes = 4 * cfg.num_params()
    flops = 2 * batch * mats + batch * slots * h * dh * 4  # q.k and p.v
    return param_bytes + kv_bytes, flops


def profile_step(model, batch: int, length: int, reps: int = 5) -> dict:
    """Seconds of one decode forward, of the output projection alone, and of the sampler."""
    import jax
    import jax.numpy as jnp

    from model.engine import sampling

    cfg, fam, params = model.config, model.family, model.params
    state = fam.init_state(cfg, batch, length, jnp.float32)
    tok = jnp.full((batch, 1), 10, jnp.int32)
    pos = jnp.full((batch, 1), 5, jnp.int32)
    fwd = jax.jit(lambda p, s: fam.forward(p, tok, pos, s, cfg), donate_argnums=(1,))
    x = jnp.ones((batch, 1, cfg.d_model), jnp.float32)
    head = jax.jit(lambda p: jnp.einsum("btd,vd->btv", x, p["embed"]))
    logits = jnp.ones((batch, cfg.vocab_size), jnp.float32)
    keys = jnp.zeros((batch, 2), jnp.uint32)
    zf, zi = jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)
    samp = jax.jit(lambda lg: sampling.sample_rows(lg, keys, zf, zi, zf + 1))
    out = {}
    box = [state]

    def step():  # the state is donated and carried, as in the decode loop
        lg, box[0] = fwd(params, box[0])
        return lg

    for name, fn in (("forward", step), ("out_proj", lambda: head(params)),
                     ("sample", lambda: samp(logits))):
        fn().block_until_ready()
        out[name] = statistics.median(timed(lambda fn=fn: fn().block_until_ready())[0]
                                      for _ in range(reps))
    return out


def decode_step_seconds(model, prompts, batch: int, short: int, long: int, reps: int) -> float:
    """Decode seconds per step: (time of `long` tokens - time of `short`) / (long - short),
    the two lengths timed alternately, medians of `reps`."""
    run_ours(model, prompts, short, batch)
    run_ours(model, prompts, long, batch)
    secs, _ = interleaved({"short": lambda: run_ours(model, prompts, short, batch),
                           "long": lambda: run_ours(model, prompts, long, batch)}, reps)
    t_s, t_l = statistics.median(secs["short"]), statistics.median(secs["long"])
    return max(t_l - t_s, 1e-9) / (long - short)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first difference."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        fr.append(n / max(len(x), 1))
    return sum(fr) / max(len(fr), 1)


# ----------------------------------------------------------------------------------- main


def comparisons(args, model, prompts: list[list[int]], tmp: Path) -> tuple[dict, dict]:
    """Every engine on the same work, timed in alternating rounds; (results, tokens per side)."""
    import jax
    import jax.numpy as jnp
    import peers

    from model import Model

    B, new, single = args.batch, args.max_new, prompts[:args.single]
    m16 = Model(model.name + "-bf16", model.config,
                jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model.params),
                model.tokenizer)
    # side -> (rows x tokens it generates, the call)
    sides: dict[str, tuple[int, object]] = {
        "ours": (len(prompts), lambda: [g.tokens for g in run_ours(model, prompts, new, B)]),
        "ours_b1": (len(single), lambda: [run_ours(model, [p], new, 1)[0].tokens
                                          for p in single]),
        "ours_bf16": (len(prompts), lambda: [g.tokens for g in run_ours(m16, prompts, new, B)]),
    }
    closers = []
    if not args.skip_hf:
        log("transformers: loading float32 and bfloat16 ...")
        path = peers.build_hf(model, tmp / "hf")
        hf32, hf16 = peers.HF(path, "float32"), peers.HF(path, "bfloat16")
        sides["hf"] = (len(prompts), lambda: hf32.generate(prompts, new, B))
        sides["hf_b1"] = (len(single), lambda: hf32.generate(single, new, 1))
        sides["hf_bf16"] = (len(prompts), lambda: hf16.generate(prompts, new, B))
    if not args.skip_llamacpp and not args.random_weights:
        from model.embedded import embedded_gguf_path

        log("llama.cpp: batched and single-stream contexts ...")
        ctx = max(map(len, prompts)) + new + 8
        for fa in (False, True):
            tag = "fa" if fa else "nofa"
            batched = peers.LlamaCpp(embedded_gguf_path(), B, ctx, fa, args.llama_threads)
            one = peers.LlamaCpp(embedded_gguf_path(), 1, ctx, fa, args.llama_threads)
            closers += [batched, one]
            sides[f"llamacpp_batched_{tag}"] = (len(prompts),
                                                lambda b=batched: b.generate(prompts, new))
            sides[f"llamacpp_single_{tag}"] = (len(single), lambda o=one: o.generate(single, new))
    for name, (_, fn) in sides.items():  # warm up every side once (compiles, caches)
        w, _ = timed(fn)
        log(f"warm-up {name}: {w:.1f} s")
    log(f"timing {len(sides)} engines, {args.repeats} alternating rounds ...")
    secs, toks = interleaved({k: fn for k, (_, fn) in sides.items()}, args.repeats)
    res = {k: spread(secs[k], rows * new) for k, (rows, _) in sides.items()}
    for c in closers:
        c.close()
    return res, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (< 15 min)")
    ap.add_argument("--batch", type=int, default=16,
                    help="decode slots: ours, HF's batch and llama.cpp's parallel sequences")
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating timed rounds of every engine (medians)")
    ap.add_argument("--large-batch", type=int, default=256,
                    help="decode batch for the compute-bound (FLOP) roofline")
    ap.add_argument("--prompts", type=int, default=None, help="number of prompts")
    ap.add_argument("--single", type=int, default=None,
                    help="prompts of the single-stream (batch 1) runs")
    ap.add_argument("--max-new", type=int, default=None, help="tokens generated per prompt")
    ap.add_argument("--random-weights", action="store_true",
                    help="benchmark the gemma3-270m config with random weights (no llama.cpp)")
    ap.add_argument("--llama-threads", type=int, default=None,
                    help="llama.cpp threads (default: all cores)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument("--recurrentgemma", action="store_true",
                    help="instead: RecurrentGemma vs Gemma decode tokens/s at 1K and 8K context "
                         "(runs bench/griffin_speed.py)")
    ap.add_argument("--constrained", action="store_true",
                    help="instead: decode tokens/s with a JSON-schema output format vs "
                         "unconstrained (runs bench/constrained.py)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-lengths", default="[]", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.recurrentgemma or args.constrained:
        import runpy

        script = "griffin_speed.py" if args.recurrentgemma else "constrained.py"
        sys.argv = [str(Path(__file__).with_name(script)), *rest]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return None
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.probe:
        args.max_new = args.max_new or 32
        return compile_probe(args)
    n_prompts = args.prompts or (16 if args.quick else 64)
    args.max_new = args.max_new or (32 if args.quick else 64)
    args.single = args.single or (2 if args.quick else 8)
    mach = machine()
    log(machine_line(mach))
    res: dict = {"bench": "generate", **mach, "quick": args.quick, "batch": args.batch,
                 "prompts": n_prompts, "single_stream_prompts": args.single,
                 "max_new_tokens": args.max_new, "repeats": args.repeats}
    t_start = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="gemma-batch-bench-"))
    probe_cache = str(tmp / "probe-cache")
    # The timed runs reuse the cache the probes filled (set before the engine turns it on).
    os.environ["GEMMA_BATCH_JAX_CACHE"] = probe_cache
    import jax  # noqa: F401 - initialised after the cache variable is set

    log("loading model ...")
    t_load, model = timed(lambda: load_ours(args.random_weights))
    res.update(model=model.name, real_weights=not args.random_weights, load_s=round(t_load, 1))
    prompts = our_prompts(model, n_prompts)
    lengths = [len(p) for p in prompts]
    res["prompt_tokens_mean"] = sum(lengths) / len(lengths)

    log("compile: cold and warm persistent cache (subprocesses) ...")
    cold = compile_seconds(args, lengths, probe_cache)
    warm = compile_seconds(args, lengths, probe_cache)
    res.update(compile_cold_s=round(cold["compile_s"], 2),
               compile_warm_s=round(warm["compile_s"], 2), programs=cold["programs"])
    log(json.dumps(res))

    eng, toks = comparisons(args, model, prompts, tmp)
    for k, v in eng.items():
        res[f"{k}_tok_s"] = round(v["median"], 2)
        res[f"{k}_tok_s_range"] = [round(v["min"], 2), round(v["max"], 2)]

    def best(prefix: str) -> str | None:  # the faster flash-attention setting of a llama side
        keys = [k for k in eng if k.startswith(prefix)]
        return max(keys, key=lambda k: eng[k]["median"]) if keys else None

    def ratio(ours: str, peer: str | None) -> float | None:
        return round(eng[ours]["median"] / eng[peer]["median"], 2) if peer in eng else None

    lb, ls = best("llamacpp_batched_"), best("llamacpp_single_")
    res.update(
        vs_hf=ratio("ours", "hf"), vs_hf_b1=ratio("ours_b1", "hf_b1"),
        vs_hf_bf16=ratio("ours_bf16", "hf_bf16"),
        llamacpp_batched_tok_s=res.get(f"{lb}_tok_s"), llamacpp_single_tok_s=res.get(f"{ls}_tok_s"),
        llamacpp_batched_flash=None if lb is None else lb.endswith("_fa"),
        llamacpp_single_flash=None if ls is None else ls.endswith("_fa"),
        vs_llamacpp_batched=ratio("ours", lb), vs_llamacpp_single=ratio("ours_b1", ls))
    res["vs_llamacpp"] = res["vs_llamacpp_batched"]
    ours_tok = toks["ours"]
    # Batch composition must not change greedy results: batch 1 vs batch B, same rows.
    res["b1_vs_batch_agreement"] = round(agreement(toks["ours_b1"], ours_tok[:args.single]), 3)
    res["ours_bf16_agreement"] = round(agreement(toks["ours_bf16"], ours_tok), 3)
    if "hf" in toks:
        res["hf_agreement"] = round(agreement(ours_tok, toks["hf"]), 3)
    if lb is not None:
        res["llamacpp_batched_agreement"] = round(agreement(ours_tok, toks[lb]), 3)
        res["llamacpp_single_agreement"] = round(agreement(toks["ours_b1"], toks[ls]), 3)
    log(json.dumps(res))

    prof: dict = {}
    samples: list[dict] = []
    if not args.skip_roofline:
        prof, samples = roofline(args, model, lengths, res)
    res["bench_s"] = round(time.perf_counter() - t_start, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    report(args, res, eng, prof, samples, mach)


def roofline(args, model, lengths: list[int], res: dict) -> tuple[dict, list[dict]]:
    """Decode-step times at batch 1, B and --large-batch against this machine's peaks."""
    log("machine roofline ...")
    # This machine's peaks drift with its neighbours' load (bandwidth 40-68 GB/s across runs):
    # it is measured again next to every decode-step measurement and the median is used.
    samples = [measure_machine()]
    B, LB = args.batch, args.large_batch
    length = model.engine.buckets.length_bucket(max(lengths) + args.max_new)
    prof = {}
    many = our_prompts(model, max(LB, B))
    for b in sorted({1, B, LB}):
        reps = 2 if b == LB else 3  # the large batch is slow; medians of fewer repeats
        step = decode_step_seconds(model, many[:b], b, 4, 4 + (16 if args.quick else 32), reps)
        samples.append(measure_machine())
        prof[b] = {"step_ms": step * 1e3, **{k + "_ms": v * 1e3
                                             for k, v in profile_step(model, b, length).items()}}
    mach = {k: statistics.median(m[k] for m in samples) for k in samples[0]}
    res.update(matmul_gflops=round(mach["matmul_flops"] / 1e9, 1),
               bandwidth_gbs=round(mach["bandwidth"] / 1e9, 2),
               bw_read_gbs=round(mach["bw_read"] / 1e9, 2),
               bw_copy_gbs=round(mach["bw_copy"] / 1e9, 2),
               bw_gemv_gbs=round(mach["bw_gemv"] / 1e9, 2),
               bandwidth_range_gbs=[round(min(m["bandwidth"] for m in samples) / 1e9, 1),
                                    round(max(m["bandwidth"] for m in samples) / 1e9, 1)],
               matmul_range_gflops=[round(min(m["matmul_flops"] for m in samples) / 1e9, 1),
                                    round(max(m["matmul_flops"] for m in samples) / 1e9, 1)])
    for b, p in prof.items():
        nbytes, flops = step_cost(model.config, b, length)
        t_mem, t_flop = nbytes / mach["bandwidth"], flops / mach["matmul_flops"]
        step = p["step_ms"] / 1e3
        p.update(mem_bound_ms=t_mem * 1e3, flop_bound_ms=t_flop * 1e3,
                 binding="memory" if t_mem > t_flop else "compute",
                 fraction=max(t_mem, t_flop) / step, bw_fraction=t_mem / step,
                 flop_fraction=t_flop / step)
    res["roofline_bw_b1"] = round(prof[1]["bw_fraction"], 3)
    res["roofline_flops_large"] = round(prof[LB]["flop_fraction"], 3)
    res["roofline_fraction"] = min(res["roofline_bw_b1"], res["roofline_flops_large"])
    res["roofline_fraction_batch"] = round(prof[B]["fraction"], 3)  # binding bound at batch B
    res["ours_large_decode_tok_s"] = round(LB / (prof[LB]["step_ms"] / 1e3), 1)
    res["profile"] = {str(b): {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in p.items()} for b, p in prof.items()}
    return prof, samples


def report(args, res: dict, eng: dict, prof: dict, samples: list[dict], mach: dict) -> None:
    B = args.batch
    names = [("ours", f"ours fp32 batch {B}"), ("ours_b1", "ours fp32 batch 1"),
             ("ours_bf16", f"ours bf16 batch {B}"), ("hf", f"HF fp32 batch {B}"),
             ("hf_b1", "HF fp32 batch 1"), ("hf_bf16", f"HF bf16 batch {B}"),
             ("llamacpp_batched_nofa", f"llama.cpp {B} seqs, FA off"),
             ("llamacpp_batched_fa", f"llama.cpp {B} seqs, FA on"),
             ("llamacpp_single_nofa", "llama.cpp 1 seq, FA off"),
             ("llamacpp_single_fa", "llama.cpp 1 seq, FA on")]
    print(machine_line(mach))
    print(f"{'engine':<28}{'tokens/s':>10}{'range':>18}   (median of {args.repeats} "
          "alternating rounds)")
    for k, name in names:
        if k in eng:
            v = eng[k]
            span = f"{v['min']:.1f}-{v['max']:.1f}"
            print(f"{name:<28}{v['median']:>10.1f}{span:>18}")
    print(f"ours / HF: batch {B} {res['vs_hf']}, batch 1 {res['vs_hf_b1']}, bf16 batch {B} "
          f"{res['vs_hf_bf16']}")
    print(f"ours / llama.cpp: batched ({B} slots vs {B} sequences) {res['vs_llamacpp_batched']}, "
          f"single stream {res['vs_llamacpp_single']}")
    print(f"compile: cold {res['compile_cold_s']}s, warm {res['compile_warm_s']}s, "
          f"{res['programs']} programs")
    if prof:
        print(f"machine (median of {len(samples)} measurements): matmul "
              f"{res['matmul_gflops']} GFLOP/s (range {res['matmul_range_gflops']}), "
              f"bandwidth {res['bandwidth_gbs']} GB/s (range {res['bandwidth_range_gbs']})")
        for b, p in prof.items():
            print(f"decode step batch {b}: {p['step_ms']:.1f} ms (bound {p['binding']} "
                  f"{max(p['mem_bound_ms'], p['flop_bound_ms']):.1f} ms -> {p['fraction']:.0%});"
                  f" forward {p['forward_ms']:.1f} ms, of which output projection "
                  f"{p['out_proj_ms']:.1f} ms; sampler {p['sample_ms']:.2f} ms")
        print(f"roofline: bandwidth at batch 1 {res['roofline_bw_b1']:.0%}, FLOPs at batch "
              f"{args.large_batch} {res['roofline_flops_large']:.0%} (decode "
              f"{res['ours_large_decode_tok_s']} tok/s)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
