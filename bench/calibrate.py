"""Writes the calibration table `gemma-batch validate` forecasts from: prefill and decode tokens/s
of one model and dtype at several batch sizes on this machine's device, measured on real prompts
(the bundled demo corpus through the summarize template, as the actors build them) in this
process, with `pipeline.calibration.measure` (the same measurement as `validate --calibrate`).

Start-up here is the model load and the compiles only; `validate --calibrate` also measures Ray's
start and an actor's, so its forecasts include them. Prints the CPU; the last line is JSON.

    python bench/calibrate.py [--model gemma3-270m] [--dtype float32] [--batch-sizes 1,4,8,16]
                              [--max-new-tokens 32] [--table PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import machine_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--table", type=Path, default=None,
                    help="calibration table to add to (default: the user cache's)")
    args = ap.parse_args()

    import jax
    import pyarrow as pa

    from jobs.cli import demo_corpus_rows
    from model import load_model
    from model.config import DEFAULT_MODEL
    from pipeline import calibration
    from pipeline.predictor import GenSettings, prompt_setup
    from pipeline.spec import build_spec

    model_name = args.model or DEFAULT_MODEL
    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    m = load_model(model_name, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    texts = [r["text"] for r in demo_corpus_rows()]
    platform = jax.devices()[0].platform
    results = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        spec = build_spec({"input": "unused", "output": "unused", "model": model_name,
                           "dtype": args.dtype, "task": "summarize", "batch_size": b,
                           "sampling": {"max_new_tokens": args.max_new_tokens}}, "bench")
        builder, stop = prompt_setup(m, GenSettings.of(spec, pa.schema([])))
        picked = [(texts * (b // len(texts) + 1))[i] for i in range(b)]
        prompts = [p.ids for p in (builder.build(t) for t in picked) if p.ids]
        r = calibration.measure(m, prompts, args.max_new_tokens, stop)
        entry = {
            "accelerator": "cpu" if platform == "cpu" else platform, "model": model_name,
            "dtype": args.dtype or "default", **r,
            "device": calibration.this_device(platform),
            "startup": {"model_load_s": round(load_s, 3), "compile_s": r["compile_s"]},
            "source": "bench/calibrate.py",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "measured_at_unix": time.time(),
        }
        path = calibration.write_entry(entry, args.table)
        print(f"batch {b}: prefill {r['prefill_tok_s']} tok/s, decode {r['decode_tok_s']} "
              f"tok/s, compile {r['compile_s']} s -> {path}", flush=True)
        results.append(entry)
    print(json.dumps({"model": model_name, "dtype": args.dtype or "default",
                      "machine": machine_line(), "entries": results}))


if __name__ == "__main__":
    main()
