"""Tokenizer throughput: our SentencePiece model rebuilt from the GGUF vs llama.cpp's tokenizer.

Same corpus (the generated parity corpus of tests/model/test_tokenizer.py, repeated), same
vocabulary (the embedded Gemma 3 270M GGUF), the same work on both sides: each text (a Python
str) in, its token ids (a Python list of ints, no BOS, no special-token parsing) out; llama.cpp's
UTF-8 encoding of the str is inside its timed call, as it is inside ours. The ids of both are
compared text by text. The two sides are timed in alternation, `--repeats` times each, and the
median (with the range) is reported. Prints sentences/s and tokens/s of each, their ratio, the
seconds to build our tokenizer from the file and the CPU; the last line is one JSON object.

    python bench/tokenizer.py [--sentences 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "model"))

from harness import interleaved, machine, machine_line, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per side (median)")
    args = ap.parse_args()

    import llama_cpp
    from test_tokenizer import corpus

    from model.checkpoints.gguf_format import open_gguf
    from model.embedded import embedded_gguf_path
    from model.sp_model import sp_model_proto_from_gguf
    from model.tokenizer import SentencePieceTokenizer

    mach = machine()
    print(machine_line(mach), flush=True)
    path = embedded_gguf_path()
    t0 = time.perf_counter()
    md = open_gguf(path).metadata
    tok = SentencePieceTokenizer(sp_model_proto_from_gguf(md, str(path)))
    build_s = time.perf_counter() - t0
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)

    def ours_one(t: str) -> list[int]:
        return tok.encode(t)

    def ref_one(t: str) -> list[int]:
        return llama.tokenize(t.encode("utf-8"), add_bos=False, special=False)

    base = list(corpus())
    texts = (base * (args.sentences // len(base) + 1))[: args.sentences]
    for t in base[:200]:  # warm up both
        ours_one(t)
        ref_one(t)

    secs, ids = interleaved({"ours": lambda: [ours_one(t) for t in texts],
                             "llamacpp": lambda: [ref_one(t) for t in texts]}, args.repeats)
    ours_ids, ref_ids = ids["ours"], ids["llamacpp"]
    same = [a == list(b) for a, b in zip(ours_ids, ref_ids)]
    n_tokens = sum(map(len, ours_ids))
    diff = next((texts[i] for i, s in enumerate(same) if not s), None)
    ours, ref = spread(secs["ours"], n_tokens), spread(secs["llamacpp"], n_tokens)
    speed = [r / o for o, r in zip(secs["ours"], secs["llamacpp"])]  # per round, same load
    res = {
        "bench": "tokenizer", **mach, "sentences": len(texts), "repeats": args.repeats,
        "tokens": n_tokens, "llamacpp_tokens": sum(map(len, ref_ids)),
        "identical_ids": sum(same), "ids_match": all(same),
        "first_differing_text": diff,
        "ours_tokens_per_s": ours["median"], "ours_tokens_per_s_range": [ours["min"], ours["max"]],
        "llamacpp_tokens_per_s": ref["median"],
        "llamacpp_tokens_per_s_range": [ref["min"], ref["max"]],
        "ours_sentences_per_s": ours["median"] * len(texts) / n_tokens,
        "llamacpp_sentences_per_s": ref["median"] * len(texts) / n_tokens,
        "speed_vs_llamacpp": sorted(speed)[len(speed) // 2],
        "speed_vs_llamacpp_range": [min(speed), max(speed)],
        "build_tokenizer_s": build_s,
    }
    print(f"ids identical for {sum(same)}/{len(texts)} texts"
          + ("" if diff is None else f" (first difference: {diff!r})"))
    print(f"{'':10s} {'sentences/s':>12s} {'tokens/s':>12s}   (median of {args.repeats}, range)")
    print(f"{'ours':10s} {res['ours_sentences_per_s']:12.0f} {ours['median']:12.0f}   "
          f"{ours['min']:.0f}-{ours['max']:.0f}")
    print(f"{'llama.cpp':10s} {res['llamacpp_sentences_per_s']:12.0f} {ref['median']:12.0f}   "
          f"{ref['min']:.0f}-{ref['max']:.0f}")
    print(f"ours / llama.cpp speed: {res['speed_vs_llamacpp']:.2f}x (median of per-round ratios, "
          f"range {min(speed):.2f}-{max(speed):.2f}); tokenizer built from the GGUF in "
          f"{build_s:.2f} s; {machine_line(mach)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
