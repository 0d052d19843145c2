"""`bench/pipeline.py --mixed`: a corpus with a realistic spread of lengths through (a) the bare
engine over all rows at once, (b) the full streaming pipeline and (c) the pipeline with closed
batches, in one run.

The corpus: prompts of 20-600 tokens (the demo's documents joined and cut at token boundaries,
task `raw`, so the prompt is the text), and per-row `max_new_tokens` with a long tail (80% of
rows 8-24 tokens, 20% 128-256), given to the pipeline as an input column. Greedy, the tokenizer's
stop ids only, so every side does the same work.

Each side is timed from its first row in to its last row out, with warm compile caches:
  (a) one `generate` over every prompt (tokenized beforehand; model loaded before) on a fresh
      engine, whose programs load from the persistent compile cache as a fresh actor's do;
  (b), (c) `run_job` on the Parquet corpus with one actor; the window runs from the first
      batch's start to the last batch's end as the actor recorded them (`_BATCHES.jsonl`: each
      batch's end time and latency). Startup (Ray already running: actor start, model load)
      and publish are reported apart, with the end-to-end wall.
Sides run in alternation (a b c, c b a, ...) after one untimed warm-up of each; medians of
`--runs`. Targets on the embedded 270M: (b)/(a) >= 0.9 and (b)/(c) >= 1.3.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import machine, machine_line


def mixed_corpus(tokenizer: Any, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows with prompts of 20-600 tokens and a long tail of budgets."""
    from jobs.cli import demo_corpus_rows

    docs = [r["text"] for r in demo_corpus_rows()]
    words = " ".join(docs * 8).split()
    rng = np.random.default_rng(seed)
    out, at = [], 0
    for i in range(rows):
        want = int(rng.integers(20, 601))
        text, n = [], 0
        while n < want:  # whole words until the prompt has `want` tokens
            text.append(words[at % len(words)])
            at += 1
            if len(text) % 8 == 0 or n + 8 >= want:
                n = len(tokenizer.encode(" ".join(text)))
        tail = rng.random() < 0.2
        budget = int(rng.integers(128, 257)) if tail else int(rng.integers(8, 25))
        out.append({"id": f"m{i:05d}", "text": " ".join(text), "budget": budget})
    return out


def _spec(model: str, inp: Path, out: Path, batch: int, batching: str, in_flight: int):
    from pipeline.spec import build_spec

    return build_spec({"input": str(inp), "output": str(out), "model": model, "task": "raw",
                       "id_column": "id", "batch_size": batch, "batching": batching,
                       "batches_in_flight": in_flight, "prompt_format": "completion",
                       "sampling_columns": {"max_new_tokens": "budget"},
                       "sampling": {"max_new_tokens": 256},
                       "resources": {"num_actors": 1}})


def pipeline_side(spec) -> dict[str, Any]:
    from pipeline.run import run_job

    t0 = time.time()
    summary = run_job(spec, progress=False)
    wall = time.time() - t0
    out = Path(spec.output)
    batches = [json.loads(x) for x in (out / "_BATCHES.jsonl").read_text().splitlines()]
    first_in = min(b["end"] - b["latency_s"] for b in batches)
    last_out = max(b["end"] for b in batches)
    texts = {r["id"]: r["output"] for r in pq.read_table(out, columns=["id", "output"])
             .to_pylist()}
    return {"window_s": last_out - first_in, "startup_s": first_in - t0, "wall_s": wall,
            "compile_s": summary["compile_s"],
            "tokens": summary["output_tokens"], "texts": texts}


def bare_side(m: Any, rows: list[dict[str, Any]], prompts: list[list[int]],
              slots: int) -> dict[str, Any]:
    """One `generate` over every row on a fresh engine (as a pipeline run's fresh actor has):
    its programs come from the persistent compile cache, as the actor's do."""
    from model.engine import Engine, generate

    engine = Engine(m.family, m.config, m.params, buckets=m.engine.buckets)
    t0 = time.perf_counter()
    gens = generate(engine, prompts, m.tokenizer, max_new_tokens=[r["budget"] for r in rows],
                    max_batch=slots)
    window = time.perf_counter() - t0
    return {"window_s": window, "tokens": sum(g.output_tokens for g in gens),
            "compile_s": engine.compile_log.seconds,
            "texts": {r["id"]: g.text.rstrip("\ufffd") if g.finish_reason == "length"
                      else g.text for r, g in zip(rows, gens)}}


