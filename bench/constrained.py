"""`bench/generate.py --constrained`: decode tokens/s with a JSON-schema output format vs
unconstrained, in one run, on the embedded 270M.

Same prompts (short extraction prompts), same 16 slots, greedy, same `max_new_tokens`; the
unconstrained side has no stop token (every row runs its whole budget), the constrained side
stops rows where the schema is complete. Rows that end early leave slots idle, which is not the
format's cost, so the rate compared is the decode loop's own: slot-steps per second of decode
calls (B slots x steps / seconds inside `Engine.decode`), i.e. tokens/s with every slot busy;
each side's plain tokens/s over its window (prefill included) is printed beside it. The format
is compiled once before timing (reported apart, with its table size). Alternating rounds after
one untimed warm-up of each; medians. Target: constrained >= 0.8x unconstrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import interleaved, machine, machine_line, spread  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                         "topic": {"enum": ["science", "history", "art", "sport", "business"]}},
          "required": ["title", "year", "topic"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--constrained", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from jobs.cli import demo_corpus_rows
    from model import load_model
    from model.engine import Format, compile_format, generate

    mach = machine()
    print(machine_line(mach), flush=True)
    m = load_model("gemma3-270m", prompt_format="completion")
    docs = [r["text"] for r in demo_corpus_rows()]
    prompts = [m.encode_prompts([f"Document: {docs[i % len(docs)][:160]}\nAs JSON with title, "
                                 "year and topic:"])[0] for i in range(a.rows)]
    t0 = time.perf_counter()
    auto = compile_format(Format("json", SCHEMA), m.tokenizer, m.config.vocab_size,
                          m.tokenizer.stop_ids)
    compile_s = time.perf_counter() - t0
    print(f"format: {auto.states} states, {auto.classes} token classes, "
          f"{auto.nbytes / 2**20:.2f} MiB of tables, compiled in {compile_s:.1f} s", flush=True)
    kw = dict(max_new_tokens=a.max_new, max_batch=a.rows)
    engine, decode = m.engine, m.engine.decode
    inside: dict[str, list[float]] = {}  # per side: [decode seconds, slot-steps]

    def timed_decode(side: str):
        def run(*args, **kwargs):
            t = time.perf_counter()
            state, slots, steps, busy = decode(*args, **kwargs)
            n = int(steps)  # waits for the device
            acc = inside.setdefault(side, [0.0, 0])
            acc[0] += time.perf_counter() - t
            acc[1] += n * slots.out.shape[0]
            return state, slots, steps, busy
        return run

    def side(name: str, **extra):
        def go():
            engine.decode = timed_decode(name)
            try:
                return generate(engine, prompts, m.tokenizer, **kw, **extra)
            finally:
                engine.decode = decode
        return go

    sides = {"free": side("free", stop_token_ids=[]), "json": side("json", output_format=auto)}
    for fn in sides.values():  # warm-up: compiles
        fn()
    inside.clear()
    secs, first = interleaved(sides, a.repeats)
    tokens = {k: sum(g.output_tokens for g in v) for k, v in first.items()}
    rate = {k: spread(secs[k], tokens[k]) for k in sides}
    slot_rate = {k: inside[k][1] / inside[k][0] for k in sides}
    valid = 0
    for g in first["json"]:
        try:
            d = json.loads(g.text)
            valid += g.complete and set(SCHEMA["required"]) <= set(d)
        except ValueError:
            pass
    ratio = slot_rate["json"] / slot_rate["free"]
    for k in sides:
        print(f"{k:5s} decode loop {slot_rate[k]:.1f} slot-steps/s; {tokens[k]} tokens, "
              f"{rate[k]['median']:.1f} tokens/s over the window (range {rate[k]['min']:.1f}-"
              f"{rate[k]['max']:.1f})")
    print(f"constrained/unconstrained decode rate {ratio:.3f} (target >= 0.8; tokens/s over the "
          f"window {rate['json']['median'] / rate['free']['median']:.3f}); complete JSON "
          f"rows {valid}/{a.rows}; {machine_line(mach)}")
    print(json.dumps({"bench": "generate_constrained", **mach, "rows": a.rows,
                      "max_new_tokens": a.max_new, "repeats": a.repeats, "tokens": tokens,
                      "tokens_per_s": {k: round(v["median"], 2) for k, v in rate.items()},
                      "decode_slot_steps_per_s": {k: round(v, 2) for k, v in slot_rate.items()},
                      "format_states": auto.states, "format_classes": auto.classes,
                      "format_table_bytes": auto.nbytes, "format_compile_s": round(compile_s, 2),
                      "complete_rows": valid, "constrained_vs_unconstrained": round(ratio, 3)}))


if __name__ == "__main__":
    main()
