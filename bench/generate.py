"""Generation throughput: ours vs Hugging Face transformers vs llama.cpp, plus a roofline.

Same weights (the embedded Gemma 3 270M GGUF, dequantized to float32 for us and HF; llama.cpp
runs the GGUF itself), same prompts (our token ids), greedy, every row generating exactly
`--max-new` tokens (stop tokens off), one run; every throughput is the best of `--repeats` timed
runs (3) for every engine alike. Prints a table and, as its last line, one JSON object with every
figure.

    python bench/generate.py --quick      # < 15 min on 2 CPU cores
    python bench/generate.py              # more prompts and tokens

What is measured:
  * ours: `Model.generate` (model/engine/) at batch 1 (prompts one by one) and batch B (all prompts
    through B continuous-batching slots); tokens/s = generated tokens / wall time (prefill
    included). Compile seconds cold (empty persistent cache) and warm (filled cache), each in a
    fresh subprocess, and the number of programs.
    The same weights cast to bfloat16 at batch B (`ours_bf16_tok_s`, `vs_hf_bf16`).
  * HF: `generate` (CPU torch, sdpa attention, float32 and bfloat16) at batch 1 and batch B.
  * llama.cpp (llama-cpp-python, all cores): the prompts one after another, flash attention off
    and on; aggregate tokens/s.
  * roofline: this machine's matmul FLOP/s (a large jnp.dot) and memory bandwidth (a large
    reduction, a copy and a matrix-vector product), against our decode step (bytes and FLOPs per
    step from the config): the bandwidth fraction at batch 1 (memory-bound) and the FLOP fraction
    at a large batch (`--large-batch`, compute-bound); `roofline_fraction` is the smaller of the
    two. The peaks are measured next to each decode-step measurement and their median is used
    (they drift with the load of the VM's neighbours). Batch B is reported too (for a 270M model
    at batch 16 neither bound dominates).
  * profile: one decode step split into forward, output projection and the rest (loop,
    sampling, bookkeeping).
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


def best_of(n: int, fn, *args, **kw) -> tuple[float, object]:
    """(fastest wall seconds of `n` calls, the first call's result)."""
    results = [timed(fn, *args, **kw) for _ in range(max(1, n))]
    return min(t for t, _ in results), results[0][1]


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------------- ours


def load_ours(random_weights: bool):
    """The embedded Gemma 3 270M (or, with --random, its config with random weights)."""
    import jax
    import jax.numpy as jnp

    from model import load_model
    from model.api import Model
    from model.config import get_preset
    from model.tokenizer import ByteTokenizer

    if not random_weights:
        try:
            return load_model("gemma3-270m", dtype="float32"), True
        except Exception as e:  # noqa: BLE001 - fall back to a fixed random model
            log(f"load_model('gemma3-270m') failed ({e}); using random weights")
    from model import transformer

    cfg = get_preset("gemma3-270m")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    return Model("gemma3-270m-random", cfg, params, ByteTokenizer(cfg.vocab_size)), False


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
        out[name] = min(timed(lambda: fn().block_until_ready())[0] for _ in range(reps))
    return out


def decode_step_seconds(model, prompts, batch: int, short: int, long: int, reps: int) -> float:
    """Decode seconds per step: (time of `long` tokens - time of `short`) / (long - short)."""
    run_ours(model, prompts, short, batch)
    t_s = min(timed(run_ours, model, prompts, short, batch)[0] for _ in range(reps))
    t_l = min(timed(run_ours, model, prompts, long, batch)[0] for _ in range(reps))
    return max(t_l - t_s, 1e-9) / (long - short)


# ----------------------------------------------------------------------------------- HF


def build_hf(model, tmp: Path):
    """The same weights as a transformers Gemma3ForCausalLM (saved, then from_pretrained)."""
    import numpy as np
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg, p = model.config, model.params
    h, k, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    types = ["full_attention" if t == "global" else "sliding_attention" for t in cfg.layer_types]
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=cfg.ffw_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=h, num_key_value_heads=k,
        head_dim=dh, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
        sliding_window=cfg.sliding_window,
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
        layer_types=types, hidden_activation="gelu_pytorch_tanh", bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local},
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global}},
        architectures=["Gemma3ForCausalLM"])

    def t(x) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))

    sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"])}
    for i, L in enumerate(p["layers"]):
        a, m, n = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
        sd[a + "q_proj.weight"] = t(np.asarray(L["q"]).transpose(1, 2, 0).reshape(h * dh, d))
        sd[a + "k_proj.weight"] = t(np.asarray(L["k"]).transpose(1, 2, 0).reshape(k * dh, d))
        sd[a + "v_proj.weight"] = t(np.asarray(L["v"]).transpose(1, 2, 0).reshape(k * dh, d))
        sd[a + "o_proj.weight"] = t(np.asarray(L["o"]).transpose(2, 0, 1).reshape(d, h * dh))
        sd[a + "q_norm.weight"], sd[a + "k_norm.weight"] = t(L["q_norm"]), t(L["k_norm"])
        sd[m + "gate_proj.weight"] = t(np.asarray(L["gate"]).T)
        sd[m + "up_proj.weight"] = t(np.asarray(L["up"]).T)
        sd[m + "down_proj.weight"] = t(np.asarray(L["down"]).T)
        sd[n + "input_layernorm.weight"] = t(L["attn_norm"])
        sd[n + "post_attention_layernorm.weight"] = t(L["post_attn_norm"])
        sd[n + "pre_feedforward_layernorm.weight"] = t(L["ffw_norm"])
        sd[n + "post_feedforward_layernorm.weight"] = t(L["post_ffw_norm"])
    hf_cfg.save_pretrained(tmp)
    save_file(sd, str(tmp / "model.safetensors"))
    del sd
    return tmp


