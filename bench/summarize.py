"""Summarisation as users run it: real prompt frames and documents, stop at the end of the line.

    python bench/summarize.py [--rows 24] [--batch 8] [--max-new 32] [--repeats 3] \
        [--dtype float32] [--skip-hf] [--skip-llamacpp] [--long-only | --demo-only]

Two corpora, each built from the demo documents with the job's own prompt builder (the few-shot
summary frame of the embedded base model):
  * demo: the demo corpus (~135-token frame + ~87-token document);
  * long: ~600-token documents (demo documents joined).
Every engine gets the same token ids, greedy, at most --max-new tokens, and the same stop rule:
a row ends at its first token whose text holds a newline (the job's stop string; HF gets those
ids as eos_token_id, llama.cpp checks them per sequence, ours stops on them on device). Sides:
  * ours: `Model.generate` in batches of --batch rows (packed prefill, prefix reuse), in
    --dtype (float32: the CPU default; bfloat16 to compare like with like against hf_bf16);
  * ours_no_reuse: the same without prefix reuse (prefill every prompt in full);
  * hf_fp32 / hf_bf16: transformers `generate` in batches of --batch (left padding);
  * llamacpp_single: llama.cpp on the same GGUF, one row at a time (2 threads);
  * llamacpp_batched: llama.cpp with --batch sequences in one context.
Timed in alternating rounds after a warm-up of every side; medians and ranges. Prints rows/s
and total tokens/s (prompt + generated), the CPU and its SIMD flags, and a final JSON line with
`vs_hf` (ours / the better HF dtype), `vs_llamacpp` (ours / the better llama.cpp mode) and
`padding_ratio` (prefill token slots computed / real tokens, demo corpus).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import interleaved, joined_documents, machine, machine_line, spread


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpora(model, rows: int) -> dict[str, list[list[int]]]:
    """Prompt ids per corpus, built with the job's summarize template."""
    from jobs.cli import demo_corpus_rows
    from pipeline.prompts import PromptBuilder, PromptSettings

    docs = [d["text"] for d in demo_corpus_rows()]
    builder = PromptBuilder(PromptSettings("summarize", model.prompt_format, 4096),
                            model.tokenizer)
    long_docs = joined_documents(docs, rows, 600, model.tokenizer.encode)
    return {"demo": [builder.build(docs[k % len(docs)]).ids for k in range(rows)],
            "long": [builder.build(t).ids for t in long_docs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="our compute dtype")
    ap.add_argument("--llama-threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--demo-only", action="store_true")
    ap.add_argument("--long-only", action="store_true")
    a = ap.parse_args()

    import peers

    from model import load_model
    from model.embedded import embedded_gguf_path
    from model.engine.scheduler import stop_string_tokens

    mach = machine()
    print(machine_line(mach), flush=True)
    model = load_model("gemma3-270m", dtype=a.dtype)
    stop_ids = stop_string_tokens(model.tokenizer, ["\n"])
    sets = corpora(model, a.rows)
    if a.demo_only:
        sets.pop("long")
    if a.long_only:
        sets.pop("demo")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-summarize-") as tmp:
        hf = {}
        if not a.skip_hf:
            log("transformers: float32 and bfloat16 ...")
            path = peers.build_hf(model, Path(tmp) / "hf")
            hf = {"hf_fp32": peers.HF(path, "float32"), "hf_bf16": peers.HF(path, "bfloat16")}
        for name, prompts in sets.items():
            n_prompt = sum(map(len, prompts))
            ctx = max(map(len, prompts)) + a.max_new + 8

            def ours(reuse: bool, ps=prompts) -> list[list[int]]:
                out = []
                for i in range(0, len(ps), a.batch):
                    gens = model.generate(ps[i:i + a.batch], max_new_tokens=a.max_new,
                                          stop=["\n"], max_batch=a.batch, reuse_prefixes=reuse)
                    out += [g.tokens for g in gens]
                return out

            sides = {"ours": lambda: ours(True), "ours_no_reuse": lambda: ours(False)}
            for k, m in hf.items():
                sides[k] = lambda m=m, ps=prompts: m.generate(ps, a.max_new, a.batch, stop_ids)
            closers = []
            if not a.skip_llamacpp:
                one = peers.LlamaCpp(embedded_gguf_path(), 1, ctx, True, a.llama_threads)
                many = peers.LlamaCpp(embedded_gguf_path(), a.batch, ctx, True, a.llama_threads)
                closers += [one, many]
                sides["llamacpp_single"] = lambda ps=prompts: one.generate(ps, a.max_new,
                                                                            stop_ids)
                sides["llamacpp_batched"] = lambda ps=prompts: many.generate(ps, a.max_new,
                                                                              stop_ids)
            for k, fn in sides.items():
                fn()
                log(f"{name}: warmed up {k}")
            before = model.engine.stats.as_dict()
            secs, outs = interleaved(sides, a.repeats)
            after = model.engine.stats.as_dict()
            for c in closers:
                c.close()
            res = {}
            for k in sides:
                gen = sum(len(t) for t in outs[k])
                rows = spread(secs[k], len(prompts))
                toks = spread(secs[k], n_prompt + gen)
                res[k] = {"rows_s": rows, "tokens_s": toks, "generated": gen}
            # Prefill padding of our side over the timed rounds (both our sides included).
            real = after["real_tokens"] - before["real_tokens"]
            padded = after["padded_tokens"] - before["padded_tokens"]
            res["padding_ratio"] = round(padded / real, 4) if real else None
            res["identical_reuse"] = outs["ours"] == outs["ours_no_reuse"]
            res["prompt_tokens_mean"] = round(n_prompt / len(prompts), 1)
            results[name] = res
            print(f"\n{name}: {len(prompts)} rows, {res['prompt_tokens_mean']} prompt tokens "
                  f"per row, batch {a.batch}, <= {a.max_new} new tokens, stop at newline")
            for k in sides:
                r = res[k]
                print(f"  {k:18s} {r['rows_s']['median']:6.2f} rows/s "
                      f"({r['rows_s']['min']:.2f}-{r['rows_s']['max']:.2f})  "
                      f"{r['tokens_s']['median']:7.1f} tokens/s  {r['generated']} generated")
            print(f"  padding ratio {res['padding_ratio']}, outputs identical with and without "
                  f"prefix reuse: {res['identical_reuse']}")

    def ratio(corpus: str, peers_: tuple[str, ...]) -> float | None:
        r = results.get(corpus, {})
        best = max((r[p]["rows_s"]["median"] for p in peers_ if p in r), default=None)
        return round(r["ours"]["rows_s"]["median"] / best, 3) if best else None

    out = {"cpu": mach["cpu"], "simd": mach["simd"], "cores": mach["cpu_count"],
           "ours_dtype": a.dtype}
    for c in results:
        out[c] = {"vs_hf": ratio(c, ("hf_fp32", "hf_bf16")),
                  "vs_llamacpp": ratio(c, ("llamacpp_single", "llamacpp_batched")),
                  "padding_ratio": results[c]["padding_ratio"],
                  "rows_s": {k: v["rows_s"]["median"] for k, v in results[c].items()
                             if isinstance(v, dict) and "rows_s" in v}}
    head = "demo" if "demo" in results else next(iter(results))
    out.update(vs_hf=out[head]["vs_hf"], vs_llamacpp=out[head]["vs_llamacpp"],
               padding_ratio=out[head]["padding_ratio"])
    print("\nvs_hf", out["vs_hf"], "(target >= 2), vs_llamacpp", out["vs_llamacpp"],
          "(target >= 1.5), padding_ratio", out["padding_ratio"], "(target < 1.15)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
