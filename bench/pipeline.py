"""Pipeline overhead: the same rows through the full Ray pipeline and through the bare generator.

    python bench/pipeline.py [--model gemma3-270m] [--rows 24] [--batch-size 8] \
        [--max-new-tokens 32] [--runs 3]

Both sides are timed the same way, first row in to last row out, warm:
  * bare: read the input Parquet, load the model, build every prompt (the pipeline's
    `PromptBuilder` with the spec's settings), generate batch by batch (`--batch-size` rows per
    `Model.generate`, that many decode slots), all in this process;
  * pipeline: `run_job` on the same Parquet (preflight, Ray Data reads, a generator actor that
    loads the model and builds the prompts, one committed part per batch, compaction, summary)
    on a local Ray cluster started before the timer, as a cluster would be.
Caches are warm on both sides: one untimed run of each first fills the persistent compilation
cache, the dequantized-GGUF cache and the page cache. Then `--runs` timed runs per side,
alternating (bare, pipeline, pipeline, bare, ...); medians and ranges are reported. Prints the
CPU, tokens/s of each, the ratio pipeline/bare of the medians (target >= 0.9), whether both
produced the same text per row, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.parquet as pq
from harness import machine, machine_line, spread, timed


def corpus(rows: int) -> list[dict]:
    from jobs.cli import demo_corpus_rows

    docs = demo_corpus_rows()
    return [{"id": f"r{i:05d}", "text": docs[i % len(docs)]["text"]} for i in range(rows)]


def job_spec(model: str, inp: Path, out: Path, batch: int, max_new: int):
    from pipeline.spec import build_spec

    return build_spec({"input": str(inp), "output": str(out), "model": model,
                       "id_column": "id", "batch_size": batch,
                       "sampling": {"max_new_tokens": max_new}})


def bare_run(spec, inp: Path) -> dict:
    """Parquet in, texts out, in this process: what the pipeline's actor does, minus Ray."""
    from model import load_model
    from pipeline.prompts import PromptBuilder, PromptSettings, default_stop

    rows = pq.read_table(inp, columns=["id", "text"]).to_pylist()
    m = load_model(spec.model, dtype=spec.dtype,
                   prompt_format=None if spec.prompt_format == "auto" else spec.prompt_format)
    s = spec.sampling
    limit = m.config.max_seq_len - s.max_new_tokens
    if spec.max_prompt_tokens:
        limit = min(limit, spec.max_prompt_tokens)
    builder = PromptBuilder(PromptSettings(spec.task, m.prompt_format, limit, spec.long_document,
                                           spec.instruction, spec.summary_words), m.tokenizer)
    stop = list(s.stop) if s.stop else default_stop(m.prompt_format, spec.task)
    texts, tokens = {}, 0
    for i in range(0, len(rows), spec.batch_size):
        built = [(r, builder.build(r["text"])) for r in rows[i:i + spec.batch_size]]
        for r, pr in built:
            if pr.ids is None:  # an error row (e.g. too long), as the pipeline writes it
                texts[r["id"]] = None
        batch = [(r, pr.ids) for r, pr in built if pr.ids is not None]
        if not batch:
            continue
        gens = m.generate([ids for _, ids in batch], max_new_tokens=s.max_new_tokens,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                          stop=stop, max_batch=len(batch))
        for (r, _), g in zip(batch, gens):
            texts[r["id"]] = g.text
            tokens += g.output_tokens
    return {"tokens": tokens, "texts": texts}


def pipeline_run(spec) -> dict:
    """The full job: preflight to `_SUCCESS`."""
    from pipeline.run import run_job

    summary = run_job(spec, progress=False)
    return {"tokens": summary["output_tokens"], "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipeline.ray_env import ensure_ray, shutdown_ray

    mach = machine()
    print(machine_line(mach), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        inp = Path(tmp) / "in.parquet"
        pq.write_table(pa.Table.from_pylist(corpus(a.rows)), inp)
        outs = iter(range(10_000))

        def run(side: str) -> dict:
            if side == "bare":
                return bare_run(job_spec(a.model, inp, Path(tmp) / "unused", a.batch_size,
                                         a.max_new_tokens), inp)
            out = Path(tmp) / f"out-{next(outs)}"
            r = pipeline_run(job_spec(a.model, inp, out, a.batch_size, a.max_new_tokens))
            r["texts"] = {x["id"]: x["output"] for x in pq.read_table(out).to_pylist()}
            return r

        ensure_ray()
        try:
            for side in ("bare", "pipeline"):  # warm-up: compile cache, GGUF cache, page cache
                w, _ = timed(lambda side=side: run(side))
                print(f"warm-up {side}: {w:.1f} s", flush=True)
            walls: dict[str, list[float]] = {"bare": [], "pipeline": []}
            results: dict[str, dict] = {}
            for i in range(a.runs):
                for side in (("bare", "pipeline") if i % 2 == 0 else ("pipeline", "bare")):
                    w, r = timed(lambda side=side: run(side))
                    walls[side].append(w)
                    results.setdefault(side, r)
                    print(f"run {i + 1} {side}: {r['tokens']} tokens in {w:.2f} s", flush=True)
        finally:
            shutdown_ray()

    bare, pipe = results["bare"], results["pipeline"]
    b = spread(walls["bare"], bare["tokens"])
    p = spread(walls["pipeline"], pipe["tokens"])
    per_round = [(pipe["tokens"] / wp) / (bare["tokens"] / wb)
                 for wb, wp in zip(walls["bare"], walls["pipeline"])]
    ratio = p["median"] / b["median"]
    same = sum(pipe["texts"].get(k) == t for k, t in bare["texts"].items())
    print(f"bare generator: {bare['tokens']} tokens, median {b['median']:.2f} tokens/s "
          f"(range {b['min']:.2f}-{b['max']:.2f}, {a.runs} runs)")
    print(f"ray pipeline:   {pipe['tokens']} tokens, median {p['median']:.2f} tokens/s "
          f"(range {p['min']:.2f}-{p['max']:.2f}, {a.runs} runs)")
    print(f"ratio pipeline/bare: {ratio:.3f} (target >= 0.9; per-round ratios "
          f"{min(per_round):.3f}-{max(per_round):.3f}); identical outputs: "
          f"{same}/{len(bare['texts'])}; {machine_line(mach)}")
    print(json.dumps({"bench": "pipeline", **mach, "model": a.model, "rows": a.rows,
                      "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
                      "runs": a.runs, "bare_tokens": bare["tokens"],
                      "pipeline_tokens": pipe["tokens"],
                      "bare_tokens_per_s": round(b["median"], 3),
                      "bare_tokens_per_s_range": [round(b["min"], 3), round(b["max"], 3)],
                      "pipeline_tokens_per_s": round(p["median"], 3),
                      "pipeline_tokens_per_s_range": [round(p["min"], 3), round(p["max"], 3)],
                      "bare_walls_s": b["walls_s"], "pipeline_walls_s": p["walls_s"],
                      "ratio": round(ratio, 3),
                      "ratio_per_round": [round(x, 3) for x in per_round],
                      "ratio_per_round_median": round(statistics.median(per_round), 3),
                      "identical_outputs": same, "target_met": ratio >= 0.9}))


if __name__ == "__main__":
    main()