def run_hf(path: Path, prompts, max_new: int, batch: int, dtype: str,
           repeats: int = 1) -> tuple[float, list]:
    """Seconds to generate for all prompts, `batch` at a time (left padding), and the tokens."""
    import torch
    import transformers

    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype,
                                                           attn_implementation="sdpa")
    hf.eval()

    def gen(group):
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(g)) + g for g in group])
        mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                              min_new_tokens=max_new, do_sample=False, pad_token_id=0,
                              top_k=None, top_p=None, temperature=None)
        return out[:, width:].tolist()

    gen(prompts[:batch])  # warm up
    dt = float("inf")
    for _ in range(repeats):  # best of `repeats`
        t0 = time.perf_counter()
        toks = []
        for i in range(0, len(prompts), batch):
            toks += gen(prompts[i:i + batch])
        dt = min(dt, time.perf_counter() - t0)
    del hf
    return dt, toks


# ----------------------------------------------------------------------------------- llama.cpp


def run_llamacpp(gguf: Path, prompts, max_new: int, flash: bool,
                 repeats: int = 1) -> tuple[float, list]:
    import itertools

    import llama_cpp

    n = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_batch=128, n_threads=n,
                          n_threads_batch=n, flash_attn=flash, verbose=False)

    def one(p):
        return list(itertools.islice(
            llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                         reset=True), max_new))

    one(prompts[0][:8])  # warm up
    dt = float("inf")
    for _ in range(repeats):  # best of `repeats`
        t0 = time.perf_counter()
        toks = [one(p) for p in prompts]
        dt = min(dt, time.perf_counter() - t0)
    del llm
    return dt, toks


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first difference."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        fr.append(n / max(len(x), 1))
    return sum(fr) / max(len(fr), 1)


