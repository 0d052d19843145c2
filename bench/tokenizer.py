"""Tokenizer throughput: our SentencePiece model rebuilt from the GGUF vs llama.cpp's tokenizer.

Same corpus (the generated parity corpus of tests/model/test_tokenizer.py, repeated), same
vocabulary (the embedded Gemma 3 270M GGUF). Prints sentences/s and tokens/s of each and their
ratio, plus the seconds to build the tokenizer from the file; the last line is one JSON object.

    python bench/tokenizer.py [--sentences 20000]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=20_000)
    args = ap.parse_args()

    import llama_cpp
    from test_tokenizer import corpus

    from model.checkpoints.gguf_format import open_gguf
    from model.embedded import embedded_gguf_path
    from model.sp_model import sp_model_proto_from_gguf
    from model.tokenizer import SentencePieceTokenizer

    path = embedded_gguf_path()
    t0 = time.perf_counter()
    md = open_gguf(path).metadata
    tok = SentencePieceTokenizer(sp_model_proto_from_gguf(md, str(path)))
    build_s = time.perf_counter() - t0
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)

    base = list(corpus())
    texts = (base * (args.sentences // len(base) + 1))[: args.sentences]
    for t in base[:200]:  # warm up both
        tok.encode(t)
        llama.tokenize(t.encode(), add_bos=False, special=False)

    def run(fn) -> tuple[float, int]:
        start = time.perf_counter()
        n = sum(len(fn(t)) for t in texts)
        return time.perf_counter() - start, n

    ours_s, ours_n = run(tok.encode)
    ref_s, ref_n = run(lambda t: llama.tokenize(t.encode(), add_bos=False, special=False))
    res = {
        "sentences": len(texts), "tokens": ours_n, "same_token_count": ours_n == ref_n,
        "ours_sentences_per_s": len(texts) / ours_s, "ours_tokens_per_s": ours_n / ours_s,
        "llamacpp_sentences_per_s": len(texts) / ref_s, "llamacpp_tokens_per_s": ref_n / ref_s,
        "speed_vs_llamacpp": ref_s / ours_s, "build_tokenizer_s": build_s,
    }
    print(f"{'':10s} {'sentences/s':>12s} {'tokens/s':>12s}")
    print(f"{'ours':10s} {res['ours_sentences_per_s']:12.0f} {res['ours_tokens_per_s']:12.0f}")
    print(f"{'llama.cpp':10s} {res['llamacpp_sentences_per_s']:12.0f} "
          f"{res['llamacpp_tokens_per_s']:12.0f}")
    print(f"ours / llama.cpp speed: {res['speed_vs_llamacpp']:.2f}x; tokenizer built from the "
          f"GGUF in {build_s:.2f} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
