"""Pipeline overhead: the same rows through the full Ray pipeline and through the bare generator.

    python bench/pipeline.py [--model gemma3-270m] [--rows 24] [--batch-size 8] \
        [--max-new-tokens 32] [--runs 3]
    python bench/pipeline.py --demo [--runs 3]
    python bench/pipeline.py --mixed [--rows 64] [--batch-size 16] [--runs 2]

--mixed: lengths and budgets spread as in real corpora, (a) bare engine vs (b) streaming
pipeline vs (c) closed batches; see bench/mixed.py.

--demo times the README's `gemma-batch demo` end to end as a user runs it (a fresh process, its
own local Ray), once with an empty compile cache (cold) and --runs times with that cache filled
(warm), and prints its phases from the command's own progress lines and `_SUMMARY.json`:
Ray start, actors and model load, compile (the actors' compile seconds), generate (batch time
less compile), and the rest (publish, shutdown). Targets on 2 cores: warm <= 30 s, cold <= 60 s.

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


def demo_run(cache: str, out: Path) -> dict:
    """One `gemma-batch demo` in a fresh process: wall, phase times and its summary."""
    import subprocess
    import time

    env = {**os.environ, "GEMMA_BATCH_JAX_CACHE": cache}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "demo", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])
    marks: dict[str, float] = {}
    for line in proc.stderr:  # plain progress lines: the phases, then rows
        now = time.perf_counter() - t0
        for key, words in (("ray", "starting Ray"), ("actors", "actor"),
                           ("load", "loading the model"), ("compile", "compiling"),
                           ("rows", "rows")):
            if words in line and key not in marks:
                marks[key] = now
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"bench/pipeline.py: gemma-batch demo exited {rc}")
    summary = json.loads((out / "_SUMMARY.json").read_text())
    lat = sum(b["latency_s"] for b in map(json.loads, (out / "_BATCHES.jsonl").read_text()
                                          .splitlines()))
    compile_s = summary.get("compile_s", 0.0)
    start = marks.get("ray", 0.0)
    phases = {
        "process_start_s": round(start, 2),
        "ray_start_s": round(marks.get("actors", start) - start, 2),
        "actors_and_model_load_s": round(marks.get("compile", wall) - marks.get("actors", start),
                                         2),
        "compile_s": round(compile_s, 2),
        "generate_s": round(lat - compile_s, 2),
    }
    phases["rest_s"] = round(wall - sum(phases.values()), 2)
    return {"wall_s": round(wall, 2), "phases": phases, "rows": summary["rows_out"],
            "output_tokens": summary["output_tokens"], "prefill": summary.get("prefill")}


def demo_main(runs: int) -> None:
    mach = machine()
    print(machine_line(mach), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        cache = str(Path(tmp) / "jax-cache")
        results = []
        for i in range(runs + 1):
            r = demo_run(cache, Path(tmp) / f"out-{i}")
            r["cache"] = "cold" if i == 0 else "warm"
            results.append(r)
            print(f"{r['cache']:4s} demo: {r['wall_s']:.1f} s end to end, {r['rows']} rows, "
                  f"{r['output_tokens']} tokens; phases {r['phases']}", flush=True)
    cold = results[0]["wall_s"]
    warm = statistics.median(r["wall_s"] for r in results[1:]) if runs else None
    print(f"demo end to end: cold {cold:.1f} s (target <= 60), warm median {warm} s "
          f"(target <= 30); {machine_line(mach)}")
    print(json.dumps({"bench": "pipeline_demo", **mach, "cold_s": cold, "warm_s": warm,
                      "runs": results, "target_met": cold <= 60 and (warm or 0) <= 30}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true",
                    help="time the README's gemma-batch demo end to end, cold and warm")
    ap.add_argument("--mixed", action="store_true",
                    help="spread lengths: bare engine vs streaming pipeline vs closed batches")
    ap.add_argument("--batches-in-flight", type=int, default=None,
                    help="per actor (--mixed); default: the spec's default")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.demo:
        return demo_main(a.runs)
    if a.mixed:
        from mixed import mixed_main

        return mixed_main(a.model, a.rows if a.rows != 24 else 64,
                          a.batch_size if a.batch_size != 8 else 16, a.runs, a.batches_in_flight)
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
