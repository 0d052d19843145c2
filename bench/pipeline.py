"""Pipeline overhead: the same rows through the full Ray pipeline and through the bare generator.

    python bench/pipeline.py [--model gemma3-270m] [--rows 24] [--batch-size 8] [--max-new-tokens 32]

Both sides build prompts with the same `PromptBuilder`, decode greedily with the same batch size,
and are measured warm: the bare side on timed passes over the rows before and after the
pipeline (the faster one counts), (a first, untimed pass compiles every
shape into the persistent compilation cache the pipeline's actors share), the pipeline from its
first committed batch to its last (Ray scheduling, reads, actor calls and commits included;
actor start and model load excluded). Prints tokens/s of each, the ratio (target >= 0.9)
and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def corpus(rows: int) -> list[dict]:
    from jobs.cli import demo_corpus_rows

    docs = demo_corpus_rows()
    return [{"id": f"r{i:05d}", "text": docs[i % len(docs)]["text"]} for i in range(rows)]


class Bare:
    """The generator alone, in this process: load once, warm every shape, then timed passes."""

    def __init__(self, model_name: str, rows: list[dict], batch: int, max_new: int):
        from model import load_model
        from model.engine import enable_compile_cache
        from pipeline.prompts import PromptBuilder, PromptSettings, default_stop

        enable_compile_cache()  # the same persistent cache the pipeline's actors use
        self.m = load_model(model_name)
        limit = self.m.config.max_seq_len - max_new
        b = PromptBuilder(PromptSettings("summarize", self.m.prompt_format, limit),
                          self.m.tokenizer)
        self.stop = default_stop(self.m.prompt_format, "summarize")
        self.max_new = max_new
        prompts = [b.build(r["text"]).ids for r in rows]
        self.batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        for bt in self.batches:  # warm-up pass: compile every shape (also into the disk cache)
            self.m.generate(bt, max_new_tokens=max_new, stop=self.stop)

    def timed_pass(self) -> dict:
        t0 = time.perf_counter()
        texts, tokens = [], 0
        for bt in self.batches:
            for g in self.m.generate(bt, max_new_tokens=self.max_new, stop=self.stop):
                texts.append(g.text)
                tokens += g.output_tokens
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "texts": texts}


def pipeline(model_name: str, rows: list[dict], batch: int, max_new: int, tmp: Path) -> dict:
    """The full Ray pipeline (local cluster, one actor), timed between first and last commit."""
    from pipeline.spec import build_spec
    from pipeline.ray_env import shutdown_ray
    from pipeline.run import run_job

    pq.write_table(pa.Table.from_pylist(rows), tmp / "in.parquet")
    commits: list[tuple[float, int]] = []

    def on_commit(table: pa.Table) -> None:
        commits.append((time.perf_counter(), sum(table.column("output_tokens").to_pylist())))

    spec = build_spec({"input": str(tmp / "in.parquet"), "output": str(tmp / "out"),
                       "model": model_name, "id_column": "id", "batch_size": batch,
                       "sampling": {"max_new_tokens": max_new}})
    try:
        summary = run_job(spec, progress=False, on_commit=on_commit)
    finally:
        shutdown_ray()
    commits.sort()
    # Steady state: tokens of batches after the first over the time since the first commit.
    steady_tokens = sum(t for _, t in commits[1:])
    steady_wall = commits[-1][0] - commits[0][0] if len(commits) > 1 else float("nan")
    out = pq.read_table(tmp / "out").to_pylist()
    return {"tokens": summary["output_tokens"], "steady_tokens": steady_tokens,
            "steady_wall_s": steady_wall, "tokens_per_s": steady_tokens / steady_wall,
            "end_to_end_tokens_per_s": summary["tokens_per_s"],
            "texts": {r["id"]: r["output"] for r in out}, "batches": len(commits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    if a.rows < 2 * a.batch_size:
        ap.error("--rows must cover at least two batches (steady state needs two commits)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = corpus(a.rows)
    bare = Bare(a.model, rows, a.batch_size, a.max_new_tokens)
    # Bare passes before and after the pipeline; the faster one is the baseline (this machine
    # is shared, so a single pass can be slowed by others).
    b1 = bare.timed_pass()
    print(f"bare generator: {b1['tokens']} tokens in {b1['wall_s']:.2f} s = "
          f"{b1['tokens_per_s']:.2f} tokens/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        p = pipeline(a.model, rows, a.batch_size, a.max_new_tokens, Path(tmp))
    b2 = bare.timed_pass()
    print(f"bare generator: {b2['tokens']} tokens in {b2['wall_s']:.2f} s = "
          f"{b2['tokens_per_s']:.2f} tokens/s (second pass)", flush=True)
    b = max(b1, b2, key=lambda x: x["tokens_per_s"])
    print(f"ray pipeline:   {p['steady_tokens']} tokens in {p['steady_wall_s']:.2f} s = "
          f"{p['tokens_per_s']:.2f} tokens/s (steady state, {p['batches']} batches; "
          f"end to end incl. startup {p['end_to_end_tokens_per_s']:.2f} tokens/s)")
    same = sum(p["texts"][r["id"]] == t for r, t in zip(rows, b["texts"]))
    ratio = p["tokens_per_s"] / b["tokens_per_s"]
    print(f"ratio pipeline/bare: {ratio:.3f} (target >= 0.9); identical outputs: "
          f"{same}/{len(rows)}")
    print(json.dumps({"bench": "pipeline", "model": a.model, "rows": a.rows,
                      "bare_passes_tokens_per_s": [round(b1["tokens_per_s"], 3),
                                                   round(b2["tokens_per_s"], 3)],
                      "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
                      "bare_tokens_per_s": round(b["tokens_per_s"], 3),
                      "pipeline_tokens_per_s": round(p["tokens_per_s"], 3),
                      "ratio": round(ratio, 3), "identical_outputs": same}))


if __name__ == "__main__":
    main()