# ----------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (< 15 min)")
    ap.add_argument("--batch", type=int, default=16, help="our / HF batch size")
    ap.add_argument("--repeats", type=int, default=3,
                    help="every throughput is the best of this many timed runs (all engines)")
    ap.add_argument("--large-batch", type=int, default=256,
                    help="decode batch for the compute-bound (FLOP) roofline")
    ap.add_argument("--prompts", type=int, default=None, help="number of prompts")
    ap.add_argument("--max-new", type=int, default=None, help="tokens generated per prompt")
    ap.add_argument("--random", action="store_true", help="random weights (gemma3-270m config)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--recurrentgemma", action="store_true",
                    help="instead: RecurrentGemma vs Gemma decode tokens/s at 1K and 8K context "
                         "(runs bench/griffin_speed.py)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-lengths", default="[]", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.recurrentgemma:
        import runpy

        sys.argv = [str(Path(__file__).with_name("griffin_speed.py")), *rest]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return None
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.probe:
        args.max_new = args.max_new or 32
        return compile_probe(args)
    n_prompts = args.prompts or (16 if args.quick else 64)
    args.max_new = args.max_new or (32 if args.quick else 64)
    n_single = 2 if args.quick else 8  # prompts run one at a time (batch 1)
    n_llama = 8 if args.quick else n_prompts  # llama.cpp runs prompts one after another
    res: dict = {"quick": args.quick, "batch": args.batch, "prompts": n_prompts,
                 "max_new_tokens": args.max_new, "cpu_count": os.cpu_count()}
    t_start = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="gemma-batch-bench-"))
    probe_cache = str(tmp / "probe-cache")
    # The timed runs reuse the cache the probes filled (set before the engine turns it on).
    os.environ["GEMMA_BATCH_JAX_CACHE"] = probe_cache
    import jax  # noqa: F401

    log("loading model ...")
    t_load, (model, real) = timed(load_ours, args.random)
    res.update(model=model.name, real_weights=real, load_s=round(t_load, 1))
    prompts = our_prompts(model, n_prompts)
    lengths = [len(p) for p in prompts]
    res["prompt_tokens_mean"] = sum(lengths) / len(lengths)

    log("compile: cold and warm persistent cache (subprocesses) ...")
    cold = compile_seconds(args, lengths, probe_cache)
    warm = compile_seconds(args, lengths, probe_cache)
    res.update(compile_cold_s=round(cold["compile_s"], 2),
               compile_warm_s=round(warm["compile_s"], 2), programs=cold["programs"])

    log(json.dumps(res))
    log("machine roofline ...")
    # This machine's peaks drift with its neighbours' load (bandwidth 40-68 GB/s across runs):
    # it is measured again next to every decode-step measurement and the median is used.
    samples = [measure_machine()]

    log("ours ...")
    B = args.batch
    run_ours(model, prompts[:B], args.max_new, B)  # compile / warm up
    run_ours(model, prompts[:1], args.max_new, 1)
    t_b, ours_b = best_of(args.repeats, run_ours, model, prompts, args.max_new, B)
    t_1, ours_1 = best_of(args.repeats, lambda: [run_ours(model, [p], args.max_new, 1)[0]
                                                 for p in prompts[:n_single]])
    ours_tok = [g.tokens for g in ours_b]
    # Batch composition must not change greedy results: batch 1 vs batch B, same rows.
    res["b1_vs_batch_agreement"] = round(agreement([g.tokens for g in ours_1],
                                                   ours_tok[:n_single]), 3)
    res["ours_tok_s"] = round(n_prompts * args.max_new / t_b, 2)
    res["ours_b1_tok_s"] = round(n_single * args.max_new / t_1, 2)

    # The same weights in bfloat16 (matmuls accumulate in float32): against HF's bf16 row.
    import jax.numpy as jnp

    from model.api import Model

    m16 = Model(model.name + "-bf16", model.config,
                jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model.params),
                model.tokenizer)
    run_ours(m16, prompts[:B], args.max_new, B)  # compile / warm up
    t_16, ours_16 = best_of(args.repeats, run_ours, m16, prompts, args.max_new, B)
    res["ours_bf16_tok_s"] = round(n_prompts * args.max_new / t_16, 2)
    res["ours_bf16_agreement"] = round(agreement([g.tokens for g in ours_16], ours_tok), 3)
    del m16

    length = model.engine.buckets.length_bucket(max(lengths) + args.max_new)
    prof = {}
    LB = args.large_batch
    many = our_prompts(model, max(LB, B))
    for b in sorted({1, B, LB}):
        # min over repeats: 3 for the cheap small batches, fewer for the large one
        reps = 2 if b == LB else 3
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

    log(json.dumps(res))
    hf_path = None
    if not args.skip_hf:
        log("transformers ...")
        hf_path = build_hf(model, tmp / "hf")
        for dtype in ("float32", "bfloat16"):
            # bf16 is slow on CPU torch: in --quick it runs B prompts, 1 alone, 8 tokens.
            slow = args.quick and dtype == "bfloat16"
            n_b, n_1 = (B, 1) if slow else (n_prompts, n_single)
            new = 8 if slow else args.max_new
            try:
                dt_b, hf_toks = run_hf(hf_path, prompts[:n_b], new, B, dtype, args.repeats)
                dt_1, _ = run_hf(hf_path, prompts[:n_1], new, 1, dtype, args.repeats)
            except Exception as e:  # noqa: BLE001 - report, keep going
                log(f"HF {dtype} failed: {e}")
                continue
            tag = "" if dtype == "float32" else "_bf16"
            res[f"hf{tag}_tok_s"] = round(n_b * new / dt_b, 2)
            res[f"hf{tag}_b1_tok_s"] = round(n_1 * new / dt_1, 2)
            if dtype == "float32":
                res["hf_agreement"] = round(agreement(ours_tok, hf_toks), 3)
        if "hf_tok_s" in res:
            res["vs_hf"] = round(res["ours_tok_s"] / res["hf_tok_s"], 2)
            res["vs_hf_b1"] = round(res["ours_b1_tok_s"] / res["hf_b1_tok_s"], 2)
        if "hf_bf16_tok_s" in res:
            res["vs_hf_bf16"] = round(res["ours_bf16_tok_s"] / res["hf_bf16_tok_s"], 2)

    log(json.dumps(res))
    if not args.skip_llamacpp and real:
        log("llama.cpp ...")
        from model.embedded import embedded_gguf_path

        gguf = embedded_gguf_path()
        for flash in (False, True):
            try:
                dt, ll_toks = run_llamacpp(gguf, prompts[:n_llama], args.max_new, flash,
                                           args.repeats)
            except Exception as e:  # noqa: BLE001
                log(f"llama.cpp flash={flash} failed: {e}")
                continue
            key = "llamacpp_fa_tok_s" if flash else "llamacpp_nofa_tok_s"
            res[key] = round(n_llama * args.max_new / dt, 2)
            res.setdefault("llamacpp_agreement", round(agreement(ours_tok, ll_toks), 3))
        speeds = [res[k] for k in ("llamacpp_nofa_tok_s", "llamacpp_fa_tok_s") if k in res]
        if speeds:
            res["llamacpp_tok_s"] = max(speeds)
            res["vs_llamacpp"] = round(res["ours_tok_s"] / res["llamacpp_tok_s"], 2)
    for key in ("hf_tok_s", "llamacpp_tok_s", "vs_hf", "vs_llamacpp"):
        res.setdefault(key, None)
    res["llamacpp_prompts"] = n_llama
    res["bench_s"] = round(time.perf_counter() - t_start, 1)
    shutil.rmtree(tmp, ignore_errors=True)

    rows = [("ours batch %d" % B, res["ours_tok_s"]), ("ours batch 1", res["ours_b1_tok_s"]),
            ("ours bf16 batch %d" % B, res["ours_bf16_tok_s"]),
            ("HF fp32 batch %d" % B, res.get("hf_tok_s")),
            ("HF fp32 batch 1", res.get("hf_b1_tok_s")),
            ("HF bf16 batch %d" % B, res.get("hf_bf16_tok_s")),
            ("HF bf16 batch 1", res.get("hf_bf16_b1_tok_s")),
            ("llama.cpp (FA off)", res.get("llamacpp_nofa_tok_s")),
            ("llama.cpp (FA on)", res.get("llamacpp_fa_tok_s"))]
    print(f"{'engine':<22}{'tokens/s':>10}")
    for name, v in rows:
        print(f"{name:<22}{'-' if v is None else f'{v:.1f}':>10}")
    print(f"ratio vs HF (batch {B}): {res['vs_hf']} (bf16 vs bf16: {res.get('vs_hf_bf16')})   "
          f"vs llama.cpp: {res['vs_llamacpp']}")
    print(f"compile: cold {res['compile_cold_s']}s, warm {res['compile_warm_s']}s, "
          f"{res['programs']} programs")
    print(f"machine (median of {len(samples)} measurements): matmul "
          f"{res['matmul_gflops']} GFLOP/s (range {res['matmul_range_gflops']}), "
          f"bandwidth {res['bandwidth_gbs']} GB/s (range {res['bandwidth_range_gbs']})")
    for b, p in prof.items():
        print(f"decode step batch {b}: {p['step_ms']:.1f} ms (bound {p['binding']} "
              f"{max(p['mem_bound_ms'], p['flop_bound_ms']):.1f} ms -> {p['fraction']:.0%}); "
              f"forward {p['forward_ms']:.1f} ms, of which output projection "
              f"{p['out_proj_ms']:.1f} ms; sampler {p['sample_ms']:.2f} ms")
    print(f"roofline: bandwidth at batch 1 {res['roofline_bw_b1']:.0%}, FLOPs at batch {LB} "
          f"{res['roofline_flops_large']:.0%} (decode {res['ours_large_decode_tok_s']} tok/s)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