def mixed_main(model: str, rows: int, batch: int, runs: int, in_flight: int | None) -> None:
    from model import load_model
    from pipeline.ray_env import ensure_ray, shutdown_ray
    from pipeline.spec import JobSpec

    if in_flight is None:  # the product's default
        in_flight = JobSpec.model_fields["batches_in_flight"].default

    mach = machine()
    print(machine_line(mach), flush=True)
    m = load_model(model, prompt_format="completion")
    data = mixed_corpus(m.tokenizer, rows)
    prompts = [m.encode_prompts([r["text"]])[0] for r in data]
    lens = [len(p) for p in prompts]
    budgets = [r["budget"] for r in data]
    print(f"corpus: {rows} rows, prompt tokens {min(lens)}-{max(lens)} (mean "
          f"{statistics.mean(lens):.0f}), max_new_tokens {min(budgets)}-{max(budgets)} "
          f"({sum(b >= 128 for b in budgets)} rows >= 128)", flush=True)
    walls: dict[str, list[float]] = {"bare": [], "stream": [], "closed": []}
    first: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        inp = Path(tmp) / "in.parquet"
        pq.write_table(pa.Table.from_pylist(data), inp)
        n = iter(range(10_000))

        def side(name: str) -> dict[str, Any]:
            if name == "bare":
                return bare_side(m, data, prompts, batch)
            return pipeline_side(_spec(model, inp, Path(tmp) / f"out-{next(n)}", batch, name,
                                       in_flight))

        ensure_ray()
        try:
            for name in walls:  # warm-up: compile cache, GGUF cache, page cache
                r = side(name)
                print(f"warm-up {name}: window {r['window_s']:.1f} s", flush=True)
            for i in range(runs):
                for name in (list(walls) if i % 2 == 0 else list(walls)[::-1]):
                    r = side(name)
                    walls[name].append(r["window_s"])
                    first.setdefault(name, r)
                    extra = (f", startup {r['startup_s']:.1f} s, end to end {r['wall_s']:.1f} s"
                             if "startup_s" in r else "")
                    print(f"run {i + 1} {name}: {r['tokens']} tokens, first row in to last row "
                          f"out {r['window_s']:.2f} s (programs from the compile cache "
                          f"{r['compile_s']:.1f} s){extra}", flush=True)
        finally:
            shutdown_ray()
    med = {k: statistics.median(v) for k, v in walls.items()}
    rate = {k: first[k]["tokens"] / med[k] for k in med}
    vs_bare, vs_closed = rate["stream"] / rate["bare"], rate["stream"] / rate["closed"]
    same = {k: sum(first[k]["texts"].get(i) == t for i, t in first["bare"]["texts"].items())
            for k in ("stream", "closed")}
    for k, label in (("bare", "(a) bare engine"), ("stream", "(b) pipeline"),
                     ("closed", "(c) closed batches")):
        print(f"{label:22s} {first[k]['tokens']} tokens, median window {med[k]:.2f} s, "
              f"{rate[k]:.2f} tokens/s (windows {', '.join(f'{w:.1f}' for w in walls[k])})")
    print(f"pipeline/bare {vs_bare:.3f} (target >= 0.9); pipeline/closed batches "
          f"{vs_closed:.3f} (target >= 1.3); same text as bare: stream {same['stream']}/{rows}, "
          f"closed {same['closed']}/{rows}; {machine_line(mach)}")
    print(json.dumps({"bench": "pipeline_mixed", **mach, "model": model, "rows": rows,
                      "batch_size": batch, "batches_in_flight": in_flight, "runs": runs,
                      "tokens": {k: first[k]["tokens"] for k in first},
                      "tokens_per_s": {k: round(v, 3) for k, v in rate.items()},
                      "windows_s": {k: [round(w, 3) for w in v] for k, v in walls.items()},
                      "identical": same, "pipeline_vs_bare": round(vs_bare, 3),
                      "pipeline_vs_closed_batches": round(vs_closed, 3)}))
