"""Prefix reuse on the embedded model: a shared prefix prefilled once per engine vs every prompt
prefilled in full, on the same rows, in one run.

    python bench/prefix.py [--batch 8] [--max-new 32] [--repeats 3]

Two jobs, each built with the job's own prompt builder:
  1. summarize: the demo documents (~87 tokens) in the summary frame (~135 tokens), 24 rows;
  2. answer: 3 passages of ~800 tokens (demo documents joined), 8 questions each, 24 rows in
     corpus order (a passage's questions together, as a corpus lists them).
Both sides run `Model.generate` in batches of --batch rows, greedy, at most --max-new tokens,
stopping at the end of the line (the job's stop string); they differ only in `reuse_prefixes`.
The engine's prefix store is emptied before every run of the reuse side, so each run prefills
its frame and passages once inside the timed window, as a job's first batches do. Prints prefill
tokens computed and rows/s of each side (median and range of alternating rounds), the CPU, and a
final JSON line with `identical` (every output equal with and without reuse),
`speedup_summarize` and `speedup_answer` (rows/s ratios; targets >= 1.5 and >= 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import interleaved, joined_documents, machine, machine_line, spread

QUESTIONS = ("What is the main topic of the context?", "Who is mentioned in the context?",
             "Where does it take place?", "When did it happen?",
             "What is the most important number in the context?",
             "What happened first?", "What changed?", "What is the conclusion?")


def jobs(model, rows: int) -> dict[str, list[list[int]]]:
    from jobs.cli import demo_corpus_rows
    from pipeline.prompts import PromptBuilder, PromptSettings

    docs = [d["text"] for d in demo_corpus_rows()]
    tok = model.tokenizer
    summ = PromptBuilder(PromptSettings("summarize", model.prompt_format, 4096), tok)
    ans = PromptBuilder(PromptSettings("answer", model.prompt_format, 4096), tok)
    passages = joined_documents(docs, -(-rows // len(QUESTIONS)), 800, tok.encode)
    answer = [ans.build(p, q).ids for p in passages for q in QUESTIONS][:rows]
    return {"summarize": [summ.build(docs[k % len(docs)]).ids for k in range(rows)],
            "answer": answer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from model import load_model

    mach = machine()
    print(machine_line(mach), flush=True)
    model = load_model("gemma3-270m", dtype="float32")
    eng = model.engine
    out: dict = {"cpu": mach["cpu"], "simd": mach["simd"], "cores": mach["cpu_count"]}
    identical = True
    for name, prompts in jobs(model, a.rows).items():
        work: dict[str, list[int]] = {"reuse": [], "full": []}

        def run(reuse: bool, ps=prompts) -> list[list[int]]:
            if reuse:
                eng.prefixes.clear()
            before = eng.stats.padded_tokens
            toks = []
            for i in range(0, len(ps), a.batch):
                gens = model.generate(ps[i:i + a.batch], max_new_tokens=a.max_new, stop=["\n"],
                                      max_batch=a.batch, reuse_prefixes=reuse)
                toks += [g.tokens for g in gens]
            work["reuse" if reuse else "full"].append(eng.stats.padded_tokens - before)
            return toks

        sides = {"reuse": lambda: run(True), "full": lambda: run(False)}
        for fn in sides.values():
            fn()  # warm-up: compiles
        secs, toks = interleaved(sides, a.repeats)
        same = toks["reuse"] == toks["full"]
        identical &= same
        rate = {k: spread(secs[k], len(prompts)) for k in sides}
        speedup = rate["reuse"]["median"] / rate["full"]["median"]
        n_prompt = sum(len(p) for p in prompts)
        print(f"\n{name}: {len(prompts)} rows, {n_prompt / len(prompts):.0f} prompt tokens per "
              f"row, batches of {a.batch}")
        for k in sides:
            print(f"  {k:6s} prefill tokens computed {work[k][-1]:6d}   "
                  f"{rate[k]['median']:.2f} rows/s ({rate[k]['min']:.2f}-{rate[k]['max']:.2f})")
        print(f"  speedup {speedup:.2f}x, outputs identical: {same}")
        out[f"speedup_{name}"] = round(speedup, 3)
        out[name] = {"rows_s": {k: round(v["median"], 3) for k, v in rate.items()},
                     "prefill_tokens": {k: v[-1] for k, v in work.items()},
                     "prompt_tokens": n_prompt, "identical": same}
    out["identical"] = identical
    print(f"\nspeedup_summarize {out['speedup_summarize']} (target >= 1.5), speedup_answer "
          f"{out['speedup_answer']} (target >= 2), identical {identical}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
